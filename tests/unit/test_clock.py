"""The box's clock seam, step detection, and sign's ledger time under clock steps.

The wall clock is stepped through the one seam (`shared.runtime.clock.use_clock`); sign runs
on a real LMDB store (`tests.support.sign.LocalSign`), one batch transaction per append.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ledger.entry import parse_entry
from shared.ledger.store import iter_entries
from shared.ledger.timeline import CLOCK_STEP, TimeOrder, parse_clock_step
from shared.runtime import clock
from shared.runtime.clock import Clock, SeamClock, StepWatch, parse_utc, use_clock, utc_now
from shared.runtime.config import Config
from tests.support.sign import LocalSign, record_item

THRESHOLD = 2.0


def entries(sign: LocalSign) -> list:
    return [parse_entry(e.entry) for e in iter_entries(sign.store)]


def alarms(sign: LocalSign) -> list[dict]:
    topic = sign.runtime.topics.alarm
    return [json.loads(payload) for t, payload in sign.published if t == topic]


def test_utc_now_reads_the_seam_and_a_step_moves_it():
    with use_clock(Clock(offset_s=-3600)) as box:
        behind = parse_utc(utc_now()).timestamp()
        assert abs(behind - (time.time() - 3600)) < 1.0
        box.step(+7200)
        ahead = parse_utc(utc_now()).timestamp()
        assert abs(ahead - (time.time() + 3600)) < 1.0
    assert abs(parse_utc(utc_now()).timestamp() - time.time()) < 1.0


def test_the_offset_file_steps_every_reader_and_forces_the_sync_state(tmp_path, monkeypatch):
    seam = tmp_path / "clock.json"
    seam.write_text(json.dumps({"offset_s": -60, "synchronised": False}))
    box = SeamClock(str(seam))
    assert abs(box.time() - (time.time() - 60)) < 1.0
    assert box.sync().synchronised is False and box.sync().source == "seam"
    seam.write_text(json.dumps({"offset_s": 0, "synchronised": True}))
    monkeypatch.setattr(clock, "SEAM_REFRESH_S", 0.0)
    assert abs(box.time() - time.time()) < 1.0
    assert box.sync().synchronised is True


def test_the_kernel_answers_whether_the_clock_is_synchronised():
    sync = clock.kernel_sync()
    assert sync.source in ("adjtimex", "unknown")
    assert sync.synchronised in (True, False, None)
    if sync.source == "adjtimex":
        assert sync.max_error_ms is not None and sync.max_error_ms >= 0


def test_a_step_watch_sees_steps_both_ways_but_not_drift():
    box = Clock()
    watch = StepWatch(THRESHOLD, box)
    assert watch.check() is None  # the baseline
    box.step(0.5)
    assert watch.check() is None
    box.step(-60)
    back = watch.check()
    assert back is not None and round(back.delta_s) == -60
    assert watch.check() is None  # one step is reported once
    box.step(+3600)
    forward = watch.check()
    assert forward is not None and round(forward.delta_s) == 3600
    body = forward.body()
    assert body["delta_ms"] == pytest.approx(3_600_000, abs=200)
    assert parse_utc(body["to"]) > parse_utc(body["from"])


def test_recorded_at_never_goes_backwards_and_each_step_is_an_entry_and_an_alarm(tmp_path):
    with use_clock(Clock()) as box, LocalSign(Config(data_dir=str(tmp_path))) as sign:
        sign.open()
        sign.append([record_item(0), record_item(1)])
        box.step(-3600)
        sign.append([record_item(2)])
        box.step(+7200)
        sign.append([record_item(3)])
        ledger = entries(sign)
        stamps = [e.recorded_at for e in ledger]
        assert stamps == sorted(stamps), stamps
        steps = [e for e in ledger if e.type == CLOCK_STEP]
        assert [round(parse_clock_step(e.body).delta_ms / 1000) for e in steps] == [-3600, 7200]
        back = ledger.index(steps[0])
        # the entry after the backward step keeps the time of the one before it
        assert ledger[back + 1].recorded_at == ledger[back - 1].recorded_at == ledger[back].recorded_at
        assert [e.type for e in ledger].count("torque_event") == 4
        raised = [a for a in alarms(sign) if a["alarm"] == CLOCK_STEP]
        assert len(raised) == 2 and "-3600" in raised[0]["detail"] and "stays at" in raised[0]["detail"]


def test_a_clock_set_back_while_sign_was_down_is_a_step_at_the_first_batch(tmp_path):
    config = Config(data_dir=str(tmp_path))
    with use_clock(Clock()) as box:
        with LocalSign(config) as sign:
            sign.open()
            sign.append([record_item(0)])
        box.step(-86400)
        with LocalSign(config) as sign:
            sign.open()
            assert sign.stage.wants_turn()  # recorded without waiting for a record
            sign.append([])
            sign.append([record_item(1)])
            ledger = entries(sign)
    assert [e.type for e in ledger] == ["torque_event", CLOCK_STEP, "torque_event"]
    assert round(parse_clock_step(ledger[1].body).delta_ms / 86_400_000) == -1
    assert ledger[2].recorded_at == ledger[0].recorded_at


@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, -5.0, 5.0, -600.0, 600.0, -86400.0, 86400.0]), min_size=1, max_size=6))
def test_recorded_at_is_non_decreasing_under_any_step_sequence(steps):
    with tempfile.TemporaryDirectory() as tmp, use_clock(Clock()) as box, \
            LocalSign(Config(data_dir=tmp), map_size_mb=16) as sign:
        sign.open()
        for i, step in enumerate(steps):
            box.step(step)
            sign.append([record_item(i)])
        ledger = entries(sign)
    order = TimeOrder()
    assert all(order.see(i, e.recorded_at) is None for i, e in enumerate(ledger))
    assert sum(1 for e in ledger if e.type == CLOCK_STEP) == sum(1 for s in steps if s)


def test_time_order_names_both_seqs():
    order = TimeOrder()
    assert order.see(0, "2026-01-01T00:00:00.000Z") is None
    assert order.see(1, "2026-01-01T00:00:00.000Z") is None
    found = order.see(2, "2025-12-31T23:59:59.999Z")
    assert found is not None and (found.seq, found.previous_seq) == (2, 1)
    assert "seq 2" in found.message and "seq 1" in found.message
    assert order.see(3, "2026-01-01T00:00:00.000Z") is None


def test_the_seam_reaches_a_process_through_the_environment(tmp_path):
    import subprocess
    import sys

    seam = tmp_path / "clock.json"
    seam.write_text(json.dumps({"offset_s": -86400}))
    out = subprocess.run([sys.executable, "-c", "from shared.runtime.clock import utc_now; print(utc_now())"],
                         env={"MRO_CLOCK_OFFSET_FILE": str(seam), "PYTHONPATH": str(Path.cwd())},
                         capture_output=True, text=True, timeout=60, check=True)
    assert abs(parse_utc(out.stdout.strip()).timestamp() - (time.time() - 86400)) < 30


# -- verifiers: the audit and the gateway flag recorded_at going backwards -----------------------

STAMPS = ["2026-03-01T10:00:00.000Z", "2026-03-01T10:00:01.000Z", "2026-03-01T09:00:00.000Z",
          "2026-03-01T09:00:02.000Z", "2026-03-01T08:00:00.000Z"]


def backwards_ledger(data_dir: Path) -> Config:
    """A sign store whose entries are validly signed but stamped back in time at seqs 2 and 4."""
    from shared.ledger.keys import SigningKey
    from shared.ledger.store import LEDGER_TABLE, encode_entry
    from shared.runtime.store import Store, u64
    from tests.support.gateway import make_entries

    config = Config(data_dir=str(data_dir))
    key = SigningKey.load_or_create(config.data_path / "keys")
    store = Store(config.stage_dir("sign"), (LEDGER_TABLE,), map_size_mb=16)
    try:
        with store.write() as txn:
            for e in make_entries(key, config.origin, len(STAMPS), recorded_at=lambda seq: STAMPS[seq]):
                txn.put(u64(e.seq), encode_entry(e), db=store.table(LEDGER_TABLE), append=True)
    finally:
        store.close()
    return config


def test_audit_verify_reports_recorded_at_going_backwards_with_its_seqs(tmp_path):
    import subprocess
    import sys

    from shared.ledger.audit import export_audit, verify_audit

    config = backwards_ledger(tmp_path / "data")
    export_audit(config, tmp_path / "export")
    report = verify_audit(tmp_path / "export")
    assert report["ok"] and report["entries"] == 5
    assert [(f["seq"], f["previous_seq"]) for f in report["findings"]] == [(2, 1), (4, 3)]
    done = subprocess.run([sys.executable, "-m", "mro_edge", "audit", "verify", str(tmp_path / "export")],
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(Path.cwd()),
                                                                            "MRO_DATA_DIR": str(tmp_path / "x")})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout.startswith("OK: 5 entries")
    assert "FINDING: recorded_at goes backwards at seq 2: 2026-03-01T09:00:00.000Z is earlier than " \
           "2026-03-01T10:00:01.000Z of seq 1" in done.stdout


# -- a time-window rejection is not final (ingest and validate, in memory) -------------------------

def test_a_time_window_rejection_is_judged_again_on_a_resend_and_others_stay_final(tmp_path):
    import random
    from types import SimpleNamespace

    from mro_edge.simulator.records import valid_record
    from services.ingest.stage import Ingest
    from services.validate.stage import Validate
    from shared.runtime.config import load_config
    from shared.runtime.delivery import apply_outcomes, run_batch
    from shared.runtime.handler import DeviceMessage
    from shared.runtime.hopauth import ensure_hop_keys
    from shared.runtime.messages import Outcomes, ReceivedRecord, ValidatedRecord, json_encode
    from shared.runtime.stage import StageRuntime
    from shared.runtime.testing import STATION, MemoryTables, MemoryUnitOfWork
    from shared.runtime.topics import Topics

    topics = Topics(STATION)
    ingest = Ingest()
    ingest.open(SimpleNamespace(config=Config(station=STATION), topics=topics))
    config = load_config(env={"MRO_DATA_DIR": str(tmp_path), "MRO_STATION": STATION,
                              "MRO_MQTT_URL": "mqtt://127.0.0.1:9"})
    ensure_hop_keys(tmp_path)
    runtime = StageRuntime(Validate(), config)
    validate = runtime.stage
    validate.open(runtime)
    at_ingest, at_validate = MemoryTables(), MemoryTables()

    def publish(data: dict) -> DeviceMessage:
        return DeviceMessage(topics.device_in("torque_wrench", "TQW-09"), json.dumps(data).encode(), utc_now())

    def through(*records: dict) -> tuple[MemoryUnitOfWork, MemoryUnitOfWork]:
        first = MemoryUnitOfWork(ingest, at_ingest)
        run_batch(ingest, [publish(r) for r in records], first)
        second = MemoryUnitOfWork(validate, at_validate)
        run_batch(validate, first.forwarded_as(ReceivedRecord), second)
        if second.outcomes:
            apply_outcomes(MemoryUnitOfWork(ingest, at_ingest), json_encode(Outcomes(second.outcomes)))
        return first, second

    try:
        rng = random.Random(8)
        early = valid_record(rng, station=STATION, device_kind="torque_wrench", device_id="TQW-09",
                             record_type="torque_event")
        suspended = valid_record(rng, station=STATION, device_kind="torque_wrench", device_id="TQW-09",
                                 record_type="torque_event")
        suspended["technician"] = {"cert_no": "1198305", "cert_kind": "FAA-AP"}
        suspended["occurred_at"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 3600))
        with use_clock(Clock(offset_s=-600)) as box:
            _, judged = through(early, suspended)
            rules = sorted(e.rule for _, r in judged.receipts() for e in r.errors or ())
            assert rules == ["occurred_in_future", "technician_suspended"]
            at_ingest.outbox.clear()  # validate receipted them
            rows = len(at_validate.table("dlq"))
            # re-sent while the clock is still wrong: judged again, answered, nothing more stored
            entered, judged = through({**early, "event_id": "4a6c2b0d-9e1f-4d4a-8b6c-0e1f2a3b4c5d"})
            assert [r.status for _, r in judged.receipts()] == ["rejected"]
            assert len(at_validate.table("dlq")) == rows and judged.failed == 0
            assert [s for _, s in judged.states()] == ["REJUDGED_UNCHANGED"]
            at_ingest.outbox.clear()
            box.step(+600)
            resent = [{**early, "event_id": "5b7d3c1e-0a2f-4e5b-9c7a-1f2e3d4c5b6a"},
                      {**suspended, "event_id": "6c8e4d2f-1b3a-4f6c-8d9b-2a3f4e5d6c7b"}]
            entered, judged = through(*resent)
        # the time-window rejection is judged again, as the next generation; the other is answered
        [forwarded] = entered.forwarded_as(ReceivedRecord)
        assert forwarded.record.event_id == resent[0]["event_id"]
        assert [r.status for _, r in entered.receipts()] == ["received", "rejected"]
        assert ("REJUDGED" in [s for _, s in entered.states()]) and at_ingest.fate(forwarded.key).redrive == 2
        assert [v.key for v in judged.forwarded_as(ValidatedRecord)] == [forwarded.key]
        assert at_validate.fate(forwarded.key).status == "validated"
    finally:
        runtime.store.close()
