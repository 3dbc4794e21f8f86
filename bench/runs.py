"""The measured runs on one broker: raw reference, end-to-end throughput, latency at a fixed load."""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.fleet import Fleet, UplinkStub
from bench.monitor import ProcessSampler, StageProbe, wait_progress
from bench.raw import RAW_TOPIC, raw_latency, raw_throughput
from bench.stats import percentiles
from tests.brokers import start_broker
from tests.pipeline import Pipeline

STAGES = ("ingest", "validate", "sign")
# Production defaults (shared/runtime/config.py), not the test harness's shorter redelivery timeout:
# a 20,000-record backlog must not trigger republishing that a real box would not do.
# The per-device rate limit is off: a handful of bench devices stand in for a whole fleet.
PIPELINE_SETTINGS = {"MRO_LOG_LEVEL": "WARNING", "MRO_STAGE_REDELIVER_AFTER_S": "15",
                     "MRO_STAGE_STATUS_INTERVAL_S": "2", "MRO_LIMITS_DEVICE_RATE_PER_S": "0"}
# The ledger has not grown for this long: records are lost (or the pipeline hangs).
STALL_S = float(os.environ.get("BENCH_STALL_S", 60))


@dataclass
class Plan:
    raw_n: int
    e2e_n: int
    rate: float
    latency_s: float
    raw_latency_s: float
    seed: int
    uplink_stub: bool = True
    device_nodelay: bool = True
    stage_env: dict[str, str] = field(default_factory=dict)


def _system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine; guest time is already inside user time."""
    times = psutil.cpu_times()._asdict()
    total = sum(v for k, v in times.items() if k not in ("guest", "guest_nice"))
    idle = times["idle"] + times.get("iowait", 0.0)
    return total - idle, total


class _Phase:
    """CPU seconds per process, system CPU, LMDB commits and RSS peaks across one run."""

    def __init__(self, name: str, sampler: ProcessSampler, probe: StageProbe) -> None:
        self.name, self.sampler, self.probe = name, sampler, probe

    def __enter__(self):
        self.cpu0, self.sys0, self.tx0 = self.sampler.cpu(), _system_busy(), self.probe.txnids()
        self.t0 = time.perf_counter()
        self.sampler.phase(self.name)
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.phase(None)
        self.seconds = time.perf_counter() - self.t0
        cpu1, sys1, tx1 = self.sampler.cpu(), _system_busy(), self.probe.txnids()
        self.cpu_s = {k: round(cpu1[k] - self.cpu0[k], 2) for k in cpu1 if k in self.cpu0}
        busy, total = sys1[0] - self.sys0[0], sys1[1] - self.sys0[1]
        self.system_busy = busy / total if total else 0.0
        self.commits = {k: tx1[k] - self.tx0[k] for k in tx1}

    def figures(self, records: int) -> dict:
        ncpu = psutil.cpu_count() or 1
        return {
            "cpu_s": self.cpu_s,
            "cpu_us_per_record": {k: round(1e6 * v / records) for k, v in self.cpu_s.items()}
            if records
            else {},
            "cpu_pct": {k: round(100 * v / self.seconds, 1) for k, v in self.cpu_s.items()},
            "system_busy_pct": round(100 * self.system_busy, 1),
            "unattributed_cpu_pct": round(
                max(
                    0.0,
                    100 * (self.system_busy * ncpu)
                    - sum(100 * v / self.seconds for v in self.cpu_s.values()),
                ),
                1,
            ),
            "commits": self.commits,
            "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in self.sampler.peaks.get(self.name, {}).items()},
            "peak_anon_mb": {
                k: round(v / 2**20, 1) for k, v in self.sampler.anon_peaks.get(self.name, {}).items()
            },
        }


def end_to_end(fleet: Fleet, probe: StageProbe, sampler: ProcessSampler, n: int, rng: random.Random) -> dict:
    records = fleet.records(rng, n)
    base_ledger, base_held = probe.ledger(), probe.held()
    done_at: dict[str, float] = {}
    resends0 = fleet.resends
    with _Phase("e2e", sampler, probe) as phase:
        start = time.perf_counter()
        for device, event_id, payload in records:
            device.send(event_id, payload)
        queued_s = time.perf_counter() - start
        batches = _BatchWatch(probe)

        def watch(now: float) -> None:
            for stage, count in batches.poll().items():
                if stage != "sign" and stage not in done_at and count - base_held[stage] >= n:
                    done_at[stage] = now - start

        reached, _, value = wait_progress(probe.ledger, base_ledger + n, stall_s=STALL_S, cap_s=900,
                                          on_stall=fleet.resend, watch=watch)
        elapsed = time.perf_counter() - start
        if reached:
            done_at["sign"] = elapsed
    recorded = _count_receipts(fleet, [r[1] for r in records], "recorded", wait_s=10 if reached else 0)
    commits = phase.commits
    return {
        "n": n,
        "ledger_added": value - base_ledger,
        "complete": reached,
        "seconds": round(elapsed, 3),
        "rate": (value - base_ledger) / elapsed if elapsed else 0.0,
        "publish_queued_s": round(queued_s, 3),
        "stage_done_s": {k: round(v, 2) for k, v in done_at.items()},
        "records_per_commit": {k: round(n / c, 1) if c else None for k, c in commits.items()},
        "largest_commit": batches.largest,
        "recorded_receipts": recorded,
        "device_resends": fleet.resends - resends0,
        **phase.figures(value - base_ledger),
    }


class _BatchWatch:
    """The largest number of records one commit added, per stage: polled every 20 ms, a poll
    in which LMDB's txnid moved by exactly one shows the size of that one commit exactly."""

    def __init__(self, probe: StageProbe) -> None:
        self.probe = probe
        self.last = self._snap()
        self.largest = {name: 0 for name in self.last}

    def _snap(self) -> dict[str, tuple[int, int]]:
        held, txn = self.probe.held(), self.probe.txnids()
        return {name: (txn[name], held[name]) for name in held}

    def poll(self) -> dict[str, int]:
        snap = self._snap()
        for name, (txn, held) in snap.items():
            last_txn, last_held = self.last[name]
            if txn - last_txn == 1:
                self.largest[name] = max(self.largest[name], held - last_held)
        self.last = snap
        return {name: held for name, (_, held) in snap.items()}


def latency(fleet: Fleet, probe: StageProbe, sampler: ProcessSampler, rate: float, seconds: float,
            rng: random.Random) -> dict:
    n = max(1, int(rate * seconds))
    records = fleet.records(rng, n)
    base_ledger = probe.ledger()
    sent_at: dict[str, float] = {}
    with _Phase("latency", sampler, probe) as phase:
        start = time.perf_counter()
        for i, (device, event_id, payload) in enumerate(records):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent_at[event_id] = time.perf_counter()
            device.send(event_id, payload)
        offered = n / (time.perf_counter() - start)
        reached, _, value = wait_progress(probe.ledger, base_ledger + n, stall_s=STALL_S, cap_s=300,
                                          on_stall=fleet.resend)
    _count_receipts(fleet, list(sent_at), "recorded", wait_s=10 if reached else 0)
    recorded = [
        (fleet.arrived(e, "recorded") - t) * 1000 for e, t in sent_at.items() if fleet.arrived(e, "recorded")
    ]
    received = [
        (fleet.arrived(e, "received") - t) * 1000 for e, t in sent_at.items() if fleet.arrived(e, "received")
    ]
    return {
        "n": n,
        "offered_rate": round(offered, 1),
        "ledger_added": value - base_ledger,
        "complete": reached,
        "recorded": percentiles(recorded),
        "received": percentiles(received),
        "records_per_commit": {k: round(n / c, 1) if c else None for k, c in phase.commits.items()},
        **phase.figures(value - base_ledger),
    }


def _count_receipts(fleet: Fleet, event_ids: list[str], status: str, wait_s: float) -> int:
    deadline = time.perf_counter() + wait_s
    while True:
        count = sum(1 for e in event_ids if fleet.arrived(e, status) is not None)
        if count == len(event_ids) or time.perf_counter() >= deadline:
            return count
        time.sleep(0.05)


def run_broker(kind: str, plan: Plan, root: Path, say) -> dict:
    data_dir = root / kind
    rng = random.Random(plan.seed)
    result: dict = {"broker": kind}
    broker = start_broker(kind, data_dir)
    pipeline = stub = probe = sampler = None
    try:
        say(f"[{kind}] raw QoS1 reference: {plan.raw_n} x 700 B ...")
        result["raw"] = raw_throughput(broker, plan.raw_n, RAW_TOPIC)
        say(f"[{kind}] raw latency at {plan.rate:g} msg/s for {plan.raw_latency_s:g} s ...")
        result["raw_latency"] = raw_latency(
            broker, plan.rate, plan.raw_latency_s, RAW_TOPIC
        )
        if plan.uplink_stub:
            stub = UplinkStub(broker, "HGR1")
        pipeline = Pipeline(broker, data_dir, **{**PIPELINE_SETTINGS, **plan.stage_env})
        say(f"[{kind}] starting ingest, validate, sign ...")
        pipeline.start()
        fleet = Fleet(pipeline, nodelay=plan.device_nodelay)
        probe = StageProbe(data_dir)
        pids = {name: pipeline.procs[name].pid for name in STAGES}
        pids[f"broker({kind})"] = broker.pid
        pids["bench"] = os.getpid()
        result["pids"] = pids
        sampler = ProcessSampler(pids)
        sampler.start()
        time.sleep(1.0)
        idle = sampler.memory()
        result["idle_rss_mb"] = {k: round(rss / 2**20, 1) for k, (rss, _) in idle.items()}
        result["idle_anon_mb"] = {k: round(anon / 2**20, 1) for k, (_, anon) in idle.items()}
        say(
            f"[{kind}] end-to-end: {plan.e2e_n} records from {len(fleet.devices)} devices, "
            "as fast as they go ..."
        )
        result["e2e"] = end_to_end(fleet, probe, sampler, plan.e2e_n, rng)
        if not result["e2e"]["complete"]:
            say(f"[{kind}] ledger stuck at {result['e2e']['ledger_added']}/{plan.e2e_n}: records lost")
            return result
        time.sleep(1.0)
        say(f"[{kind}] latency: {plan.rate:g} records/s for {plan.latency_s:g} s ...")
        result["latency"] = latency(fleet, probe, sampler, plan.rate, plan.latency_s, rng)
        result["uplink_stub_records"] = stub.records if stub else None
        return result
    finally:
        if sampler:
            sampler.stop()
            result["peak_rss_mb"] = _merge_peaks(sampler.peaks)
            result["peak_anon_mb"] = _merge_peaks(sampler.anon_peaks)
        if probe:
            probe.close()
        if pipeline:
            pipeline.stop()
            result["stage_log_errors"] = {name: _errors_in(pipeline.logs / f"{name}.log") for name in STAGES}
        if stub:
            stub.stop()
        broker.stop()


def _merge_peaks(peaks: dict[str, dict[str, int]]) -> dict[str, float]:
    merged: dict[str, int] = {}
    for phase in peaks.values():
        for name, value in phase.items():
            merged[name] = max(merged.get(name, 0), value)
    return {k: round(v / 2**20, 1) for k, v in merged.items()}


def _errors_in(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(errors="replace").splitlines() if '"level": "error"' in line
                   or '"level":"error"' in line or "Traceback" in line)
    except FileNotFoundError:
        return 0


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
