"""Typed Open Protocol messages (msgspec Structs) and the field layout of every MID revision we speak.

Supported, both directions (the client and our simulator use the same tables):

    0001 communication start          no data (revisions 1-7 ask for the 0002 revision)
    0002 communication start ack      revisions 1-4
    0003 communication stop           no data
    0004 command error                failed MID (4 digits) + error code, no parameter ids
    0005 command accepted             accepted MID (4 digits), no parameter ids
    0040 tool data upload request     no data (the revision asks for the 0041 revision)
    0041 tool data upload reply       revisions 1-5
    0060 last tightening subscribe    no data (the revision asks for the 0061 revision)
    0061 last tightening result       revisions 1-7
    0062 last tightening result ack   revision 1, no data
    9999 keep alive                   no data; the controller mirrors it

Sources for the layouts (field order, parameter ids, widths): the Open Protocol user guide
9836 4415 01 (release 7.5; MID 0002 section 5.1.2, 0004 section 5.2.1, 0041 section 5.5,
0061 section 5.8), cross-checked against the byte offsets in Rickedb/OpenProtocolInterpreter
(`Communication/Mid0002.cs`, `Tool/Mid0041.cs`, `Tightening/Mid0061.cs`) and the field lists in
st-one-io/node-open-protocol (`src/mid/0061.js`). MID 0061 revision 1 is its own layout (23
fields, 231 bytes); revision 2 re-numbers the fields (46 fields) and revisions 3-7 append to it.

Uncertain details, kept as text rather than guessed into numbers: 0061 fields 53 (customer
tightening error code), 56 (compensated angle) and 57 (final angle decimal) of revisions 5 and 7
(sign and decimals not confirmed), and 0041 field 10 (open end data). Every decoded message
keeps its raw telegram and any data past the last known field (`extra`), so nothing a
controller said is lost when a newer firmware appends fields.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from services.torque.codec import (
    DecodeError,
    Field,
    Header,
    Kind,
    decode_fields,
    encode_fields,
    encode_frame,
    split_frame,
)

N, T = Kind.NUM, Kind.TEXT

# MID 0004 error codes this package acts on (user guide section 5.2.1).
ERR_CLIENT_ALREADY_CONNECTED = 96
ERR_REVISION_UNSUPPORTED = 97
ERR_UNKNOWN_MID = 99
ERR_SUBSCRIPTION_EXISTS = 9


class Body(msgspec.Struct, frozen=True, kw_only=True):
    """A message body. `MID` is the message id; `extra` is data past the last known field."""

    MID: ClassVar[int]
    extra: str = ""


class CommStart(Body, frozen=True, kw_only=True):
    MID = 1


class CommStop(Body, frozen=True, kw_only=True):
    MID = 3


class CommStartAck(Body, frozen=True, kw_only=True):
    MID = 2
    cell_id: int
    channel_id: int
    controller_name: str
    supplier_code: str | None = None
    open_protocol_version: str | None = None
    controller_software_version: str | None = None
    tool_software_version: str | None = None
    rbu_type: str | None = None
    controller_serial_number: str | None = None


class CommandError(Body, frozen=True, kw_only=True):
    MID = 4
    failed_mid: int
    error_code: int


class CommandAccepted(Body, frozen=True, kw_only=True):
    MID = 5
    accepted_mid: int


class ToolDataRequest(Body, frozen=True, kw_only=True):
    MID = 40


class ToolData(Body, frozen=True, kw_only=True):
    """MID 0041. Dates are the controller's local time `YYYY-MM-DD:HH:MM:SS`, kept as sent;
    calibration value and max torque are x100 (N·m), gear ratio x100."""

    MID = 41
    tool_serial_number: str
    tightenings: int
    last_calibration: str
    controller_serial_number: str
    calibration_value: int | None = None
    last_service: str | None = None
    tightenings_since_service: int | None = None
    tool_type: int | None = None
    motor_size: int | None = None
    open_end_data: str | None = None
    controller_software_version: str | None = None
    tool_max_torque: int | None = None
    gear_ratio: int | None = None
    tool_full_speed: int | None = None
    primary_tool: int | None = None
    tool_model: str | None = None


class ResultSubscribe(Body, frozen=True, kw_only=True):
    MID = 60


class TighteningResult(Body, frozen=True, kw_only=True):
    """MID 0061, any revision 1-7. Torques are x100 as sent; `timestamp` is the controller's
    local time without zone; `identifier` is field "VIN number" (where shops scan the work order)."""

    MID = 61
    cell_id: int
    channel_id: int
    controller_name: str
    identifier: str
    job_id: int
    parameter_set_id: int
    batch_size: int
    batch_counter: int
    tightening_status: int
    torque_status: int
    angle_status: int
    torque_min: int
    torque_max: int
    torque_target: int
    torque: int
    angle_min: int
    angle_max: int
    angle_target: int
    angle: int
    timestamp: str
    parameter_set_changed: str
    batch_status: int
    tightening_id: int
    # revision 2
    strategy: int | None = None
    strategy_options: int | None = None
    rundown_angle_status: int | None = None
    current_monitoring_status: int | None = None
    selftap_status: int | None = None
    prevail_torque_monitoring_status: int | None = None
    prevail_torque_compensate_status: int | None = None
    tightening_error_status: int | None = None
    rundown_angle_min: int | None = None
    rundown_angle_max: int | None = None
    rundown_angle: int | None = None
    current_monitoring_min: int | None = None
    current_monitoring_max: int | None = None
    current_monitoring_value: int | None = None
    selftap_min: int | None = None
    selftap_max: int | None = None
    selftap_torque: int | None = None
    prevail_torque_monitoring_min: int | None = None
    prevail_torque_monitoring_max: int | None = None
    prevail_torque: int | None = None
    job_sequence_number: int | None = None
    sync_tightening_id: int | None = None
    tool_serial_number: str | None = None
    # revision 3
    parameter_set_name: str | None = None
    torque_unit: int | None = None
    result_type: int | None = None
    # revision 4
    identifier_part2: str | None = None
    identifier_part3: str | None = None
    identifier_part4: str | None = None
    # revision 5
    customer_error_code: str | None = None
    # revision 6
    prevail_torque_compensate_value: int | None = None
    tightening_error_status2: int | None = None
    # revision 7
    compensated_angle: str | None = None
    final_angle_decimal: str | None = None


class ResultAck(Body, frozen=True, kw_only=True):
    MID = 62


class KeepAlive(Body, frozen=True, kw_only=True):
    MID = 9999


class Message(msgspec.Struct, frozen=True):
    """A decoded telegram: header, typed body, and the raw frame (without its NUL) as received."""

    header: Header
    body: Body
    raw: str


_0002: dict[int, tuple[Field, ...]] = {1: (Field(1, "cell_id", 4, N), Field(2, "channel_id", 2, N),
                                          Field(3, "controller_name", 25, T))}
_0002[2] = _0002[1] + (Field(4, "supplier_code", 3, T),)
_0002[3] = _0002[2] + (Field(5, "open_protocol_version", 19, T), Field(6, "controller_software_version", 19, T),
                       Field(7, "tool_software_version", 19, T))
_0002[4] = _0002[3] + (Field(8, "rbu_type", 24, T), Field(9, "controller_serial_number", 10, T))

_0041: dict[int, tuple[Field, ...]] = {1: (Field(1, "tool_serial_number", 14, T), Field(2, "tightenings", 10, N),
                                          Field(3, "last_calibration", 19, T),
                                          Field(4, "controller_serial_number", 10, T))}
_0041[2] = _0041[1] + (Field(5, "calibration_value", 6, N), Field(6, "last_service", 19, T),
                       Field(7, "tightenings_since_service", 10, N), Field(8, "tool_type", 2, N),
                       Field(9, "motor_size", 2, N), Field(10, "open_end_data", 3, T),
                       Field(11, "controller_software_version", 19, T))
_0041[3] = _0041[2] + (Field(12, "tool_max_torque", 6, N), Field(13, "gear_ratio", 6, N),
                       Field(14, "tool_full_speed", 6, N))
_0041[4] = _0041[3] + (Field(15, "primary_tool", 2, N),)
_0041[5] = _0041[4] + (Field(16, "tool_model", 12, T),)

_RESULT_HEAD = (Field(1, "cell_id", 4, N), Field(2, "channel_id", 2, N), Field(3, "controller_name", 25, T),
                Field(4, "identifier", 25, T))
_0061: dict[int, tuple[Field, ...]] = {1: _RESULT_HEAD + (
    Field(5, "job_id", 2, N), Field(6, "parameter_set_id", 3, N), Field(7, "batch_size", 4, N),
    Field(8, "batch_counter", 4, N), Field(9, "tightening_status", 1, N), Field(10, "torque_status", 1, N),
    Field(11, "angle_status", 1, N), Field(12, "torque_min", 6, N), Field(13, "torque_max", 6, N),
    Field(14, "torque_target", 6, N), Field(15, "torque", 6, N), Field(16, "angle_min", 5, N),
    Field(17, "angle_max", 5, N), Field(18, "angle_target", 5, N), Field(19, "angle", 5, N),
    Field(20, "timestamp", 19, T), Field(21, "parameter_set_changed", 19, T), Field(22, "batch_status", 1, N),
    Field(23, "tightening_id", 10, N))}
_0061[2] = _RESULT_HEAD + (
    Field(5, "job_id", 4, N), Field(6, "parameter_set_id", 3, N), Field(7, "strategy", 2, N),
    Field(8, "strategy_options", 5, N), Field(9, "batch_size", 4, N), Field(10, "batch_counter", 4, N),
    Field(11, "tightening_status", 1, N), Field(12, "batch_status", 1, N), Field(13, "torque_status", 1, N),
    Field(14, "angle_status", 1, N), Field(15, "rundown_angle_status", 1, N),
    Field(16, "current_monitoring_status", 1, N), Field(17, "selftap_status", 1, N),
    Field(18, "prevail_torque_monitoring_status", 1, N), Field(19, "prevail_torque_compensate_status", 1, N),
    Field(20, "tightening_error_status", 10, N), Field(21, "torque_min", 6, N), Field(22, "torque_max", 6, N),
    Field(23, "torque_target", 6, N), Field(24, "torque", 6, N), Field(25, "angle_min", 5, N),
    Field(26, "angle_max", 5, N), Field(27, "angle_target", 5, N), Field(28, "angle", 5, N),
    Field(29, "rundown_angle_min", 5, N), Field(30, "rundown_angle_max", 5, N), Field(31, "rundown_angle", 5, N),
    Field(32, "current_monitoring_min", 3, N), Field(33, "current_monitoring_max", 3, N),
    Field(34, "current_monitoring_value", 3, N), Field(35, "selftap_min", 6, N), Field(36, "selftap_max", 6, N),
    Field(37, "selftap_torque", 6, N), Field(38, "prevail_torque_monitoring_min", 6, N),
    Field(39, "prevail_torque_monitoring_max", 6, N), Field(40, "prevail_torque", 6, N),
    Field(41, "tightening_id", 10, N), Field(42, "job_sequence_number", 5, N),
    Field(43, "sync_tightening_id", 5, N), Field(44, "tool_serial_number", 14, T), Field(45, "timestamp", 19, T),
    Field(46, "parameter_set_changed", 19, T))
_0061[3] = _0061[2] + (Field(47, "parameter_set_name", 25, T), Field(48, "torque_unit", 1, N),
                       Field(49, "result_type", 2, N))
_0061[4] = _0061[3] + (Field(50, "identifier_part2", 25, T), Field(51, "identifier_part3", 25, T),
                       Field(52, "identifier_part4", 25, T))
_0061[5] = _0061[4] + (Field(53, "customer_error_code", 4, T),)
_0061[6] = _0061[5] + (Field(54, "prevail_torque_compensate_value", 6, N),
                       Field(55, "tightening_error_status2", 10, N))
_0061[7] = _0061[6] + (Field(56, "compensated_angle", 7, T), Field(57, "final_angle_decimal", 7, T))

_BARE_MID = (Field(None, "failed_mid", 4, N),)

LAYOUTS: dict[int, dict[int, tuple[Field, ...]]] = {
    2: _0002,
    4: {1: _BARE_MID + (Field(None, "error_code", 2, N),)},
    5: {1: (Field(None, "accepted_mid", 4, N),)},
    41: _0041,
    61: _0061,
}
BODIES: dict[int, type[Body]] = {cls.MID: cls for cls in (
    CommStart, CommStartAck, CommStop, CommandError, CommandAccepted, ToolDataRequest, ToolData,
    ResultSubscribe, TighteningResult, ResultAck, KeepAlive)}
MAX_REVISION = {2: 4, 41: 5, 61: 7}
"""The highest revision of each data-carrying reply this package decodes."""


def layout(mid: int, revision: int) -> tuple[Field, ...]:
    """The fields of `mid` at `revision`; MIDs without data have none at any revision."""
    by_revision = LAYOUTS.get(mid)
    if by_revision is None:
        return ()
    if mid in (4, 5):  # bare values; later revisions are not known to change them
        return by_revision[1]
    fields = by_revision.get(revision)
    if fields is None:
        raise DecodeError(f"MID {mid:04d} revision {revision} is not supported (1-{max(by_revision)})")
    return fields


def encode(body: Body, revision: int = 1, *, no_ack: bool = False, station: int | None = None,
           spindle: int | None = None) -> bytes:
    """One telegram for `body` at `revision`; fields of later revisions are left out."""
    fields = layout(body.MID, revision)
    values: dict[str, Any] = {name: getattr(body, name) for name in body.__struct_fields__}
    if body.MID == 4:  # the error code is 2 digits in revision 1, 3 in later spec releases
        fields = _BARE_MID + (Field(None, "error_code", max(2, len(str(body.error_code))), N),)  # type: ignore[attr-defined]
    for field in fields:
        if values.get(field.name) is None:
            raise ValueError(f"MID {body.MID:04d} revision {revision}: {field.name} is required")
    data = encode_fields(fields, values) + body.extra
    header = Header(mid=body.MID, revision=revision, no_ack=no_ack, station=station, spindle=spindle)
    return encode_frame(header, data)


def decode(frame: bytes) -> Message:
    """One frame as `FrameSplitter` yields it. Unknown MIDs raise `DecodeError` (the caller
    answers 0004 / logs); so do data that do not match the layout of the stated revision."""
    header, data = split_frame(frame)
    cls = BODIES.get(header.mid)
    if cls is None:
        raise DecodeError(f"MID {header.mid:04d} is not supported")
    if header.mid == 4:
        fields: tuple[Field, ...] = _BARE_MID + (Field(None, "error_code", max(2, len(data) - 4), N),)
    else:
        fields = layout(header.mid, header.revision)
    values, extra = decode_fields(fields, data)
    try:
        body = cls(**values, extra=extra)
    except TypeError as exc:
        raise DecodeError(f"MID {header.mid:04d}: {exc}") from None
    return Message(header, body, frame.decode("ascii"))
