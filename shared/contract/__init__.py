"""Device contract v1 (DESIGN.md section 4): decoding, rules, stored bodies and error reports.

The ingest stage calls `decode_record` (everything decidable from the message), then
`normalize` and `idempotency_key`; the validate stage calls `record_from_body` on what ingest
stored and `check_rules` (rules across fields and against the receive time). Any rejection is
described by `FieldError`s and sent as an `error_report`.

Rule ids (stable; they appear in receipts and DLQ reports):

====================  ==========================  ============================================
rule                  path                        meaning
====================  ==========================  ============================================
max_size              $                           message larger than `max_bytes`
utf8                  $                           message is not UTF-8
max_depth             $                           objects/arrays nested deeper than `max_depth`
json                  $                           message is not JSON
duplicate_key         the repeated key            an object names the same key twice (JSON
                                                  decoders disagree on which copy counts)
text_control_char     the field (or key)          text holds a C0/C1 control character (free
                                                  text may hold LF and TAB), a bidi control
                                                  (U+202A-E, U+2066-9, U+200E/F, U+061C) or a
                                                  zero-width character (U+200B-D, U+2060,
                                                  U+FEFF); `received` names the code point and
                                                  its position, never the text
type                  the field ($ if top level)  wrong JSON type (a string for a quantity, a
                                                  bool or 1.5 for a count, a non-object record)
required              the missing field           required field absent
unknown_field         the unknown field           field not in contract v1 at that place
schema_version        $.schema                    `schema` is not "mro.record/1" (reported
                                                  alone: the rest is judged by another schema)
enum                  the field                   not one of the listed values (also `$.type`)
pattern               the field                   identifier does not match its pattern
format                the field                   event_id not a UUID, occurred_at not RFC 3339
                                                  UTC with Z, a date not YYYY-MM-DD
min_length            the field                   text shorter than allowed (empty description)
max_length            the field                   text or list longer than allowed
minimum               the field                   number below 0
maximum               the field                   number above its bound (quantities 1e6,
                                                  counts 2^53-1)
precision             the field                   quantity with more than 20 decimals
ata_chapter           $.ata                       not CC[-SS[-SS]] with CC a listed chapter
registration          $.aircraft.registration     not a recognised registration format
topic_mismatch        $.station, $.device.kind,   differs from the topic the record came on
                      $.device.id
torque_range          $.torque_max_nm             torque_min_nm > torque_max_nm
torque_result         $.result                    OK/NOK disagrees with torque in [min, max]
calibration_overdue   $.tool.calibration_due      due before the UTC day of occurred_at
occurred_in_future    $.occurred_at               > clock_skew after the receive time
occurred_too_old      $.occurred_at               > max_backdate before the receive time
contract              the field                   the decoder refused the value for a reason
                                                  none of the above names (a safety net that
                                                  should never fire; its text is msgspec's)
====================  ==========================  ============================================

`decode_record` reports everything up to and including `topic_mismatch`; `check_rules` the
last five. The ingest stage adds one rule of its own before decoding: `rate_limited` (path
`$`), a device publishing faster than `[limits] device_rate_per_s` / `device_burst` allow
(`services/ingest/stage.py`): the record was not read or kept, and must be sent again later;
and `unassigned_full` (path `$`), a raw hangar device's read that no work session took while
`[limits] max_unassigned_reads` unassigned reads are already kept; and `work_session`, a
tablet's work session command (`"schema": "mro.work_session/1"`, not a record) that cannot be
carried out (its `expected` says why and what to do); and, for a torque controller's result
from the Open Protocol bridge (`in/torque_controller/<id>`), `op_telegram` (path
`$.telegram`: not a MID 0061 telegram ingest can read) and `op_result` (`$.telegram`: a result
that cannot be mapped as it stands, e.g. a unit other than N·m; `$`: not an mro.op_result/1).

Raw hangar devices (topic kinds `rfid_zebra`, `rfid_impinj`, `partmark_scanner`; an additive
change to the topics, not to mro.record/1) publish their vendors' formats; a read within a work
session becomes an mro.record/1 part record whose `device.kind` is `rfid_reader` or
`barcode_scanner` (`services/ingest/reads.py`). Their vendor-format errors use the parsers'
rules (`services/devices/`).
The regulatory rules the validate stage applies next (registries, sign-off chains, technician
e-signatures, contract versions mro.record/2 and later) have their own ids, listed in
`shared.compliance`.
"""

from shared.contract.body import idempotency_key, normalize, record_from_body
from shared.contract.checks import TIME_WINDOW_RULES, check_rules
from shared.contract.decode import decode_record
from shared.contract.errors import ContractError, FieldError
from shared.contract.report import error_report
from shared.contract.types import (
    RECORD_TYPES,
    SCHEMA,
    Aircraft,
    Device,
    Inspection,
    MaintenanceAction,
    Part,
    PartInstallation,
    PartReceipt,
    PartRemoval,
    Record,
    RecordBase,
    Technician,
    Tool,
    TorqueEvent,
)

RULES: tuple[str, ...] = (
    "max_size", "utf8", "max_depth", "json", "duplicate_key", "text_control_char", "type", "required",
    "unknown_field", "schema_version", "enum",
    "pattern", "format", "min_length", "max_length", "minimum", "maximum", "precision", "ata_chapter",
    "registration", "topic_mismatch", "torque_range", "torque_result", "calibration_overdue",
    "occurred_in_future", "occurred_too_old", "contract",
)

__all__ = [
    "RECORD_TYPES",
    "RULES",
    "SCHEMA",
    "Aircraft",
    "ContractError",
    "Device",
    "FieldError",
    "Inspection",
    "MaintenanceAction",
    "Part",
    "PartInstallation",
    "PartReceipt",
    "PartRemoval",
    "Record",
    "RecordBase",
    "Technician",
    "Tool",
    "TorqueEvent",
    "TIME_WINDOW_RULES",
    "check_rules",
    "decode_record",
    "error_report",
    "idempotency_key",
    "normalize",
    "record_from_body",
]
