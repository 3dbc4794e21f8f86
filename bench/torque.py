"""Open Protocol results: controller simulator -> bridge -> ledger commit, on each broker.

`python -m bench --only torque` (part of `make bench`), or `python -m bench.torque [--quick]
[--brokers mosquitto,embedded]`.

The controller is our simulator (`mro_edge.simulator.openprotocol`) in this process, on a free
loopback port; the bridge (`mro-edge service torque`) and ingest, validate and sign are real
processes, with a work session open at the controller's place so every result becomes a ledger
entry. Per broker, in one run:

- raw: the same broker's QoS 1 pub->sub rate, and its pub->sub latency at the latency run's
  rate (bench.raw): the references;
- e2e: N tightenings queued on the controller at once. Open Protocol sends one result at a time
  and the next only after the 0062 of the last, and the bridge sends that 0062 only after
  ingest's receipt (its LMDB commit), so the rate is one round trip per result: controller ->
  bridge -> broker -> ingest commit -> receipt -> bridge -> 0062. rate = N / (first tightening
  -> the ledger holds all N);
- ack latency at `rate` tightenings/s: tightening -> 0062 at the controller (p50/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.fleet import UplinkStub
from bench.monitor import StageProbe, wait_progress
from bench.raw import RAW_TOPIC, raw_latency, raw_throughput
from bench.stats import percentiles
from mro_edge.simulator.openprotocol import SimulatedController
from shared.runtime.config import DEFAULT_CONFIG
from tests.pipeline import ROOT, Pipeline

CONTROLLER = "TQC-01"  # at place BAY1 in the shipped edge.toml
SETTINGS = {"MRO_LOG_LEVEL": "WARNING", "MRO_STAGE_STATUS_INTERVAL_S": "2", "MRO_LIMITS_DEVICE_RATE_PER_S": "0"}
# (raw reference messages, tightenings end to end, seconds of the latency run)
FULL = {"mosquitto": (10_000, 2_000, 20.0), "embedded": (6_000, 1_000, 20.0)}
QUICK = {"mosquitto": (2_000, 300, 5.0), "embedded": (1_000, 200, 5.0)}
OPEN = ("session", "open", "--place", "BAY1", "--work-order", "WO-7781", "--registration", "N327HA",
        "--aircraft-serial", "4521", "--ata", "32-41", "--cert-no", "3512874", "--cert-kind", "FAA-AP",
        "--action", "install", "--position", "LH MLG")


class ControllerThread:
    """The simulated controller on its own event loop thread; `tighten` is called on that loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sim = SimulatedController(zone="UTC", last_calibration=datetime.now(UTC) - timedelta(days=30))
        asyncio.run_coroutine_threadsafe(self.sim.start(), self.loop).result(10)

    def tighten(self, count: int = 1) -> None:
        def burst() -> None:
            for _ in range(count):
                self.sim.tighten(identifier="")
        self.loop.call_soon_threadsafe(burst)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _site(data_dir: Path, port: int) -> Path:
    path = data_dir.parent / f"{data_dir.name}-edge.toml"
    path.write_text(DEFAULT_CONFIG.read_text() + f"""
[torque.controllers.{CONTROLLER}]
host = "127.0.0.1"
port = {port}
zone = "UTC"
""")
    return path


def run_one(kind: str, root: Path, *, quick: bool, rate: float, say) -> dict:
    from tests.brokers import start_broker

    raw_n, e2e_n, latency_s = (QUICK if quick else FULL)[kind]
    data_dir = root / kind
    result: dict = {"broker": kind}
    broker = start_broker(kind, data_dir)
    controller = pipeline = stub = probe = None
    try:
        say(f"[torque/{kind}] raw QoS1 references: {raw_n} x 700 B, then {rate:g}/s for {latency_s:g} s ...")
        result["raw"] = raw_throughput(broker, raw_n, RAW_TOPIC)
        result["raw_latency"] = raw_latency(broker, rate, latency_s, RAW_TOPIC)
        controller = ControllerThread()
        broker.credentials.set_bridged("torque", [CONTROLLER])
        broker.reload()
        stub = UplinkStub(broker, "HGR1")
        pipeline = Pipeline(broker, data_dir, MRO_CONFIG=str(_site(data_dir, controller.sim.port)), **SETTINGS)
        pipeline.start()
        opened = subprocess.run([sys.executable, "-m", "mro_edge", *OPEN], env=pipeline.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        if opened.returncode != 0:
            raise RuntimeError(f"session open failed: {opened.stderr.strip()}")
        pipeline.start("torque")
        probe = StageProbe(data_dir)
        base = probe.ledger()
        controller.tighten()  # warm-up: the link is up and a result has gone all the way
        reached, _, _ = wait_progress(probe.ledger, base + 1, stall_s=30, cap_s=60)
        if not reached:
            raise RuntimeError("the warm-up result never reached the ledger (see the torque log)")

        say(f"[torque/{kind}] end-to-end: {e2e_n} tightenings queued at once ...")
        base, first_id = probe.ledger(), len(controller.sim.results) + 1
        start = time.perf_counter()
        controller.tighten(e2e_n)
        reached, seconds, value = wait_progress(probe.ledger, base + e2e_n, stall_s=30, cap_s=600)
        acks = [controller.sim.acknowledged_at.get(i) for i in range(first_id, first_id + e2e_n)]
        acked = [t for t in acks if t is not None]
        result["e2e"] = {"n": e2e_n, "ledger_added": value - base, "complete": reached, "seconds": seconds,
                         "rate": (value - base) / seconds if seconds else 0.0,
                         "ack_rate": len(acked) / (max(acked) - start) if acked else 0.0}

        say(f"[torque/{kind}] ack latency: {rate:g} tightenings/s for {latency_s:g} s ...")
        n = max(1, int(rate * latency_s))
        first_id = len(controller.sim.results) + 1
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            controller.tighten()
        ids = range(first_id, first_id + n)
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline and not all(i in controller.sim.acknowledged_at for i in ids):
            time.sleep(0.05)
        sim = controller.sim
        latencies = [(sim.acknowledged_at[i] - sim.tightened_at[i]) * 1000 for i in ids if i in sim.acknowledged_at]
        result["ack_latency"] = {"n": n, "rate": rate, **percentiles(latencies)}
    finally:
        for name, close in (("probe", probe and probe.close), ("pipeline", pipeline and pipeline.stop),
                            ("uplink stub", stub and stub.stop), ("controller", controller and controller.close)):
            if close:
                try:
                    close()
                except Exception as exc:  # a bench cleans up what it can
                    say(f"[torque/{kind}] {name} cleanup: {type(exc).__name__}: {exc}")
        broker.stop()
    return result


def table(result: dict) -> str:
    kind = result["broker"]
    lines = ["", f"=== torque (Open Protocol): {kind} " + "=" * (68 - len(kind))]
    if "error" in result:
        return "\n".join(lines + [f"    failed: {result['error']}"])
    raw, raw_lat, e2e, lat = result["raw"], result["raw_latency"], result["e2e"], result["ack_latency"]
    row = "{:<44} {:>18}  {}"
    lines.append(row.format("raw broker QoS1 pub->sub", f"{raw['rate']:,.0f} msg/s",
                            f"{raw['n']:,} x {raw['bytes']} B (same run)"))
    lines.append(row.format(f"results simulator->ledger ({e2e['ledger_added']:,}/{e2e['n']:,})",
                            f"{e2e['rate']:,.0f} results/s",
                            f"{e2e['rate'] / raw['rate']:.3f} x raw; one result in flight (0062 before the next)"))
    lines.append(row.format(f"raw broker pub->sub latency at {raw_lat['rate']:g}/s",
                            f"p50 {raw_lat['p50_ms']:.1f} ms", f"p99 {raw_lat['p99_ms']:.1f} ms (same run)"))
    lines.append(row.format(f"tightening->0062 at {lat['rate']:g}/s ({lat['count']}/{lat['n']})",
                            f"p50 {lat['p50_ms']:.1f} ms", f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms"))
    return "\n".join(lines)


def run_torque_bench(quick: bool = False, brokers: list[str] | None = None, rate: float = 10.0,
                     **_ignored: object) -> dict:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="mro-bench-torque-"))
    results = []
    try:
        for kind in brokers or ["mosquitto", "embedded"]:
            try:
                result = run_one(kind, root, quick=quick, rate=rate, say=say)
            except Exception as exc:  # one broker failing must not hide the other's figures
                say(f"[torque/{kind}] failed: {type(exc).__name__}: {exc}")
                result = {"broker": kind, "error": f"{type(exc).__name__}: {exc}"}
            results.append(result)
            print(table(result), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"rate": rate, "quick": quick, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torque", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--brokers", default=os.environ.get("BENCH_BROKERS", "mosquitto,embedded"))
    parser.add_argument("--rate", type=float, default=10.0, help="tightenings/s of the latency run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_torque_bench(quick=args.quick, brokers=[k for k in args.brokers.split(",") if k], rate=args.rate)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all("error" not in r for r in figures["results"]) else 2


if __name__ == "__main__":
    sys.exit(main())
