"""Device intake with stock clients: device publish -> ledger commit, on each broker.

`python -m bench --only intake` (part of `make bench`), or `python -m bench.intake
[--quick] [--brokers mosquitto,embedded] [--mosquitto-conf FILE]`.

The devices are the ones that cannot re-send (tests/stockclients.py): `mosquitto_pub -l -q 1`
bursts, one connection per burst, and plain paho clients with no receipt handling. Per broker,
in one run:

- raw: the same broker's QoS 1 pub->sub rate (bench.raw, the pipeline bench's reference);
- e2e: N records from four devices in mosquitto_pub bursts of 500, as fast as they go; rate =
  ledger entries added / time from the first publish to the last ledger commit; ratio = e2e/raw;
- latency at 200 records/s (four paho devices at 50/s each): publish -> PUBACK (on_publish),
  publish -> `received` (ingest's commit) and publish -> `recorded` (the ledger), from the
  receipts the services user sees;
- window: how long a PUBACKed record is not yet in ingest's LMDB (PUBACK -> `received`; an
  upper bound, the receipt follows the commit), at 200/s and in a paho burst at full speed;
- broker kill -9 during mosquitto_pub bursts, with ingest running and with ingest down: the
  PUBACKed records that never reached the ledger, per kill.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.fleet import UplinkStub
from bench.monitor import StageProbe
from bench.raw import RAW_TOPIC, raw_throughput
from bench.stats import percentiles
from tests.pipeline import Pipeline
from tests.stockclients import (
    BurstRunner,
    make_records,
    paho_burst,
    receipts_watcher,
    register_devices,
    settle,
)

FLEET = (("rfid_reader", "INTAKE-RFID"), ("barcode_scanner", "INTAKE-BCS"), ("torque_wrench", "INTAKE-TQW"),
         ("tablet", "INTAKE-TAB"))
SETTINGS = {
    "MRO_LOG_LEVEL": "WARNING",
    "MRO_STAGE_REDELIVER_AFTER_S": "15",
    "MRO_STAGE_STATUS_INTERVAL_S": "2",
    "MRO_LIMITS_DEVICE_RATE_PER_S": "0",  # four bench devices stand in for a fleet: no per-device limit
}
# (raw messages, end-to-end records, broker kills per mode)
FULL = {"mosquitto": (20_000, 12_000, 3), "embedded": (12_000, 6_000, 3)}
QUICK = {"mosquitto": (5_000, 2_000, 1), "embedded": (2_000, 1_000, 1)}
BURST = 500


class Receipts:
    """First arrival (perf_counter) of each (event_id, status) on mro/<station>/receipt/+."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, event_id, status, now: float) -> None:
        with self._lock:
            self.at.setdefault((event_id, status), now)

    def get(self, event_id: str, status: str) -> float | None:
        return self.at.get((event_id, status))


def _ms(pairs) -> dict:
    return percentiles([(b - a) * 1000 for a, b in pairs if a is not None and b is not None])


def end_to_end(broker, pipeline, probe: StageProbe, devices, n: int, rng: random.Random, seen: set) -> dict:
    per_device = max(1, n // len(devices))
    records = {d.device_id: make_records(rng, d, per_device, seen) for d in devices}
    base = probe.ledger()
    runner = BurstRunner(broker, devices, records, burst_size=BURST, clients=("mosquitto_pub",),
                         burst_timeout_s=300)
    start = time.perf_counter()
    runner.run(600)
    acked_s = time.perf_counter() - start
    target = base + len(runner.acked)
    last, last_move = probe.ledger(), time.perf_counter()
    while last < target and time.perf_counter() - last_move < 30:
        time.sleep(0.01)
        value = probe.ledger()
        if value != last:
            last, last_move = value, time.perf_counter()
    elapsed = (last_move if last >= target else time.perf_counter()) - start
    added = last - base
    return {"n": per_device * len(devices), "acked": len(runner.acked), "ledger_added": added,
            "complete": added >= len(runner.acked) == per_device * len(devices),
            "bursts": len(runner.bursts), "burst_errors": sum(1 for b in runner.bursts if b.error),
            "puback_all_s": round(acked_s, 3), "seconds": round(elapsed, 3),
            "rate": added / elapsed if elapsed else 0.0,
            "puback_rate": len(runner.acked) / acked_s if acked_s else 0.0}


def paced(broker, devices, receipts: Receipts, rate: float, seconds: float, rng: random.Random, seen: set,
          probe: StageProbe) -> dict:
    """Four paho devices, one connection each, together at `rate` records/s."""
    per_device = max(1, int(rate * seconds / len(devices)))
    base = probe.ledger()
    results = []
    threads = []
    for device in devices:
        records = make_records(rng, device, per_device, seen)

        def go(device=device, records=records) -> None:
            results.append(paho_burst(broker.port, device, records, rate=rate / len(devices),
                                      timeout_s=seconds + 60))

        threads.append(threading.Thread(target=go))
    for thread in threads:
        thread.start()
        time.sleep(1 / rate)  # interleave the devices instead of four publishes at once
    for thread in threads:
        thread.join(seconds + 90)
    return _timings(results, receipts, probe, base)


def full_speed(broker, devices, receipts: Receipts, n: int, rng: random.Random, seen: set,
               probe: StageProbe) -> dict:
    """One paho burst per device at full speed: the window under load."""
    base = probe.ledger()
    records = {d.device_id: make_records(rng, d, n // len(devices), seen) for d in devices}
    results = []
    threads = [threading.Thread(target=lambda d=d: results.append(
        paho_burst(broker.port, d, records[d.device_id], timeout_s=120))) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    return _timings(results, receipts, probe, base)


def _timings(results, receipts: Receipts, probe: StageProbe, base: int) -> dict:
    sent = {e: t for r in results for e, t in r.sent_at.items()}
    puback = {e: t for r in results for e, t in r.puback_at.items()}
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and any(receipts.get(e, "recorded") is None for e in puback):
        time.sleep(0.05)
    recorded = {e: receipts.get(e, "recorded") for e in sent}
    received = {e: receipts.get(e, "received") for e in sent}
    window = [max(0.0, received[e] - puback[e]) * 1000 for e in puback if received[e] is not None]
    return {
        "n": len(sent),
        "acked": len(puback),
        "recorded": sum(1 for v in recorded.values() if v),
        "ledger_added": probe.ledger() - base,
        "complete": len(puback) == len(sent) and all(recorded[e] for e in puback),
        "offered_rate": round(len(sent) / max(1e-9, max(sent.values()) - min(sent.values())), 1)
        if sent
        else 0,
        "puback": _ms((sent[e], puback[e]) for e in puback),
        "publish_received": _ms((sent[e], received[e]) for e in sent),
        "publish_recorded": _ms((sent[e], recorded[e]) for e in sent),
        "window": percentiles(window),
    }


def broker_kills(
    broker, pipeline, devices, kills: int, rng: random.Random, seen: set, ingest_down: bool
) -> dict:
    """mosquitto_pub bursts (4 x 500 records in bursts of 100); one kill -9 of the broker at a
    random moment in them, restart; what was PUBACKed and never reached the ledger."""
    per_kill = []
    for _ in range(kills):
        if ingest_down:
            pipeline.kill("ingest")
        records = {d.device_id: make_records(rng, d, 500, seen) for d in devices}
        runner = BurstRunner(broker, devices, records, burst_size=100, clients=("mosquitto_pub",),
                             burst_timeout_s=30).start()
        time.sleep(rng.uniform(0.3, 1.0))
        broker.kill()
        time.sleep(0.3)
        broker.start()
        runner.join(120)
        if ingest_down:
            pipeline.restart("ingest")
        # longer than stage.redeliver_after_s (15 s here): a stage message the kill lost comes back then
        outcome = settle(pipeline, runner.acked, runner.sent, stall_s=30, cap_s=180)
        per_kill.append({"acked": outcome.acked, "sent": outcome.sent, "lost": len(outcome.lost),
                         "duplicated": len(outcome.duplicated)})
    return {"kills": kills, "lost_per_kill": [k["lost"] for k in per_kill],
            "lost": sum(k["lost"] for k in per_kill), "acked": sum(k["acked"] for k in per_kill),
            "duplicated": sum(k["duplicated"] for k in per_kill), "runs": per_kill}


def run_one(kind: str, root: Path, *, quick: bool, rate: float, latency_s: float, seed: int, say) -> dict:
    from tests.brokers import start_broker

    raw_n, e2e_n, kills = (QUICK if quick else FULL)[kind]
    data_dir = root / kind
    rng, seen = random.Random(seed), set()
    result: dict = {"broker": kind}
    broker = start_broker(kind, data_dir)
    pipeline = stub = watcher = probe = None
    try:
        say(f"[intake/{kind}] raw QoS1 reference: {raw_n} x 700 B ...")
        result["raw"] = raw_throughput(broker, raw_n, RAW_TOPIC)
        stub = UplinkStub(broker, "HGR1")
        pipeline = Pipeline(broker, data_dir, **SETTINGS)
        pipeline.start()
        devices = register_devices(broker, FLEET)
        probe = StageProbe(data_dir)
        receipts = Receipts()
        watcher = receipts_watcher(broker, receipts)
        broker_proc = psutil.Process(broker.pid)
        cpu0 = sum(broker_proc.cpu_times()[:2])
        say(
            f"[intake/{kind}] end-to-end: {e2e_n} records, mosquitto_pub bursts of {BURST} from 4 devices ..."
        )
        result["e2e"] = end_to_end(broker, pipeline, probe, devices, e2e_n, rng, seen)
        result["e2e"]["broker_cpu_us_per_record"] = round(
            1e6 * (sum(broker_proc.cpu_times()[:2]) - cpu0) / max(1, result["e2e"]["ledger_added"]))
        time.sleep(1.0)
        say(f"[intake/{kind}] latency: paho at {rate:g} records/s for {latency_s:g} s ...")
        result["latency"] = paced(broker, devices, receipts, rate, latency_s, rng, seen, probe)
        say(f"[intake/{kind}] PUBACK -> ingest commit window at full speed ...")
        result["burst_window"] = full_speed(
            broker, devices, receipts, 2000 if not quick else 800, rng, seen, probe
        )
        watcher.stop()
        watcher = None
        probe.close()  # settle() reads the ledger itself: LMDB allows one env per file per process
        probe = None
        for mode, down in (("ingest_running", False), ("ingest_down", True)):
            say(
                f"[intake/{kind}] {kills} broker kill -9 during mosquitto_pub bursts, "
                f"{mode.replace('_', ' ')} ..."
            )
            result[f"kill_{mode}"] = broker_kills(broker, pipeline, devices, kills, rng, seen, down)
        return result
    finally:
        if watcher:
            watcher.stop()
        if probe:
            probe.close()
        if pipeline:
            pipeline.stop()
        if stub:
            stub.stop()
        broker.stop()


def run_intake_bench(quick: bool = False, brokers: list[str] | None = None, rate: float = 200.0,
                     seed: int = 2026, latency_s: float | None = None, keep: Path | None = None) -> dict:
    from bench.report import intake_table

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    root = keep or Path(tempfile.mkdtemp(prefix="mro-bench-intake-"))
    latency_s = latency_s or (5.0 if quick else 15.0)
    results = []
    try:
        for kind in brokers or ["mosquitto", "embedded"]:
            try:
                result = run_one(kind, root, quick=quick, rate=rate, latency_s=latency_s, seed=seed, say=say)
            except Exception as exc:  # one broker failing must not hide the other's figures
                say(f"[intake/{kind}] failed: {type(exc).__name__}: {exc}")
                result = {"broker": kind, "error": f"{type(exc).__name__}: {exc}"}
            results.append(result)
            print(intake_table(result), flush=True)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"rate": rate, "latency_s": latency_s, "quick": quick, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--brokers", default=os.environ.get("BENCH_BROKERS", "mosquitto,embedded"))
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument(
        "--mosquitto-conf",
        type=Path,
        default=None,
        help="run Mosquitto with this file instead of config/mosquitto/mosquitto.conf (tuning)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.mosquitto_conf:
        import tests.brokers

        tests.brokers.MOSQUITTO_CONF = args.mosquitto_conf.resolve()
    figures = run_intake_bench(quick=args.quick, brokers=[k for k in args.brokers.split(",") if k],
                               rate=args.rate, seed=args.seed, latency_s=args.latency_seconds)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all("error" not in r for r in figures["results"]) else 2


if __name__ == "__main__":
    sys.exit(main())
