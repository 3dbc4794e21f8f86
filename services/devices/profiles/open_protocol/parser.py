"""What the Open Protocol bridge publishes for one tightening result, read back: `TorqueSource`.

The protocol itself (framing, typed MIDs, the integrator client) lives with the bridge in
`services.torque`, which needs it for its TCP session to the controller; what reaches ingest on
`in/torque_controller/<id>` is an `mro.op_result/1` (`services.torque.telegram`): the MID 0061
telegram, whole, as the controller sent it, with the controller's zone and the tool's own
calibration (MID 0041). `TorqueSource` is that telegram as a read keeps it.
"""

from __future__ import annotations

import msgspec

from services.devices.malformed import Malformed, field_error
from services.torque.telegram import ResultTelegram, ToolCalibration, decode_telegram


class TorqueSource(msgspec.Struct, frozen=True, kw_only=True, tag="torque.result/1"):
    """A tightening result as the controller sent it (the telegram, whole) with what the bridge
    added: the controller's zone and the tool's own calibration (MID 0041)."""

    telegram: str
    telegram_sha256: str
    revision: int
    tightening_id: int
    identifier: str
    zone: str
    tool: ToolCalibration | None = None


def parse_result(payload: bytes) -> ResultTelegram | Malformed:
    """The bridge's `mro.op_result/1`, or why it is not one."""
    try:
        return decode_telegram(payload)
    except msgspec.MsgspecError as exc:
        return Malformed("open_protocol", [field_error("$", "op_result",
                                                       "an mro.op_result/1 object from the torque bridge",
                                                       str(exc)[:80])])
