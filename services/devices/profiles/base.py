"""What every device profile shares: the `RawRead` a device's read becomes, the `Profile`
descriptor, and the parts of a contract record every part read carries.

A `RawRead` is identified by the device and the read itself, so a publish delivered twice gives
the same ids; `raw_sha256` names the payload it came from, whose bytes ingest keeps
(`services.ingest.sessions.keep_raw`) and whose hash the record carries in `notes`, in the signed
ledger entry: an auditor ties a record to exactly what the device sent (`mro-edge reads raw`).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from services.devices.malformed import Malformed
from services.devices.profiles.open_protocol.parser import TorqueSource
from services.devices.profiles.partmark_15434.parser import PartMark
from services.devices.rfid import TagRead, TagReads
from services.torque.telegram import result_event_id
from shared.contract import SCHEMA
from shared.runtime.messages import WorkSessionOpened

RECORD_TYPE = {"receive": "part_receipt", "install": "part_installation", "remove": "part_removal"}
# event ids of records made from reads: uuid5 in this namespace (deterministic, so a redelivered
# publish makes the same record and is deduplicated by its idempotency key)
READS_NAMESPACE = uuid.UUID("6f1d3a52-8c1e-5b7a-9d40-2e6a1c0b9f31")

Problem = Literal["framing_lost", "incomplete_mark", "not_a_part_tag", "tool_calibration_unknown"]


class RawRead(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One read by one raw device. `read_id` is derived from the device and the read itself,
    so a publish delivered twice gives the same ids. `source` is the parser's whole result
    (USER memory kept raw as hex). `raw_sha256` is the SHA-256 of the bytes the device sent
    (None for reads kept before ingest kept them)."""

    read_id: str
    device_kind: str
    device_id: str
    received_at: str
    occurred_at: str
    source: TagRead | PartMark | TorqueSource
    cage: str | None = None
    part_number: str | None = None
    serial: str | None = None
    problem: Problem | None = None
    raw_sha256: str | None = None

    @property
    def part_key(self) -> str:
        """What a session records once: a part, or one controller's tightening."""
        if isinstance(self.source, TorqueSource):
            return f"torque|{self.device_id}|{self.source.tightening_id}"
        return f"{self.cage}|{self.part_number}|{self.serial}"


Reads = Callable[[str, bytes, str], "list[RawRead] | Malformed"]
RecordBody = Callable[[WorkSessionOpened, RawRead], dict[str, Any]]


@dataclass(frozen=True)
class Profile:
    """One kind of hangar device.

    `device_kind` is its intake topic kind (`mro/<st>/in/<device_kind>/<id>`), `contract_kind`
    the contract's device kind of the records it makes, `role` the `[places.<id>]` list naming
    such devices. `reads(device_id, payload, received_at)` parses one publish into reads (or a
    DLQ report), `record(session, read)` maps a read to a device contract v1 body, and
    `simulate(rng)` gives a realistic publish of the device, as it arrives on its topic.
    `registered`: False for devices the box publishes for (a bridge), never given an MQTT login.
    """

    name: str
    device_kind: str
    contract_kind: str
    role: str
    what: str
    reads: Reads
    record: RecordBody
    simulate: Callable[[random.Random], bytes]
    registered: bool = True


def read_id_of(device_kind: str, device_id: str, *parts: str) -> str:
    return hashlib.sha256("\x1f".join((device_kind, device_id, *parts)).encode()).hexdigest()[:32]


def payload_sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def raw_note(read: RawRead, profile: str, what: str) -> str:
    """The machine-readable note naming the payload a record came from (in the signed entry)."""
    return f"raw sha256 {read.raw_sha256} ({profile} {what})"


def event_id_of(session_id: str, read: RawRead) -> str:
    """One record per part per session: the same part read again in it names the same event. A
    tightening names one event whatever the session: (controller, tightening id)."""
    if isinstance(read.source, TorqueSource):
        return result_event_id(read.device_id, read.source.telegram)
    return str(uuid.uuid5(READS_NAMESPACE, f"{session_id}|{read.part_key}"))


def part_body(session: WorkSessionOpened, read: RawRead, contract_kind: str, note: str | None) -> dict[str, Any]:
    """The device contract v1 body of a part read within `session` (receipt, installation or
    removal by the session's part action); the read must name a part."""
    if read.problem is not None or not (read.cage and read.part_number and read.serial):
        raise ValueError(f"read {read.read_id} names no part ({read.problem}): it is never made a record")
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "type": RECORD_TYPE[session.part_action],
        "event_id": event_id_of(session.session_id, read),
        "occurred_at": read.occurred_at,
        "station": session.station,
        "device": {"kind": contract_kind, "id": read.device_id},
        "work_order_id": session.work_order_id,
        "aircraft": dict(session.aircraft),
        "ata": session.ata,
        "technician": dict(session.technician),
        "part": {"cage": read.cage, "part_number": read.part_number, "serial_number": read.serial,
                 "condition": session.condition},
    }
    if session.position is not None:
        body["position"] = session.position
    if session.part_action == "remove":
        body["removal_reason"] = session.removal_reason
    if note is not None and read.raw_sha256 is not None:
        body["notes"] = note
    return body


def tag_read(device_kind: str, device_id: str, read: TagRead, received_at: str, raw_sha256: str) -> RawRead:
    """The `RawRead` of one RFID tag read (either reader profile): it names a part when its EPC
    is an ADI-var aviation part tag, else it is `not_a_part_tag`."""
    common: dict[str, Any] = {
        "read_id": read_id_of(device_kind, device_id, read.epc_hex.upper(), read.read_at),
        "device_kind": device_kind, "device_id": device_id, "received_at": received_at,
        "occurred_at": read.read_at, "source": read, "raw_sha256": raw_sha256,
    }
    if read.part is None:
        return RawRead(**common, problem="not_a_part_tag")
    return RawRead(**common, cage=read.part.cage, part_number=read.part.part_number, serial=read.part.serial)


def tag_reads(device_kind: str, device_id: str, parsed: TagReads | Malformed, payload: bytes,
              received_at: str) -> list[RawRead] | Malformed:
    """Every tag read of one reader publish (event or array of events), each naming the whole
    payload's hash; a malformed publish as it is (either reader profile)."""
    if isinstance(parsed, Malformed):
        return parsed
    digest = payload_sha256(payload)
    return [tag_read(device_kind, device_id, read, received_at, digest) for read in parsed.reads]


_CAGE_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
_PN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


def random_part(rng: random.Random) -> tuple[str, str, str]:
    """A plausible (CAGE, part number, serial) for the simulators: a five-character CAGE code,
    a part number with a dash number, an alphanumeric serial."""
    cage = "".join(rng.choice(_CAGE_CHARS) for _ in range(5))
    part_number = "".join(rng.choice(_PN_CHARS) for _ in range(rng.randint(4, 9))) + f"-{rng.randint(1, 99):02d}"
    serial = "".join(rng.choice(_PN_CHARS) for _ in range(rng.randint(6, 12)))
    return cage, part_number, serial
