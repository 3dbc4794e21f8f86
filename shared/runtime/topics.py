"""The one place that knows topic names (device contract v1, DESIGN.md section 4)."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEVICE_KINDS = ("rfid_reader", "barcode_scanner", "torque_wrench", "tablet")
# Hangar devices that publish their vendor's own format, not contract JSON (`services.ingest.reads`):
# ingest parses them and makes a record only within an open work session at the device's place.
RAW_DEVICE_KINDS = ("rfid_zebra", "rfid_impinj", "partmark_scanner")
ALL_DEVICE_KINDS = DEVICE_KINDS + RAW_DEVICE_KINDS  # what a device may be registered as
# Devices that do not speak MQTT: a service of the box publishes for them (torque controllers:
# the Open Protocol bridge, `services.torque.bridge`). Never registered as a device.
BRIDGED_DEVICE_KINDS = ("torque_controller",)
INTAKE_KINDS = ALL_DEVICE_KINDS + BRIDGED_DEVICE_KINDS  # what an `in` topic may name
# Device ids of contract v1 (also `shared.contract.types.DeviceId`); `\Z`, not `$`, which would
# also match before a trailing newline.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z"
STATION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


@dataclass(frozen=True)
class Topics:
    station: str

    @property
    def root(self) -> str:
        return f"mro/{self.station}"

    # device side
    def device_in(self, kind: str, device_id: str) -> str:
        return f"{self.root}/in/{kind}/{device_id}"

    @property
    def device_in_all(self) -> str:
        return f"{self.root}/in/+/+"

    def receipt(self, device_id: str) -> str:
        return f"{self.root}/receipt/{device_id}"

    @property
    def receipt_all(self) -> str:
        return f"{self.root}/receipt/+"

    def parse_device_in(self, topic: str) -> tuple[str, str] | None:
        """(device_kind, device_id) of an `in` topic, or None if the topic is not one (also when
        the kind is not a device kind or the id not a whole device id)."""
        parts = topic.split("/")
        if len(parts) != 5 or parts[0] != "mro" or parts[1] != self.station or parts[2] != "in":
            return None
        if parts[3] not in INTAKE_KINDS or _DEVICE_ID.search(parts[4]) is None:
            return None
        return parts[3], parts[4]

    # operations side
    def status(self, service: str) -> str:
        return f"{self.root}/status/{service}"

    @property
    def status_all(self) -> str:
        return f"{self.root}/status/+"

    def dlq(self, stage: str) -> str:
        return f"{self.root}/dlq/{stage}"

    @property
    def dlq_all(self) -> str:
        return f"{self.root}/dlq/+"

    @property
    def alarm(self) -> str:
        return f"{self.root}/alarm"

    # internal stage traffic (services only)
    def stage_input(self, stage: str) -> str:
        return f"{self.root}/pipeline/{stage}"

    def stage_receipt(self, stage: str) -> str:
        """Where downstream stages tell `stage` which keys they now hold durably."""
        return f"{self.root}/pipeline/receipt/{stage}"

    def control(self, service: str) -> str:
        """Operator commands to one service (e.g. `resume` after a freeze)."""
        return f"{self.root}/pipeline/control/{service}"

    @property
    def outcomes(self) -> str:
        """Final outcome notices (recorded seq / rejected) so ingest can answer re-sends."""
        return f"{self.root}/pipeline/outcome"

    @property
    def gateway_holds(self) -> str:
        """What the gateway holds (`GatewayHolds`, retained, sealed by uplink): how far the
        stages may prune (`shared.runtime.retention`)."""
        return f"{self.root}/pipeline/retention"

    # operator commands to the validate stage (contract versions, registries) and their replies
    @property
    def schema(self) -> str:
        return f"{self.root}/pipeline/schema"

    def schema_reply(self, command_id: str) -> str:
        return f"{self.root}/pipeline/schema/reply/{command_id}"

    @property
    def registry(self) -> str:
        return f"{self.root}/pipeline/registry"

    def registry_reply(self, command_id: str) -> str:
        return f"{self.root}/pipeline/registry/reply/{command_id}"

    # operator commands to redrive the validate stage's DLQ (`mro-edge dlq redrive`) and their replies
    @property
    def redrive(self) -> str:
        return f"{self.root}/pipeline/control/validate/redrive"

    def redrive_reply(self, command_id: str) -> str:
        return f"{self.root}/pipeline/control/validate/redrive/reply/{command_id}"

    # operator commands to ingest (work sessions, unassigned reads) and their replies
    @property
    def sessions(self) -> str:
        return f"{self.root}/pipeline/sessions"

    def sessions_reply(self, command_id: str) -> str:
        return f"{self.root}/pipeline/sessions/reply/{command_id}"
