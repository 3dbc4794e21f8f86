"""`python -m bench [--quick] [--brokers mosquitto,embedded] [--n-mosquitto N] ...`

Exit status: 0 whatever the figures (a benchmark, not a test); 1 when the ledger never reached
the number of records sent (records lost, or the pipeline hung), 2 on a setup failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import import_module
from pathlib import Path

import psutil

from bench.report import TARGET_P99_MS, TARGET_RATE, TARGET_RSS_MB, broker_table, summary, verdicts
from bench.runs import PIPELINE_SETTINGS, Plan, cleanup, run_broker

OUT = Path(__file__).resolve().parent / "last-run.json"

# (raw reference messages, end-to-end records) per broker: a few seconds of raw traffic and
# about ten seconds of end-to-end work at the rates this 2-core box reaches; --quick: ~1/5
FULL = {"mosquitto": (20_000, 40_000), "embedded": (12_000, 12_000)}
QUICK = {"mosquitto": (5_000, 3_000), "embedded": (2_000, 1_000)}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def run_other_parts(parts: set[str], quick: bool, say, intake: dict | None = None) -> dict:
    """The drain, ledger, compliance, stock-client intake, TLS and hop authentication figures
    (issues 3-5, 8, 13), each with its own same-run reference. `intake`: extra arguments of
    bench.intake and bench.tls (brokers, rate, seed, latency_s)."""
    figures = {}
    for part, module, function in (("drain", "bench.drain", "run_drain_bench"),
                                   ("ledger", "bench.ledger", "run_ledger_bench"),
                                   ("compliance", "bench.compliance", "run_compliance_bench"),
                                   ("intake", "bench.intake", "run_intake_bench"),
                                   ("tls", "bench.tls", "run_tls_bench"),
                                   ("hopauth", "bench.hopauth", "run_hopauth_bench"),
                                   ("devices", "bench.devices", "run_devices_bench"),
                                   ("backup", "bench.backup", "run_backup_bench"),
                                   ("ops", "bench.ops", "run_ops_bench"),
                                   ("retention", "bench.retention", "run_retention_bench"),
                                   ("proofs", "bench.proofs", "run_proofs_bench"),
                                   ("torque", "bench.torque", "run_torque_bench")):
        if part not in parts:
            continue
        print(f"\n=== {part} ===", flush=True)
        try:
            extra = (intake or {}) if part in ("intake", "tls") else {}
            if part == "torque" and intake and intake.get("brokers"):
                extra = {"brokers": intake["brokers"]}
            figures[part] = getattr(import_module(module), function)(quick=quick, **extra)
        except Exception as exc:  # one part failing must not hide the others' figures
            say(f"[{part}] bench failed: {type(exc).__name__}: {exc}")
            figures[part] = {"error": f"{type(exc).__name__}: {exc}"}
    return figures


DEFAULT_PARTS = "pipeline,drain,ledger,compliance,intake,tls,hopauth,devices,backup,ops,retention,proofs,torque"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small runs (about a minute in all)")
    parser.add_argument("--only", default=DEFAULT_PARTS,
                        help="comma-separated parts: pipeline (issue 2), drain (uplink), ledger, compliance, "
                             "intake (stock device clients, issue 8), tls (TLS beside plain MQTT, issue 13), "
                             "hopauth (hop seal cost, issue 13), devices (device profile parse+map, issue 11), "
                             "backup (backup time per 100,000 ledger entries, issue 12), "
                             "ops (metrics scrape time and the dashboard's cost to the pipeline, issue 12), "
                             "retention (bytes per record per store after pruning, issue 12), "
                             "proofs (the gateway's audit proofs, issue 12), "
                             "torque (Open Protocol controller -> ledger, issue 11)")
    parser.add_argument("--brokers", default=os.environ.get("BENCH_BROKERS", "mosquitto,embedded"))
    for kind in FULL:
        parser.add_argument(f"--n-{kind}", type=int, default=None,
                            help=f"end-to-end records on {kind} (env BENCH_N_{kind.upper()})")
        parser.add_argument(f"--raw-n-{kind}", type=int, default=None,
                            help=f"raw reference messages on {kind} (env BENCH_RAW_N_{kind.upper()})")
    parser.add_argument("--rate", type=float, default=float(os.environ.get("BENCH_RATE", 200)),
                        help="offered load of the latency run, records/s")
    parser.add_argument("--latency-seconds", type=float, default=None, help="duration of the latency run")
    parser.add_argument("--seed", type=int, default=_env_int("BENCH_SEED", 2026))
    parser.add_argument("--no-uplink-stub", action="store_true",
                        help="leave sign's outbox unreceipted (no uplink), as the test harness does")
    parser.add_argument("--stage-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the stage processes, e.g. MRO_STAGE_MAX_IN_FLIGHT=2000 "
                             "(repeatable; for tuning experiments)")
    parser.add_argument("--device-nagle", action="store_true",
                        help="leave Nagle's algorithm on in the bench's device clients (paho's default)")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the stores go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, stores) afterwards")
    parser.add_argument("--json", type=Path, default=OUT, help=f"where to write the figures (default {OUT})")
    return parser.parse_args(argv)


def stage_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--stage-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def plan_for(kind: str, args: argparse.Namespace) -> Plan:
    raw_n, e2e_n = (QUICK if args.quick else FULL)[kind]
    raw_n = getattr(args, f"raw_n_{kind}") or _env_int(f"BENCH_RAW_N_{kind.upper()}", raw_n)
    e2e_n = getattr(args, f"n_{kind}") or _env_int(f"BENCH_N_{kind.upper()}", e2e_n)
    latency_s = args.latency_seconds or float(os.environ.get("BENCH_LATENCY_S", 5 if args.quick else 15))
    return Plan(raw_n=raw_n, e2e_n=e2e_n, rate=args.rate, latency_s=latency_s,
                raw_latency_s=min(5.0, latency_s), seed=args.seed, uplink_stub=not args.no_uplink_stub,
                device_nodelay=not args.device_nagle, stage_env=stage_env(args.stage_env))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    unknown = set(kinds) - set(FULL)
    if unknown:
        print(f"unknown broker kind(s): {sorted(unknown)}; choose from {sorted(FULL)}", file=sys.stderr)
        return 2
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="mro-bench-"))
    root.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.time()
    say(f"mro-edge bench: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, data in {root}; "
        f"pipeline settings {PIPELINE_SETTINGS}, uplink stand-in {'off' if args.no_uplink_stub else 'on'}, "
        f"device TCP_NODELAY {'off' if args.device_nagle else 'on'}"
        + (f", stage env {stage_env(args.stage_env)}" if args.stage_env else ""))
    parts = set(args.only.split(","))
    results, lost, extra = [], False, {}
    try:
        for kind in (kinds if "pipeline" in parts else ()):
            plan = plan_for(kind, args)
            try:
                result = run_broker(kind, plan, root, say)
            except Exception as exc:  # a setup failure (broker missing, port race): report, go on
                say(f"[{kind}] bench failed: {type(exc).__name__}: {exc}")
                result = {"broker": kind, "error": f"{type(exc).__name__}: {exc}"}
            result["plan"] = asdict(plan)
            results.append(result)
            if any(result.get(run) and not result[run]["complete"] for run in ("e2e", "latency")):
                lost = True
            print(broker_table(result) if "error" not in result else f"\n=== {kind}: {result['error']}",
                  flush=True)
    finally:
        if not args.keep and args.data_dir is None:
            cleanup(root)
    if results:
        print(summary([r for r in results if "error" not in r]))
    extra = run_other_parts(
        parts,
        args.quick,
        say,
        intake={"brokers": kinds, "rate": args.rate, "seed": args.seed, "latency_s": args.latency_seconds},
    )
    report = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "memory_mb": psutil.virtual_memory().total // 2**20, "loadavg_end": os.getloadavg()},
        "quick": args.quick,
        "pipeline_settings": PIPELINE_SETTINGS,
        "targets": {"records_per_s": TARGET_RATE, "p99_ms": TARGET_P99_MS, "rss_mb": TARGET_RSS_MB},
        "results": [dict(r, verdicts=verdicts(r)) if "error" not in r else r for r in results],
        "records_lost": lost,
        **extra,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfigures written to {args.json} ({report['duration_s']:.0f} s in all)")
    if lost:
        print("RECORDS LOST: the ledger never reached the number of records sent", file=sys.stderr)
        return 1
    if any("error" in r for r in results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
