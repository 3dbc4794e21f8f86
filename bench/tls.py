"""MQTT over TLS against plain MQTT, back to back in one run, on each broker (issue 13).

`python -m bench --only tls` (part of `make bench`), or `python -m bench.tls [--quick]
[--brokers mosquitto,embedded]`.

Per broker, two runs with the same settings, records and seed: `plain` (mqtt://, as today) and
`tls` (mqtts:// with a station CA from shared.runtime.pki: the four devices, the three stages
and the stand-in uplink all connect over TLS, host name verified, passwords as usual). Each run
is the pipeline bench's own measurement (bench.runs): end-to-end throughput from the four
simulator devices (rate = ledger entries / time to the last ledger commit), then latency at a
fixed offered load: publish -> PUBACK (paho's on_publish) and publish -> `recorded` receipt.
The `tls` / `plain` ratios say what TLS costs on this box.
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

from bench.fleet import Fleet, UplinkStub
from bench.monitor import ProcessSampler, StageProbe
from bench.runs import PIPELINE_SETTINGS, STAGES, end_to_end, latency
from bench.stats import percentiles
from shared.runtime import pki
from tests.brokers import BrokerTls, start_broker
from tests.pipeline import Pipeline

# (end-to-end records, latency run seconds) per run; --quick: about a minute per broker for both modes
FULL = (6_000, 15.0)
QUICK = (1_500, 5.0)
MODES = ("plain", "tls")


class PubackTimer:
    """publish -> PUBACK of every device publish, from paho's on_publish (by message id).

    paho calls on_publish holding its own message lock, which publish() also takes: so this
    lock is never held across publish(). A PUBACK that beats the bookkeeping of its publish
    is kept until that bookkeeping arrives."""

    def __init__(self, fleet: Fleet) -> None:
        self._lock = threading.Lock()
        self._sent: dict[tuple[str, int], float] = {}
        self._early: dict[tuple[str, int], float] = {}
        self.ms: list[float] = []
        for device in fleet.devices.values():
            self._wrap(device)

    def _wrap(self, device) -> None:
        client, publish = device.client, device.client.publish
        key = device.device_id

        def timed_publish(topic, payload=None, qos=0, retain=False, properties=None):
            started = time.perf_counter()
            info = publish(topic, payload, qos=qos, retain=retain, properties=properties)
            with self._lock:
                acked = self._early.pop((key, info.mid), None)
                if acked is None:
                    self._sent[(key, info.mid)] = started
                else:
                    self.ms.append((acked - started) * 1000)
            return info

        def on_publish(_client, _userdata, mid, _reason, _properties) -> None:
            now = time.perf_counter()
            with self._lock:
                started = self._sent.pop((key, mid), None)
                if started is None:
                    self._early[(key, mid)] = now
                else:
                    self.ms.append((now - started) * 1000)

        client.publish = timed_publish
        client.on_publish = on_publish

    def take(self) -> dict:
        with self._lock:
            taken, self.ms = self.ms, []
        return percentiles(taken)


def run_mode(kind: str, mode: str, root: Path, ca_dir: Path, *, n: int, rate: float, seconds: float,
             seed: int, say) -> dict:
    data_dir = root / f"{kind}-{mode}"
    rng = random.Random(seed)
    broker = start_broker(kind, data_dir, tls=BrokerTls(ca_dir) if mode == "tls" else None)
    result: dict = {"broker": kind, "mode": mode, "url": broker.url.split("://")[0]}
    pipeline = stub = probe = sampler = None
    try:
        stub = UplinkStub(broker, "HGR1")
        pipeline = Pipeline(broker, data_dir, **PIPELINE_SETTINGS)
        pipeline.start()
        fleet = Fleet(pipeline)
        pubacks = PubackTimer(fleet)
        probe = StageProbe(data_dir)
        pids = {name: pipeline.procs[name].pid for name in STAGES}
        pids[f"broker({kind})"] = broker.pid
        sampler = ProcessSampler(pids)
        sampler.start()
        time.sleep(1.0)
        say(f"[tls/{kind}/{mode}] end-to-end: {n} records from {len(fleet.devices)} devices ...")
        e2e = end_to_end(fleet, probe, sampler, n, rng)
        result["e2e"] = {k: e2e[k] for k in ("n", "ledger_added", "complete", "seconds", "rate",
                                             "cpu_us_per_record")}
        result["e2e"]["puback"] = pubacks.take()
        if not e2e["complete"]:
            return result
        time.sleep(1.0)
        say(f"[tls/{kind}/{mode}] latency: {rate:g} records/s for {seconds:g} s ...")
        lat = latency(fleet, probe, sampler, rate, seconds, rng)
        result["latency"] = {k: lat[k] for k in ("n", "offered_rate", "ledger_added", "complete", "recorded",
                                                 "cpu_us_per_record")}
        result["latency"]["puback"] = pubacks.take()
        return result
    finally:
        if sampler:
            sampler.stop()
        if probe:
            probe.close()
        if pipeline:
            pipeline.stop()
        if stub:
            stub.stop()
        broker.stop()


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def tls_table(kind: str, runs: dict[str, dict]) -> str:
    lines = [f"\n=== TLS vs plain MQTT on {kind} (same run, same settings) ===",
             f"{'':8} {'e2e rec/s':>10} {'PUBACK p50/p99 ms':>20} {'recorded p50/p99 ms':>22} "
             f"{'broker us/rec':>14}"]
    for mode in MODES:
        run = runs.get(mode) or {}
        if "error" in run:
            lines.append(f"{mode:8} failed: {run['error']}")
            continue
        e2e, lat = run.get("e2e", {}), run.get("latency", {})
        puback, recorded = lat.get("puback", {}), lat.get("recorded", {})
        broker_us = next((v for k, v in lat.get("cpu_us_per_record", {}).items() if k.startswith("broker")), None)
        lines.append(f"{mode:8} {_f(e2e.get('rate'), 0):>10} "
                     f"{_f(puback.get('p50_ms')) + ' / ' + _f(puback.get('p99_ms')):>20} "
                     f"{_f(recorded.get('p50_ms')) + ' / ' + _f(recorded.get('p99_ms')):>22} {_f(broker_us, 0):>14}")
    plain, tls = runs.get("plain", {}), runs.get("tls", {})
    if plain.get("e2e", {}).get("rate") and tls.get("e2e", {}).get("rate"):
        lines.append(f"TLS / plain throughput: {tls['e2e']['rate'] / plain['e2e']['rate']:.2f}")
    return "\n".join(lines)


def run_tls_bench(quick: bool = False, brokers: list[str] | None = None, rate: float = 200.0,
                  seed: int = 2026, latency_s: float | None = None) -> dict:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    n, seconds = QUICK if quick else FULL
    seconds = latency_s or seconds
    root = Path(tempfile.mkdtemp(prefix="mro-bench-tls-"))
    results: dict[str, dict[str, dict]] = {}
    try:
        ca_dir = root / "pki"
        pki.make_ca(ca_dir, "bench station CA")
        pki.issue_broker(ca_dir, ["localhost"], ["127.0.0.1"])
        for kind in brokers or ["mosquitto", "embedded"]:
            results[kind] = {}
            for mode in MODES:
                try:
                    results[kind][mode] = run_mode(kind, mode, root, ca_dir, n=n, rate=rate, seconds=seconds,
                                                   seed=seed, say=say)
                except Exception as exc:  # one run failing must not hide the others' figures
                    say(f"[tls/{kind}/{mode}] failed: {type(exc).__name__}: {exc}")
                    results[kind][mode] = {"broker": kind, "mode": mode, "error": f"{type(exc).__name__}: {exc}"}
            print(tls_table(kind, results[kind]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"rate": rate, "latency_s": seconds, "e2e_n": n, "quick": quick, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--brokers", default=os.environ.get("BENCH_BROKERS", "mosquitto,embedded"))
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_tls_bench(quick=args.quick, brokers=[k for k in args.brokers.split(",") if k], rate=args.rate,
                            seed=args.seed, latency_s=args.latency_seconds)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    failed = any("error" in run for runs in figures["results"].values() for run in runs.values())
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
