"""The Open Protocol bridge end to end, on both brokers: our controller simulator as its own
process on a free loopback port (`python -m mro_edge.simulator.openprotocol`, its result memory
in a state file so it survives kill -9), the bridge (`mro-edge service torque`) and the pipeline
as real processes, the ledger read back from the sign stage's store.

What is held: every tightening reaches the ledger exactly once through kill -9 of the bridge and
of the controller; no result is acknowledged (MID 0062, seen in the controller's memory) before
ingest has committed it; a result the controller sends again after a reconnect is a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from services.torque.mids import TighteningResult, encode
from shared.ledger.entry import parse_entry
from shared.runtime.config import DEFAULT_CONFIG
from tests.brokers import free_port
from tests.edge import TopicRecorder
from tests.pipeline import ROOT, Pipeline, wait_until

CONTROLLER = "TQC-01"  # listed at place BAY1 in the shipped edge.toml
WORK_ORDER = "WO-7781"
OPEN = ("session", "open", "--place", "BAY1", "--work-order", WORK_ORDER, "--registration", "N327HA",
        "--aircraft-serial", "4521", "--ata", "32-41", "--cert-no", "3512874", "--cert-kind", "FAA-AP",
        "--action", "install", "--position", "LH MLG")


class Controller:
    """The simulator as its own process; its state file is the controller's result memory."""

    def __init__(self, tmp_path: Path, count: int, every_s: float = 0.05) -> None:
        self.port = free_port()
        self.state = tmp_path / "controller-state.json"
        self.log = tmp_path / "controller.log"
        self.args = [sys.executable, "-m", "mro_edge.simulator.openprotocol", "--port", str(self.port),
                     "--zone", "Europe/Berlin", "--every", str(every_s), "--count", str(count),
                     "--state", str(self.state), "--identifier", WORK_ORDER, "--ack-timeout", "2", "--seed", "7"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=log, stderr=log)
        wait_until(lambda: b"simulator on" in self.log.read_bytes(), 20, 0.05, "the controller simulator")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def memory(self) -> tuple[list[TighteningResult], list[int]]:
        """(results, acknowledged tightening ids in the order their 0062 came)."""
        if not self.state.exists():
            return [], []
        saved = json.loads(self.state.read_text())
        return msgspec.convert(saved["results"], list[TighteningResult]), saved["acknowledged"]


def site_config(tmp_path: Path, port: int) -> Path:
    """The shipped edge.toml with the simulator configured as controller TQC-01."""
    path = tmp_path / "edge.toml"
    path.write_text(DEFAULT_CONFIG.read_text() + f"""
[torque.controllers.{CONTROLLER}]
host = "127.0.0.1"
port = {port}
zone = "Europe/Berlin"
""")
    return path


def cli(pipeline: Pipeline, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mro_edge", *args], env=pipeline.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr


def torque_entries(pipeline: Pipeline) -> list[dict]:
    parsed = (parse_entry(entry.entry) for entry in pipeline.ledger())
    return [p.body for p in parsed if p.type == "torque_event"]


@pytest.fixture
def hangar(broker, tmp_path):
    """A controller (not yet started) and the pipeline with the bridge configured for it."""
    controller = Controller(tmp_path, count=40, every_s=0.1)
    broker.credentials.set_bridged("torque", [CONTROLLER])  # what `mro-edge run` / `devices init` do
    broker.reload()
    pipeline = Pipeline(broker, tmp_path / "data", MRO_CONFIG=str(site_config(tmp_path, controller.port)),
                        MRO_TORQUE_RECEIPT_TIMEOUT_S="2", MRO_TORQUE_KEEPALIVE_S="1")
    yield controller, pipeline
    pipeline.stop()
    controller.stop()


def test_results_reach_the_ledger_exactly_once_through_kill_9_of_bridge_and_controller(hangar):
    controller, pipeline = hangar
    pipeline.start()
    cli(pipeline, *OPEN)
    controller.start()
    pipeline.start("torque")

    wait_until(lambda: len(torque_entries(pipeline)) >= 8, 60, 0.2, "the first results in the ledger")
    assert len(controller.memory()[1]) < 40, "the stream ended before the kill"
    pipeline.kill("torque")  # kill -9 mid-stream: whatever it was persisting has no 0062
    pipeline.restart("torque")
    wait_until(lambda: len(controller.memory()[1]) >= 20, 60, 0.1, "results acknowledged after the restart")
    assert len(controller.memory()[0]) < 40, "the controller stopped tightening before its kill"
    controller.kill()  # kill -9 of the controller mid-stream; its memory survives in the state file
    controller.start()

    wait_until(lambda: len(controller.memory()[1]) >= 40 and len(torque_entries(pipeline)) >= 40, 90, 0.3,
               "every result acknowledged and in the ledger")
    results, _ = controller.memory()
    bodies = torque_entries(pipeline)
    ids = Counter(b["tightening_id"] for b in bodies)
    assert sorted(ids) == list(range(1, 41)) and set(ids.values()) == {1}, f"not exactly once: {ids}"
    assert len({b["event_id"] for b in bodies}) == 40
    first = next(b for b in bodies if b["tightening_id"] == 1)
    assert first["work_order_id"] == WORK_ORDER and first["device"] == {"kind": "torque_wrench", "id": CONTROLLER}
    assert first["tool"]["serial_number"] == "B0742134" and first["fastener_ref"] == "PSET-3"
    telegram = encode(results[0], 7)[:-1]  # the bridge asks for revision 7, the simulator speaks it
    assert f"telegram SHA-256 {hashlib.sha256(telegram).hexdigest()}" in first["notes"]


def test_nothing_is_acknowledged_before_ingest_committed_it_and_a_repeat_is_a_duplicate(hangar, tmp_path):
    controller, pipeline = hangar
    controller.args[controller.args.index("--count") + 1] = "3"
    pipeline.start("validate", "sign")  # ingest not running: nothing can be made durable
    controller.start()
    pipeline.start("torque")
    wait_until(lambda: len(controller.memory()[0]) == 3, 20, 0.1, "three tightenings on the controller")
    # the bridge published the first result and waits for a receipt that cannot come; the
    # controller re-sends it after its ack timeout (2 s) and the bridge drops the link after its
    # receipt timeout (2 s): several rounds, none acknowledged
    wait_until(lambda: b"persist_failed" in (pipeline.logs / "torque.log").read_bytes(), 20, 0.2,
               "the bridge to give up on a receipt")
    assert controller.memory()[1] == [], "a result was acknowledged before it was durable"

    receipts = TopicRecorder(pipeline.config, (f"mro/HGR1/receipt/{CONTROLLER}",)).start()
    try:
        pipeline.start("ingest")  # no session open: the results are kept as unassigned reads
        wait_until(lambda: sorted(controller.memory()[1]) == [1, 2, 3], 60, 0.2, "all three acknowledged")
        kept = json.loads(subprocess.run([sys.executable, "-m", "mro_edge", "reads", "list", "--json"],
                                         env=pipeline.env, cwd=ROOT, capture_output=True, text=True,
                                         timeout=60).stdout)
        assert sorted(r["device_id"] for r in kept["reads"]) == [CONTROLLER] * 3
        assert {r["reason"] for r in kept["reads"]} == {"no_session"}

        # the controller forgets the last 0062 (as after a power cut right after it) and sends
        # that result again on the next connection: ingest answers it as a duplicate
        controller.kill()
        saved = json.loads(controller.state.read_text())
        saved["acknowledged"] = saved["acknowledged"][:-1]
        controller.state.write_text(json.dumps(saved))
        controller.start()
        wait_until(lambda: controller.memory()[1] == [1, 2, 3], 30, 0.2, "the repeat acknowledged")
        wait_until(lambda: any(m.payload.get("status") == "duplicate" for m in receipts.of(receipts.topics[0])),
                   10, 0.1, "a duplicate receipt")
        again = json.loads(subprocess.run([sys.executable, "-m", "mro_edge", "reads", "list", "--json"],
                                          env=pipeline.env, cwd=ROOT, capture_output=True, text=True,
                                          timeout=60).stdout)
        assert again["total"] == 3, "the repeated result was kept twice"
    finally:
        receipts.stop()
