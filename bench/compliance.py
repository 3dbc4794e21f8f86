"""Compliance benchmark (issue 5): validation throughput with every rule on beside structural checks
only, measured in the same run on the same pre-decoded records, and the schema dry-run time over
100,000 historical records held in an LMDB ledger. Beside them, ingest's contract decode of the
same kind of device messages with and without the duplicate-key check (issue 13).

    python -m bench.compliance [--quick] [--json FILE]

In-process, no broker: what is measured is the validate stage's judging work per record
(`check_rules`, then `Compliance.judge` with its state writes), not transport or LMDB commits.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mro_edge.simulator.records import valid_record
from shared.compliance import Compliance, MemoryState, compile_version, dry_run, load_registry
from shared.compliance.settings import DEFAULT_REGISTRIES
from shared.contract import check_rules, decode_record, idempotency_key, normalize, record_from_body
from shared.runtime.config import load_config

STATION = "HGR1"
FLEET = (
    ("tablet", "TAB-12"),
    ("torque_wrench", "TQW-07"),
    ("rfid_reader", "RFID-01"),
    ("barcode_scanner", "BCS-03"),
)
DRIFT_VERSION = {
    "version": "mro.record/2",
    "title": "bench: hours on every maintenance action, structured work orders",
    "require": [
        {"field": "aircraft_hours", "types": ["maintenance_action"]},
        {"field": "aircraft.type", "types": ["*"]},
    ],
    "pattern": [
        {"field": "work_order_id", "types": ["*"], "regex": "^(WO-[0-9]{4}-[0-9]{6}|TLB/[0-9]{6}/[0-9])$"}
    ],
}


def synthetic_bodies(count: int, *, seed: int = 2026, start: datetime | None = None) -> list[dict]:
    """`count` normalized bodies as the simulator's fleet produces them (signed where required)."""
    rng = random.Random(seed)
    start = start or datetime.now(UTC) - timedelta(hours=1)
    bodies = []
    for index in range(count):
        kind, device_id = FLEET[index % len(FLEET)]
        data = valid_record(rng, station=STATION, device_kind=kind, device_id=device_id,
                            occurred_at=start + timedelta(seconds=index * 0.5))
        record = decode_record(
            json.dumps(data).encode(), station=STATION, device_kind=kind, device_id=device_id
        )
        bodies.append(normalize(record))
    return bodies


def write_ledger(data_dir: Path, bodies, *, origin: str = f"mro-edge/{STATION}") -> int:
    """A sign-stage LMDB ledger in `data_dir/sign` holding `bodies` as signed, chained entries."""
    from shared.ledger.entry import GENESIS_PREV, entry_bytes, sign_entry
    from shared.ledger.keys import SigningKey
    from shared.ledger.store import LEDGER_TABLE, encode_entry
    from shared.runtime.store import Store, u64

    key = SigningKey.generate()
    store = Store(Path(data_dir) / "sign", (LEDGER_TABLE,), map_size_mb=2048)
    prev, seq = GENESIS_PREV, 0
    try:
        batch = []
        for body in bodies:
            idem = idempotency_key(body)
            entry = entry_bytes(origin=origin, seq=seq, prev=prev, idem=idem, kid=key.kid,
                                recorded_at="2026-11-23T10:00:00.000Z", type=body["type"], body=body)
            signed = sign_entry(key, entry, seq, idem)
            batch.append((u64(seq), encode_entry(signed)))
            prev, seq = signed.hash, seq + 1
            if len(batch) >= 5000:
                _put(store, LEDGER_TABLE, batch)
                batch = []
        _put(store, LEDGER_TABLE, batch)
    finally:
        store.close()
    return seq


def _put(store, table, rows) -> None:
    with store.write() as txn:
        for key, value in rows:
            txn.put(key, value, db=store.table(table), append=True)


def _throughput(records, judge, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        state = MemoryState()
        for record, body, received in records:
            judge(record, body, received, state)
    return len(records) * repeat / (time.perf_counter() - started)


def _decode_us(payloads: list[tuple[bytes, str, str]], repeat: int) -> tuple[float, float]:
    """Microseconds per message of `decode_record` without and with the duplicate-key check: the
    best of `repeat` passes each, the two alternating so that a busy machine slows both alike."""
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeat):
        for check in (False, True):
            started = time.perf_counter()
            for payload, kind, device_id in payloads:
                decode_record(payload, station=STATION, device_kind=kind, device_id=device_id,
                              check_duplicates=check)
            best[check] = min(best[check], time.perf_counter() - started)
    return best[False] / len(payloads) * 1e6, best[True] / len(payloads) * 1e6


def decode_figures(quick: bool, out=print) -> dict:
    """The duplicate-key check's price on realistic device messages (JSON as devices send it)."""
    rng = random.Random(2026)
    payloads = []
    for i in range(2_000 if quick else 5_000):
        kind, device_id = FLEET[i % len(FLEET)]
        record = valid_record(rng, station=STATION, device_kind=kind, device_id=device_id)
        payloads.append((json.dumps(record).encode(), kind, device_id))
    _decode_us(payloads[:500], 1)  # warm up
    plain, checked = _decode_us(payloads, 7)
    figures = {"decode_messages": len(payloads),
               "decode_mean_bytes": round(sum(len(p) for p, _, _ in payloads) / len(payloads)),
               "decode_plain_us": round(plain, 2), "decode_checked_us": round(checked, 2),
               "duplicate_check_overhead": round(checked / plain - 1, 3)}
    out(f"contract decode, {len(payloads)} device messages of {figures['decode_mean_bytes']} bytes on average:")
    out(f"  without the duplicate-key check  {plain:8.2f} us/message")
    out(f"  with it (as ingest runs)         {checked:8.2f} us/message "
        f"(+{figures['duplicate_check_overhead']:.0%})")
    return figures


def run_compliance_bench(quick: bool = False, out=print) -> dict:
    registry = load_registry(DEFAULT_REGISTRIES)
    pool = 2_000 if quick else 5_000
    repeat = 2 if quick else 4
    bodies = synthetic_bodies(pool)
    records = [(record_from_body(b), b, datetime.now(UTC)) for b in bodies]
    full = Compliance(registry)
    unsigned = Compliance(registry, signatures=False)

    def structural(record, body, received, state):
        return check_rules(record, received_at=received)

    def everything(record, body, received, state, compliance=full):
        errors = check_rules(record, received_at=received)
        verdict = compliance.judge(record, body, state)
        if not errors and not verdict.errors:
            for table, key, value in verdict.writes:
                state.put(table, key, value)
        return errors

    def no_signatures(record, body, received, state):
        return everything(record, body, received, state, unsigned)

    rejected = sum(
        1 for r, b, rec in records if check_rules(r, received_at=rec) or full.judge(r, b, None).errors
    )
    _throughput(records[:500], everything, 1)  # warm up
    figures = {
        "records": len(records) * repeat,
        "signed_share": round(sum(1 for b in bodies if "signature" in b["technician"]) / len(bodies), 3),
        "rejected_in_pool": rejected,
        "structural_per_s": round(_throughput(records, structural, repeat)),
        "all_rules_per_s": round(_throughput(records, everything, repeat)),
        "all_rules_without_signatures_per_s": round(_throughput(records, no_signatures, repeat)),
    }
    figures["all_rules_vs_structural"] = round(figures["all_rules_per_s"] / figures["structural_per_s"], 3)
    out(f"validation, in-process, {figures['records']} records (pool {pool}, "
        f"{figures['signed_share']:.0%} carry e-signatures):")
    out(f"  structural checks only      {figures['structural_per_s']:>10,} records/s")
    out(f"  all rules (compliance on)   {figures['all_rules_per_s']:>10,} records/s "
        f"({figures['all_rules_vs_structural']:.2f}x)")
    out(f"  all rules, no signature     {figures['all_rules_without_signatures_per_s']:>10,} records/s")

    figures.update(decode_figures(quick, out))

    history = 20_000 if quick else 100_000
    version = compile_version(DRIFT_VERSION)
    with tempfile.TemporaryDirectory(prefix="mro-bench-compliance-") as tmp:
        written = write_ledger(Path(tmp), (bodies[i % len(bodies)] for i in range(history)))
        config = load_config(env={"MRO_DATA_DIR": tmp})
        from services.validate.drift import ledger_bodies

        started = time.perf_counter()
        report = dry_run(version, ledger_bodies(config, history), tolerance_ppm=20_000)
        seconds = time.perf_counter() - started
    figures.update(dry_run_records=report.sample, dry_run_s=round(seconds, 3),
                   dry_run_per_s=round(report.sample / seconds), dry_run_failed_ppm=report.failed_ppm,
                   ledger_written=written)
    out(f"schema dry-run over {report.sample:,} ledger records (LMDB, read-only): {seconds:.2f} s "
        f"({figures['dry_run_per_s']:,} records/s); {report.summary()}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compliance", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_compliance_bench(quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
