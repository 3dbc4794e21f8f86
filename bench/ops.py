"""Metrics scrape time and the dashboard's cost to the pipeline (issue 12).

``python -m bench --only ops`` (part of ``make bench``), or ``python -m bench.ops [--quick]
[--records N] [--rounds R] [--scrapes S]``.

One box, every process real: Mosquitto; ingest, validate, sign, uplink, heartbeat and the MCC
(``mro-edge service ...``); the reference gateway (SQLite) the uplink posts the ledger to. The
devices are the pipeline bench's (``bench.fleet``: four simulated devices with their own broker
users, receipts time-stamped).

- records/s, device publish -> ledger commit (``bench.runs.end_to_end``: N records as fast as
  the devices send them), in alternating runs in the same session: ``plain`` (nobody watching)
  and ``watched`` (two operators logged in to the MCC, each holding its SSE stream
  ``/events`` open and reading every update, plus a Prometheus-like scraper fetching the MCC's
  ``/metrics`` and the gateway's ``/metrics`` every 5 s). The plain runs are the reference;
  per run also the CPU seconds of each process (psutil), so the MCC's and the gateway's share
  shows.
- scrape time of both ``/metrics`` with the pipeline loaded (records flowing as above): S
  scrapes of each, alternating with the same server's cheapest route as the same-run reference
  (the MCC's ``GET /login`` page, the gateway's ``/health``), p50/p99/max.

HTTP clients are httpx (already a dependency of the uplink and the tests), one connection each,
as Prometheus and a browser tab keep theirs.
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
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import Fleet
from bench.monitor import ProcessSampler, StageProbe
from bench.runs import PIPELINE_SETTINGS, end_to_end
from bench.stats import percentiles
from services.gateway.admin import register_edge
from services.mcc.users import add_user, users_path
from shared.ledger.keys import SigningKey
from tests.brokers import free_port, start_broker
from tests.edge import GatewayProc
from tests.pipeline import Pipeline, wait_until

OPERATOR, PASSWORD = "bench-op", "bench operator password"
SCRAPE_EVERY_S = 5.0
DASHBOARDS = 2
BOX = ("ingest", "validate", "sign", "uplink", "heartbeat", "mcc")


class Dashboard:
    """One logged-in operator with the page's live stream (``/events``) open, read as it comes."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=httpx.Timeout(15.0), follow_redirects=False)
        answer = self.client.post("/login", content=f"user={OPERATOR}&password={PASSWORD.replace(' ', '+')}",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        if answer.status_code != 303:
            raise RuntimeError(f"MCC login refused ({answer.status_code})")
        self.events = 0
        self.bytes = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="bench-dashboard", daemon=True)

    def start(self) -> Dashboard:
        self.client.get("/")  # the page itself, as a browser loads it before its stream
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            with self.client.stream("GET", "/events") as response:
                if response.status_code != 200:
                    self.error = f"/events answered {response.status_code}"
                    return
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events += 1
                        self.bytes += len(line)
                    if self._stop.is_set():
                        return
        except httpx.HTTPError as exc:
            if not self._stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)  # an update comes every second, so the reader sees the flag soon
        self.client.close()


class Scraper:
    """Prometheus's part: every `every_s`, GET each target's /metrics; keeps the times."""

    def __init__(self, targets: dict[str, str], every_s: float = SCRAPE_EVERY_S) -> None:
        self.clients = {name: httpx.Client(base_url=url, timeout=10.0) for name, url in targets.items()}
        self.every_s = every_s
        self.times_ms: dict[str, list[float]] = {name: [] for name in targets}
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            for name, client in self.clients.items():
                elapsed, ok = timed_get(client, "/metrics")
                if ok:
                    self.times_ms[name].append(elapsed)
                else:
                    self.failures += 1
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        for client in self.clients.values():
            client.close()


def timed_get(client: httpx.Client, path: str) -> tuple[float, bool]:
    """(ms until the whole body arrived, 200?)"""
    start = time.perf_counter()
    try:
        response = client.get(path)
        ok = response.status_code == 200 and bool(response.content)
    except httpx.HTTPError:
        ok = False
    return (time.perf_counter() - start) * 1000, ok


class Box:
    """Mosquitto, the box's six services, the gateway, four devices."""

    def __init__(self, root: Path, say) -> None:
        self.root = root
        data = root / "data"
        self.broker = start_broker("mosquitto", data)
        self.gateway: GatewayProc | None = None
        self.pipeline: Pipeline | None = None
        self.probe: StageProbe | None = None
        self.sampler: ProcessSampler | None = None
        try:
            db_url = f"sqlite:///{root}/central/gateway.db"
            self.gateway = GatewayProc(db_url, root / "central")
            self.gateway.start()
            self.mcc_url = f"http://127.0.0.1:{free_port()}"
            self.pipeline = Pipeline(self.broker, data, MRO_LINK_GATEWAY_URL=self.gateway.url,
                                     MRO_MCC_LISTEN=self.mcc_url.removeprefix("http://"), **PIPELINE_SETTINGS)
            config = self.pipeline.config
            key = SigningKey.load_or_create(data / "keys")
            token_file = data / "uplink" / "token"
            token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            token_file.write_text(register_edge(db_url, config.origin, key.public_pem()) + "\n")
            add_user(users_path(data), OPERATOR, PASSWORD)
            say("[ops] starting ingest, validate, sign, uplink, heartbeat, mcc and the gateway ...")
            self.pipeline.start()
            self.pipeline.start("uplink", "heartbeat", "mcc", wait=False)
            wait_until(self._serving, 60, 0.2, "the MCC to serve")
            self.fleet = Fleet(self.pipeline)
            self.probe = StageProbe(data)
            pids = {name: self.pipeline.procs[name].pid for name in BOX}
            pids |= {"gateway": self.gateway.proc.pid if self.gateway.proc else 0, "broker": self.broker.pid,
                     "bench": os.getpid()}
            self.sampler = ProcessSampler(pids)
            self.sampler.start()
        except BaseException:
            self.close()
            raise

    def _serving(self) -> bool:
        try:
            return httpx.get(self.mcc_url + "/login", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def gateway_head(self) -> int | None:
        assert self.gateway is not None
        text = httpx.get(self.gateway.url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "mro_gateway_head_seq":
                    return int(sample.value)
        return None

    def close(self) -> None:
        if self.sampler:
            self.sampler.stop()
        if self.probe:
            self.probe.close()
        if self.pipeline:
            self.pipeline.stop()
        if self.gateway:
            self.gateway.stop()
        self.broker.stop()


def one_run(box: Box, mode: str, n: int, rng: random.Random) -> dict[str, Any]:
    assert box.probe is not None and box.sampler is not None
    dashboards: list[Dashboard] = []
    scraper = None
    if mode == "watched":
        dashboards = [Dashboard(box.mcc_url).start() for _ in range(DASHBOARDS)]
        assert box.gateway is not None
        scraper = Scraper({"mcc": box.mcc_url, "gateway": box.gateway.url}).start()
        time.sleep(1.0)  # both streams open and the first scrape done before the records
    try:
        result = end_to_end(box.fleet, box.probe, box.sampler, n, rng)
    finally:
        for dashboard in dashboards:
            dashboard.stop()
        if scraper:
            scraper.stop()
    figures = {"mode": mode, "n": n, "ledger_added": result["ledger_added"], "complete": result["complete"],
               "seconds": result["seconds"], "rate": round(result["rate"], 1), "cpu_s": result["cpu_s"],
               "system_busy_pct": result["system_busy_pct"]}
    if mode == "watched":
        figures["sse_events"] = [d.events for d in dashboards]
        figures["sse_errors"] = [d.error for d in dashboards if d.error]
        assert scraper is not None
        figures["scrapes"] = {name: len(times) for name, times in scraper.times_ms.items()}
        figures["scrape_failures"] = scraper.failures
        figures["scrape_ms"] = scraper.times_ms
    return figures


def scrape_under_load(box: Box, scrapes: int, rng: random.Random, chunk: int = 2_000) -> dict[str, Any]:
    """`scrapes` GETs of each /metrics and of each server's cheapest route, round-robin, while
    records go through the pipeline in a background thread (chunks of `chunk`, until the last
    scrape is done)."""
    assert box.gateway is not None and box.probe is not None and box.sampler is not None
    probe, sampler = box.probe, box.sampler
    done = threading.Event()
    loaded: list[dict[str, Any]] = []

    def load() -> None:
        while not done.is_set():
            loaded.append(end_to_end(box.fleet, probe, sampler, chunk, rng))

    loading = threading.Thread(target=load, name="bench-load", daemon=True)
    targets = {"mcc /metrics": (box.mcc_url, "/metrics"), "mcc /login (reference)": (box.mcc_url, "/login"),
               "gateway /metrics": (box.gateway.url, "/metrics"),
               "gateway /health (reference)": (box.gateway.url, "/health")}
    clients = {name: httpx.Client(base_url=url, timeout=10.0) for name, (url, _) in targets.items()}
    times: dict[str, list[float]] = {name: [] for name in targets}
    failures = {name: 0 for name in targets}
    sizes: dict[str, int] = {}
    for name, client in clients.items():  # connections open before the load, as a scraper's stay open
        sizes[name] = len(client.get(targets[name][1]).content)
    loading.start()
    time.sleep(0.5)
    try:
        for _ in range(scrapes):
            for name, client in clients.items():
                elapsed, ok = timed_get(client, targets[name][1])
                if ok:
                    times[name].append(elapsed)
                else:
                    failures[name] += 1
            time.sleep(0.05)
    finally:
        done.set()
        for client in clients.values():
            client.close()
        loading.join(600)
    records = sum(r["ledger_added"] for r in loaded)
    seconds = sum(r["seconds"] for r in loaded)
    return {"scrapes": scrapes, "records": records, "load_rate": round(records / seconds, 1) if seconds else None,
            "load_complete": all(r["complete"] for r in loaded), "failures": failures,
            "bytes": sizes, "ms": {name: percentiles(values) for name, values in times.items()}}


def run_ops_bench(quick: bool = False, records: int | None = None, rounds: int | None = None,
                  scrapes: int | None = None, seed: int = 2026, keep: Path | None = None) -> dict[str, Any]:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    n = records or (3_000 if quick else 15_000)  # at ~1,000 rec/s: 3 s / 15 s per run
    rounds = rounds or (1 if quick else 2)
    scrapes = scrapes or (50 if quick else 200)
    root = keep or Path(tempfile.mkdtemp(prefix="mro-bench-ops-"))
    rng = random.Random(seed)
    figures: dict[str, Any] = {"records_per_run": n, "rounds": rounds, "dashboards": DASHBOARDS,
                               "scrape_every_s": SCRAPE_EVERY_S}
    box = Box(root, say)
    try:
        say("[ops] warm-up: 300 records ...")
        end_to_end(box.fleet, box.probe, box.sampler, 300, rng)  # type: ignore[arg-type]
        runs = []
        for round_no in range(rounds):
            for mode in ("plain", "watched") if round_no % 2 == 0 else ("watched", "plain"):
                say(f"[ops] round {round_no + 1}/{rounds}, {mode}: {n} records ...")
                runs.append(one_run(box, mode, n, rng))
        figures["runs"] = runs
        say(f"[ops] {scrapes} scrapes of each /metrics and reference route while records flow ...")
        figures["scrape"] = scrape_under_load(box, scrapes, rng)
        figures["gateway_head_seq"] = box.gateway_head()
        figures["ledger_size"] = box.probe.ledger() if box.probe else None
        figures["stage_log_errors"] = _log_errors(box)
    finally:
        box.close()
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    figures["summary"] = summarize(figures["runs"])
    print(table(figures), flush=True)
    return figures


def _log_errors(box: Box) -> dict[str, int]:
    from bench.runs import _errors_in

    assert box.pipeline is not None
    return {name: _errors_in(box.pipeline.logs / f"{name}.log") for name in BOX}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("plain", "watched"):
        chosen = [r for r in runs if r["mode"] == mode]
        rates = [r["rate"] for r in chosen]
        cpu: dict[str, float] = {}
        for r in chosen:
            for name, seconds in r["cpu_s"].items():
                cpu[name] = cpu.get(name, 0.0) + seconds
        seconds = sum(r["seconds"] for r in chosen)
        records = sum(r["ledger_added"] for r in chosen)
        served = {k: v for k, v in cpu.items() if k != "bench"}
        out[mode] = {"rates": rates, "mean_rate": round(sum(rates) / len(rates), 1) if rates else None,
                     "complete": all(r["complete"] for r in chosen),
                     "machine_busy_pct": [r["system_busy_pct"] for r in chosen],
                     "cpu_pct": {k: round(100 * v / seconds, 1) for k, v in cpu.items()} if seconds else {},
                     # CPU per record is steadier than records/s on a shared machine: others' load
                     # slows a run down but does not add to our processes' CPU time
                     "cpu_us_per_record": {k: round(1e6 * v / records) for k, v in served.items()} if records else {},
                     "box_cpu_us_per_record": round(1e6 * sum(served.values()) / records) if records else None}
    plain, watched = out["plain"]["mean_rate"], out["watched"]["mean_rate"]
    out["watched_vs_plain"] = round(watched / plain, 3) if plain and watched else None
    scrape_times: dict[str, list[float]] = {}
    for r in runs:
        for name, values in r.get("scrape_ms", {}).items():
            scrape_times.setdefault(name, []).extend(values)
    out["periodic_scrape_ms"] = {name: percentiles(values) for name, values in scrape_times.items()}
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(f: dict[str, Any]) -> str:
    s = f["summary"]
    lines = [f"records/s, device publish -> ledger commit, {f['records_per_run']:,} records per run, "
             f"alternating runs ({f['rounds']} of each):"]
    for mode, label in (("plain", "no dashboard (reference)"),
                        ("watched", f"{f['dashboards']} SSE dashboards + {f['scrape_every_s']:g} s scrape")):
        m = s[mode]
        runs = ", ".join(f"{r:,.0f}" for r in m["rates"])
        lines.append(f"  {label:<40} {m['mean_rate'] or 0:>8,.0f} rec/s  (runs: {runs})"
                     + ("" if m["complete"] else "  INCOMPLETE: records missing from the ledger"))
    if s["watched_vs_plain"] is not None:
        lines.append(f"  watched / plain: {s['watched_vs_plain']:.3f}")
    for mode in ("plain", "watched"):
        m = s[mode]
        lines.append(f"  CPU us/record {mode:<8}: all {m['box_cpu_us_per_record']} = "
                     + ", ".join(f"{k} {v}" for k, v in m["cpu_us_per_record"].items())
                     + f"; machine busy % per run {m['machine_busy_pct']}")
    watched = [r for r in f["runs"] if r["mode"] == "watched"]
    lines.append("  SSE updates read per dashboard per run: "
                 + "; ".join("/".join(str(e) for e in r["sse_events"]) for r in watched)
                 + (f"; errors {[e for r in watched for e in r['sse_errors']]}" if any(r["sse_errors"] for r in watched)
                    else ""))
    periodic = s["periodic_scrape_ms"]
    lines.append("  5 s scrapes during the watched runs: " + ", ".join(
        f"{name} {p['count']} x p50 {_ms(p['p50_ms'])} / max {_ms(p['max_ms'])} ms" for name, p in periodic.items()))
    sc = f["scrape"]
    lines.append(f"scrape time with the pipeline loaded ({sc['scrapes']} rounds while {sc['records']:,} records "
                 f"flowed at {sc['load_rate'] or 0:,.0f} rec/s"
                 + ("" if sc["load_complete"] else "; INCOMPLETE: records missing from the ledger") + "):")
    row = "  {:<30} {:>9} {:>9} {:>9}  {:>8}  {}"
    lines.append(row.format("GET", "p50 ms", "p99 ms", "max ms", "bytes", "failures"))
    for name, p in sc["ms"].items():
        lines.append(row.format(name, _ms(p["p50_ms"]), _ms(p["p99_ms"]), _ms(p["max_ms"]), f"{sc['bytes'][name]:,}",
                                sc["failures"][name]))
    lines.append(f"gateway head seq at the end {f['gateway_head_seq']} (ledger {f['ledger_size']} entries); "
                 f"error lines in service logs: {f['stage_log_errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--records", type=int, default=None, help="records per run (default 15000, quick 3000)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each mode (default 2, quick 1)")
    parser.add_argument("--scrapes", type=int, default=None, help="scrapes of each route (default 200, quick 50)")
    parser.add_argument("--keep", type=Path, default=None, help="keep stores and logs in this directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_ops_bench(quick=args.quick, records=args.records, rounds=args.rounds, scrapes=args.scrapes,
                            keep=args.keep)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(r["complete"] for r in figures["runs"]) and figures["scrape"]["load_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
