"""Per device profile: parse and map throughput in reads/s beside the plain contract decoder (issue 11).

``python -m bench --only devices`` (part of ``make bench``), or ``python -m bench.devices
[--quick] [--reads N]``. Everything runs in this one process, CPU only (no broker, no LMDB):
what ingest pays per read before its transaction.

Profiles, each timed on realistic payloads of distinct parts:

- ``zebra``: a Zebra IoT Connector SIMPLE-mode event (the shape of
  tests/vectors/devices/zebra_iotc.json) holding an ADI-var EPC, as a one-event array;
- ``impinj``: an Impinj R700 IoT device interface tagInventory event (tests/vectors/devices/impinj_iot.json);
- ``partmark``: an ISO/IEC 15434 format 06 part mark (17V / 1P / S, the IUID construct #2 vector);

  each as ingest handles a raw device's publish (services.ingest.stage ``_raw`` and ``_made``):
  ``reads_of`` (vendor parse, ADI-var decode), ``record_body`` within an open receive session,
  ``json_encode``, ``decode_record`` and the idempotency key;
- ``epc``: the GS1 ADI-var EPC decoding alone (``decode_adi_var``), the part of the RFID parse
  that names the part;
- ``mid0061``: Open Protocol MID 0061 revision 7 telegrams from our controller simulator
  (``SimulatedController.tighten``): ``FrameSplitter``, ``mids.decode`` and ``to_torque_fields``
  in the controller's zone. The product maps a result as far as ``TorqueFields``; the torque
  bridge that would make the contract record from it does not exist yet, so this profile stops there.

Reference, measured interleaved with each profile (same repetitions, same load): the plain
contract decoder (``decode_record`` plus the idempotency key, what ingest does for a device
that speaks the contract) on the equivalent ``mro.record/1`` JSON: the very record the mapping
produced for the raw profiles, a torque_event carrying the telegram's values for MID 0061.
Beside each profile, its parse step alone (``reads_of``; for MID 0061 framing and decode
without ``to_torque_fields``), so the mapping's share shows. Figures are the median of 5
repetitions.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from mro_edge.simulator.openprotocol import SimulatedController
from services.devices.epc import decode_adi_var, encode_adi_var
from services.devices.profiles.partmark_15434.parser import envelope
from services.ingest import sessions as book
from services.ingest.reads import CONTRACT_KIND, RawRead, reads_of, record_body
from services.torque.codec import FrameSplitter
from services.torque.mids import TighteningResult, decode, encode
from services.torque.results import TorqueFields, to_torque_fields, zone_of
from shared.contract import decode_record, idempotency_key, normalize
from shared.runtime.config import PlaceConfig
from shared.runtime.messages import json_encode

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "devices"
STATION = "HGR1"
RECEIVED_AT = "2026-12-06T04:00:00.500Z"
ZONE = "Europe/Berlin"
REPEATS = 5
DEVICE_IDS = {"rfid_zebra": "ZEBRA-01", "rfid_impinj": "IMPINJ-01", "partmark_scanner": "SCAN-01"}


def _session() -> Any:
    """An open receive session at BAY1, as `mro-edge session open` makes it."""
    command = {"command": "open", "id": "bench-devices", "operator": "bench", "place": "BAY1",
               "work_order_id": "WO-7781", "aircraft": {"registration": "N327HA", "serial_number": "4521"},
               "ata": "32-41", "technician": {"cert_no": "3512874", "cert_kind": "FAA-AP"}, "part_action": "receive"}
    places = {"BAY1": PlaceConfig(readers=[DEVICE_IDS["rfid_zebra"], DEVICE_IDS["rfid_impinj"]],
                                  scanners=[DEVICE_IDS["partmark_scanner"]])}
    return book.opened_entry(command, station=STATION, places=places, at=RECEIVED_AT, operator="bench")


def _part(i: int) -> tuple[str, str, str]:
    """A distinct (CAGE, part number, serial) per read."""
    return "35962", f"PQ7VZ{i % 10}-{i % 97:02d}", f"M37GX{i:07d}"


def _reader_time(i: int) -> str:
    moment = datetime(2026, 12, 6, 4, 0, tzinfo=UTC) + timedelta(milliseconds=125 * i)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def zebra_payloads(n: int) -> list[bytes]:
    template = json.loads((VECTORS / "zebra_iotc.json").read_text())["vectors"][0]["payload"]
    out = []
    for i in range(n):
        event = copy.deepcopy(template)
        event["data"]["idHex"] = encode_adi_var(0, *_part(i))
        event["data"]["eventNum"] = i + 1
        event["timestamp"] = _reader_time(i) + "-0600"
        out.append(json.dumps([event]).encode())
    return out


def impinj_payloads(n: int) -> list[bytes]:
    template = json.loads((VECTORS / "impinj_iot.json").read_text())["vectors"][0]["payload"]
    out = []
    for i in range(n):
        event = copy.deepcopy(template)
        tag = event["tagInventoryEvent"]
        tag.pop("epc", None)
        tag["epcHex"] = encode_adi_var(0, *_part(i))
        event["timestamp"] = _reader_time(i) + "Z"
        out.append(json.dumps(event).encode())
    return out


def partmark_payloads(n: int) -> list[bytes]:
    return [envelope([("06", [("17V", cage), ("1P", pn), ("S", serial)])]).encode()
            for cage, pn, serial in (_part(i) for i in range(n))]


def mid0061_telegrams(n: int) -> list[bytes]:
    """MID 0061 revision 7 telegrams (with their NUL) of n tightenings on the simulated controller."""
    controller = SimulatedController(zone=ZONE)
    start = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    for i in range(n):
        controller.tighten(identifier=f"WO-2026-{i:04d}", at=start + timedelta(seconds=7 * i))
    return [encode(result, 7) for result in controller.results]


def _result(frame: bytes) -> TighteningResult:
    body = decode(frame).body
    assert isinstance(body, TighteningResult), body
    return body


def _raw_path(kind: str, session: Any) -> Callable[[bytes], int]:
    """What ingest does with one publish of a raw device kind; returns the records made."""
    device_id = DEVICE_IDS[kind]
    contract_kind = CONTRACT_KIND[kind]

    def run(payload: bytes) -> int:
        reads = reads_of(kind, device_id, payload, RECEIVED_AT)
        assert isinstance(reads, list), reads
        for read in reads:
            record = decode_record(json_encode(record_body(session, read)), station=STATION,
                                   device_kind=contract_kind, device_id=device_id)
            idempotency_key(normalize(record))
        return len(reads)

    return run


def _parse_only(kind: str) -> Callable[[bytes], int]:
    """The vendor parse alone (`reads_of`: JSON or 15434, fields checked, EPC decoded)."""
    device_id = DEVICE_IDS[kind]

    def run(payload: bytes) -> int:
        reads = reads_of(kind, device_id, payload, RECEIVED_AT)
        assert isinstance(reads, list), reads
        return len(reads)

    return run


def _records_of(kind: str, session: Any, payloads: list[bytes]) -> list[bytes]:
    """The contract records (JSON) the mapping makes of `payloads`: the reference's input."""
    out = []
    for payload in payloads:
        reads = reads_of(kind, DEVICE_IDS[kind], payload, RECEIVED_AT)
        assert isinstance(reads, list) and reads, reads
        out.extend(json_encode(record_body(session, read)) for read in reads if isinstance(read, RawRead))
    return out


_numbers = msgspec.json.Encoder(decimal_format="number").encode  # quantities as JSON numbers, as devices send them


def torque_record(fields: TorqueFields, i: int) -> bytes:
    """The torque_event record of one tightening, as a contract device would send it."""
    body = {
        "schema": "mro.record/1", "type": "torque_event", "event_id": f"00000000-0000-4000-8000-{i + 1:012d}",
        "occurred_at": fields.occurred_at.strftime("%Y-%m-%dT%H:%M:%S.000Z"), "station": STATION,
        "device": {"kind": "torque_wrench", "id": "PF6000-01"}, "work_order_id": fields.identifier,
        "aircraft": {"registration": "N327HA", "serial_number": "4521", "type": "A320"}, "ata": "32-11",
        "technician": {"cert_no": "3512874", "cert_kind": "FAA-AP"},
        "tool": {"serial_number": fields.tool_serial_number, "calibration_due": "2027-06-30"},
        "fastener_ref": "NAS1351-4-12", "torque_nm": Decimal(fields.torque_nm),
        "torque_min_nm": Decimal(fields.torque_min_nm), "torque_max_nm": Decimal(fields.torque_max_nm),
        "result": fields.result, "tightening_id": fields.tightening_id,
    }
    return _numbers(body)


def _decoder(kind: str, device_id: str) -> Callable[[bytes], int]:
    def run(payload: bytes) -> int:
        record = decode_record(payload, station=STATION, device_kind=kind, device_id=device_id)
        idempotency_key(normalize(record))
        return 1

    return run


def _median_rate(samples: list[float], count: int) -> float:
    ordered = sorted(samples)
    return count / ordered[len(ordered) // 2]


def _timed(run: Callable[[bytes], int], payloads: list[bytes]) -> tuple[float, int]:
    start = time.perf_counter()
    count = 0
    for payload in payloads:
        count += run(payload)
    return time.perf_counter() - start, count


def measure(profile: Callable[[bytes], int], inputs: list[bytes], reference: Callable[[bytes], int],
            reference_inputs: list[bytes], parse: Callable[[bytes], int] | None = None) -> dict[str, Any]:
    """Profile, reference (and the profile's parse step alone) interleaved, REPEATS times each;
    reads/s from the medians."""
    ours: list[float] = []
    theirs: list[float] = []
    parsing: list[float] = []
    reads = records = parsed = 0
    for _ in range(REPEATS):
        seconds, reads = _timed(profile, inputs)
        ours.append(seconds)
        seconds, records = _timed(reference, reference_inputs)
        theirs.append(seconds)
        if parse is not None:
            seconds, parsed = _timed(parse, inputs)
            parsing.append(seconds)
    rate, ref_rate = _median_rate(ours, reads), _median_rate(theirs, records)
    return {"reads": reads, "reads_per_s": round(rate), "us_per_read": round(1e6 / rate, 1),
            "parse_us_per_read": round(1e6 / _median_rate(parsing, parsed), 1) if parse is not None else None,
            "reference_records": records, "reference_per_s": round(ref_rate),
            "reference_us_per_record": round(1e6 / ref_rate, 1), "ratio": round(rate / ref_rate, 3)}


def run_devices_bench(quick: bool = False, reads: int | None = None) -> dict[str, Any]:
    n = reads or (1_000 if quick else 5_000)
    session = _session()
    figures: dict[str, Any] = {"reads_per_profile": n, "repeats": REPEATS}
    for name, kind, make in (("zebra", "rfid_zebra", zebra_payloads), ("impinj", "rfid_impinj", impinj_payloads),
                             ("partmark", "partmark_scanner", partmark_payloads)):
        payloads = make(n)
        figures[name] = measure(_raw_path(kind, session), payloads,
                                _decoder(CONTRACT_KIND[kind], DEVICE_IDS[kind]), _records_of(kind, session, payloads),
                                parse=_parse_only(kind))
        figures[name]["payload_bytes"] = len(payloads[0])

    epcs = [encode_adi_var(0, *_part(i)).encode() for i in range(n)]

    def adi_var(epc: bytes) -> int:
        decode_adi_var(epc.decode())
        return 1

    figures["epc"] = measure(adi_var, epcs, _decoder("rfid_reader", DEVICE_IDS["rfid_zebra"]),
                             _records_of("rfid_zebra", session, zebra_payloads(n)))
    telegrams = mid0061_telegrams(n)
    zone = zone_of(ZONE)

    def mid0061(telegram: bytes) -> int:
        splitter = FrameSplitter()
        count = 0
        for frame in splitter.feed(telegram):
            to_torque_fields(_result(frame), zone)
            count += 1
        return count

    def mid0061_decode(telegram: bytes) -> int:
        return sum(1 for frame in FrameSplitter().feed(telegram) if _result(frame))

    fields = [to_torque_fields(_result(t[:-1]), zone) for t in telegrams]
    figures["mid0061"] = measure(mid0061, telegrams, _decoder("torque_wrench", "PF6000-01"),
                                 [torque_record(f, i) for i, f in enumerate(fields)], parse=mid0061_decode)
    figures["mid0061"]["payload_bytes"] = len(telegrams[0])
    print(table(figures), flush=True)
    return figures


LABELS = {"zebra": "Zebra IoTC event -> record", "impinj": "Impinj R700 event -> record",
          "partmark": "ISO 15434 part mark -> record", "epc": "ADI-var EPC decode alone",
          "mid0061": "MID 0061 rev 7 -> TorqueFields"}


def table(figures: dict[str, Any]) -> str:
    row = "{:<32} {:>9} {:>8} {:>12}   {:>15} {:>7}  {:>6}"
    lines = [f"device profiles, {figures['reads_per_profile']:,} reads each, median of {figures['repeats']}; "
             "reference: the plain contract decoder on the equivalent record, same run:",
             row.format("profile (parse + map)", "reads/s", "us/read", "(parse alone)", "decoder rec/s", "us/rec",
                        "ratio")]
    for name, label in LABELS.items():
        f = figures[name]
        parse = f.get("parse_us_per_read")
        lines.append(row.format(label, f"{f['reads_per_s']:,}", f"{f['us_per_read']}",
                                "" if parse is None else f"({parse})", f"{f['reference_per_s']:,}",
                                f"{f['reference_us_per_record']}", f"{f['ratio']:.2f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.devices", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reads", type=int, default=None, help="reads per profile (default 5000, quick 1000)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_devices_bench(quick=args.quick, reads=args.reads)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
