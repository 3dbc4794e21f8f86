"""The bridge's configuration and what counts as durable: `[torque.controllers.<id>]` (or
MRO_TORQUE_CONTROLLERS) to the client's settings, and which receipts allow a MID 0062."""

from __future__ import annotations

import json

import pytest

from services.torque.bridge import controller_config
from shared.contract import FieldError
from shared.runtime.config import ConfigError, load_config
from shared.runtime.messages import DeviceReceipt
from shared.runtime.receipts import is_durable


def test_a_controller_from_the_environment_gets_the_defaults_of_the_protocol():
    config = load_config(env={"MRO_TORQUE_CONTROLLERS": json.dumps({"TQC-07": {"host": "10.20.0.31",
                                                                              "zone": "Europe/Berlin"}})})
    [(device_id, settings)] = config.torque.controllers.items()
    client = controller_config(device_id, settings, config.torque.keepalive_s)
    assert (client.device_id, client.host, client.port, client.zone) == ("TQC-07", "10.20.0.31", 4545, "Europe/Berlin")
    assert client.result_revision == 7 and settings.calibration_interval_days == 365


@pytest.mark.parametrize("value", ["not json", json.dumps({"TQC-07": {"host": "h"}}),
                                   json.dumps({"TQC-07": {"host": "h", "zone": "UTC", "colour": "red"}})])
def test_a_controller_setting_that_cannot_work_is_refused_at_load(value):
    with pytest.raises(ConfigError, match="MRO_TORQUE_CONTROLLERS|controllers"):
        load_config(env={"MRO_TORQUE_CONTROLLERS": value})


@pytest.mark.parametrize(("receipt", "durable"), [
    (DeviceReceipt("received", "t", "e"), True),
    (DeviceReceipt("duplicate", "t", "e"), True),
    (DeviceReceipt("recorded", "t", "e", seq=3), True),
    (DeviceReceipt("rejected", "t", "e", errors=[FieldError("$.telegram", "op_result", "N·m", "x")]), True),
    (DeviceReceipt("rejected", "t", None, errors=[FieldError("$", "rate_limited", "later", "x")]), False),
    (DeviceReceipt("rejected", "t", "e", errors=[FieldError("$", "storage_full", "room", "x")]), False),
    (DeviceReceipt("refused", "t", "e"), False),
])
def test_only_a_committed_fate_allows_the_acknowledge(receipt, durable):
    assert is_durable(receipt) is durable
