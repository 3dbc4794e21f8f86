"""Time on the box, end to end: real broker (embedded and Mosquitto), real ingest, validate and sign
processes, their wall clock moved through the one seam (`MRO_CLOCK_OFFSET_FILE`) the test controls.

* The box's clock 10 minutes behind its devices: a valid record is rejected `occurred_in_future`;
  once the clock is right, the same record sent again (under a new event_id too) is judged
  again and recorded exactly once.
* The clock stepped backwards and forwards: the ledger's recorded_at never goes backwards, each
  step is a `clock_step` entry and a `clock_step` alarm.
* `[clock] require_sync`: records wait in validate while the clock is not synchronised, and are
  recorded once it is.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mro_edge.cli import read_statuses
from mro_edge.simulator.records import valid_record
from shared.ledger.entry import parse_entry
from shared.ledger.timeline import CLOCK_STEP, TimeOrder, parse_clock_step
from shared.runtime.clock import SEAM_REFRESH_S
from shared.runtime.topics import Topics
from tests.edge import TopicRecorder
from tests.pipeline import ROOT, Pipeline, wait_until

DEVICE = ("torque_wrench", "TQW-31")


def set_clock(seam: Path, offset_s: float, synchronised: bool | None = None) -> None:
    """Move every service's wall clock (they re-read the file within SEAM_REFRESH_S)."""
    tmp = seam.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset_s": offset_s, "synchronised": synchronised}))
    tmp.replace(seam)
    time.sleep(SEAM_REFRESH_S * 3)


@pytest.fixture
def seam(tmp_path) -> Path:
    path = tmp_path / "clock.json"
    path.write_text(json.dumps({"offset_s": 0}))
    return path


def torque(seed: int, station: str, occurred: datetime | None = None) -> dict:
    data = valid_record(random.Random(seed), station=station, device_kind=DEVICE[0], device_id=DEVICE[1],
                        record_type="torque_event")
    if occurred is not None:
        data["occurred_at"] = occurred.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return data


def send(device, data: dict) -> str:
    device.send(data["event_id"], json.dumps(data).encode())
    return data["event_id"]


def final(device, event_id: str, timeout_s: float = 60) -> dict:
    def settled():
        device.resend_unreceipted()
        return device.sent[event_id].final

    return wait_until(settled, timeout_s, 0.2, f"the final receipt of {event_id}")


def statuses_of(pipe: Pipeline, name: str) -> dict:
    return read_statuses(pipe.config, 0.3).get(name, {})


def ledger(pipe: Pipeline) -> list:
    return [parse_entry(e.entry) for e in pipe.ledger()]


def test_a_record_rejected_while_the_clock_was_behind_is_recorded_once_after_the_fix(broker, tmp_path, seam):
    set_clock(seam, -600)
    pipe = Pipeline(broker, tmp_path / "data", mro_clock_offset_file=str(seam))
    pipe.start()
    try:
        device = pipe.device(*DEVICE)
        data, waiting = torque(1, pipe.station), torque(6, pipe.station)
        first = final(device, send(device, data))
        assert first["status"] == "rejected"
        key = first["idempotency_key"]
        assert [e["rule"] for e in first["errors"]] == ["occurred_in_future"], first
        assert final(device, send(device, waiting))["status"] == "rejected"

        set_clock(seam, 0)  # NTP set the clock right: a forward step of 10 minutes
        again = final(device, send(device, {**data, "event_id": str(uuid.uuid4())}))
        assert again["status"] == "recorded" and again["idempotency_key"] == key, again
        same = send(device, data)  # the first event_id once more: answered from the ledger
        wait_until(lambda: any(r["status"] in ("duplicate", "recorded") and r.get("seq") == again["seq"]
                               for r in device.sent[same].receipts), 60, 0.2, "the re-send's answer")

        # the other one waits in the DLQ for the operator: redriven against the clock now, it is recorded
        done = subprocess.run([sys.executable, "-m", "mro_edge", "dlq", "redrive", "--rule", "occurred_in_future",
                               "--json"], env=pipe.env, cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, (done.stdout, done.stderr)
        reply = json.loads(done.stdout)
        assert [(i["event_id"], i["result"]) for i in reply["items"]] == [(waiting["event_id"], "accepted")], reply
        wait_until(lambda: any(r["status"] == "recorded" for r in device.sent[waiting["event_id"]].receipts), 60,
                   0.2, "the redriven record's `recorded` receipt")

        entries = ledger(pipe)
        assert Counter(e.idem for e in entries)[key] == 1
        assert Counter(e.type for e in entries)["torque_event"] == 2
        steps = [parse_clock_step(e.body) for e in entries if e.type == CLOCK_STEP]
        assert [round(s.delta_ms / 60_000) for s in steps] == [10], steps
        assert pipe.dlq("validate") == []  # the re-sent record's row was stale, the redriven one's taken
    finally:
        pipe.stop()


def test_clock_steps_backwards_and_forwards_keep_ledger_time_in_order(broker, tmp_path, seam):
    pipe = Pipeline(broker, tmp_path / "data", mro_clock_offset_file=str(seam))
    pipe.start()
    topics = Topics(pipe.station)
    recorder = TopicRecorder(pipe.config, (topics.alarm,)).start()
    try:
        device = pipe.device(*DEVICE)
        assert final(device, send(device, torque(2, pipe.station)))["status"] == "recorded"

        set_clock(seam, -3600)  # set back an hour while nothing arrives: sign records it on its own
        wait_until(lambda: [e for e in ledger(pipe) if e.type == CLOCK_STEP], 30, 0.2,
                   "the backward step's ledger entry")
        behind = datetime.now(UTC) - timedelta(hours=1)
        assert final(device, send(device, torque(3, pipe.station, behind)))["status"] == "recorded"

        set_clock(seam, 0)
        assert final(device, send(device, torque(4, pipe.station)))["status"] == "recorded"

        entries = ledger(pipe)
        order = TimeOrder()
        assert [order.see(e.seq, e.recorded_at) for e in entries] == [None] * len(entries)
        assert [e.type for e in entries] == ["torque_event", CLOCK_STEP, "torque_event", CLOCK_STEP,
                                             "torque_event"]
        assert [round(parse_clock_step(e.body).delta_ms / 60_000) for e in entries if e.type == CLOCK_STEP] == [
            -60, 60]
        # the record signed while the clock was an hour behind keeps the ledger's time, not the clock's
        assert entries[2].recorded_at == entries[0].recorded_at
        wait_until(lambda: len([m for m in recorder.of(topics.alarm) if m.payload["alarm"] == CLOCK_STEP]) == 2,
                   20, 0.2, "two clock_step alarms")
        assert {m.payload["service"] for m in recorder.of(topics.alarm) if m.payload["alarm"] == CLOCK_STEP} == {
            "sign"}
    finally:
        recorder.stop()
        pipe.stop()


def test_require_sync_holds_records_until_the_clock_is_synchronised(broker, tmp_path, seam):
    set_clock(seam, 0, synchronised=False)
    pipe = Pipeline(broker, tmp_path / "data", mro_clock_offset_file=str(seam), mro_clock_require_sync="true")
    pipe.start()
    try:
        device = pipe.device(*DEVICE)
        event_id = send(device, torque(5, pipe.station))
        wait_until(lambda: statuses_of(pipe, "validate").get("held") == 1, 30, 0.2, "the record to be held")
        clock = statuses_of(pipe, "validate")["clock"]
        assert clock == {"synchronised": False, "source": "seam", "require_sync": True}
        assert pipe.ledger() == [] and device.sent[event_id].final is None

        set_clock(seam, 0, synchronised=True)
        assert final(device, event_id)["status"] == "recorded"
        wait_until(lambda: statuses_of(pipe, "validate").get("held") == 0, 30, 0.2, "nothing held")
        assert statuses_of(pipe, "validate")["clock"]["synchronised"] is True
        assert [parse_entry(e.entry).type for e in pipe.ledger()] == ["torque_event"]
    finally:
        pipe.stop()
