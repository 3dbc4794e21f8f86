"""Tables for the terminal: each figure beside its same-run reference and its target."""

from __future__ import annotations

TARGET_RATE = {"mosquitto": 1000.0, "embedded": 300.0}
TARGET_P99_MS = 100.0
TARGET_RSS_MB = 80.0
SERVICES = ("ingest", "validate", "sign")


def mark(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def _ms(value) -> str:
    return "-" if value is None else f"{value:,.1f}"


def verdicts(result: dict) -> dict:
    """PASS/MISS per target for one broker (None: not measured)."""
    kind = result["broker"]
    e2e, lat, rss = result.get("e2e"), result.get("latency"), result.get("peak_rss_mb", {})
    out = {
        "records_per_s": None if not e2e else e2e["complete"] and e2e["rate"] >= TARGET_RATE[kind],
        "p99_ms": None
        if not lat
        else lat["complete"] and (lat["recorded"]["p99_ms"] or 1e9) <= TARGET_P99_MS,
    }
    rss_names = list(SERVICES) + ([f"broker({kind})"] if kind == "embedded" else [])
    for name in rss_names:
        out[f"rss_{name}"] = None if name not in rss else rss[name] <= TARGET_RSS_MB
    return out


def broker_table(result: dict) -> str:
    kind = result["broker"]
    raw, e2e, lat = result.get("raw"), result.get("e2e"), result.get("latency")
    rl = result.get("raw_latency")
    v = verdicts(result)
    lines = ["", f"=== {kind} " + "=" * (86 - len(kind))]
    row = "{:<34} {:>22}  {:<34} {}"
    lines.append(row.format("figure", "value", "reference (same run) / target", ""))
    lines.append("-" * 96)
    if raw:
        lines.append(row.format("raw broker QoS1 pub->sub", f"{raw['rate']:,.0f} msg/s",
                                f"{raw['n']:,} x {raw['bytes']} B in {raw['seconds']:.2f} s", ""))
    if rl:
        lines.append(row.format("raw broker latency p50/p99", f"{_ms(rl['p50_ms'])} / {_ms(rl['p99_ms'])} ms",
                                f"{rl['received']}/{rl['n']} msgs at {rl['rate']:g}/s", ""))
    if e2e:
        ratio = e2e["rate"] / raw["rate"] if raw and raw["rate"] else 0.0
        lines.append(
            row.format(
                f"end-to-end ({e2e['ledger_added']:,}/{e2e['n']:,} records)",
                f"{e2e['rate']:,.0f} rec/s",
                f"{ratio:.1%} of raw; target >= {TARGET_RATE[kind]:,.0f}",
                mark(v["records_per_s"]),
            )
        )
        done = e2e["stage_done_s"]
        lines.append("    all held by: " + ", ".join(f"{s} {done[s]:.1f} s" for s in SERVICES if s in done)
                     + f"  (publishing queued in {e2e['publish_queued_s']:.1f} s; "
                     f"recorded receipts {e2e['recorded_receipts']:,}; resends {e2e['device_resends']})")
        lines.append(
            "    commits: "
            + ", ".join(
                f"{s} {e2e['commits'][s]:,} ({e2e['records_per_commit'][s]} rec/commit, "
                f"largest {e2e['largest_commit'][s]:,})"
                for s in SERVICES
            )
        )
        lines.append("    CPU % (us/record): " + ", ".join(
            f"{k} {p:.0f} ({e2e['cpu_us_per_record'].get(k, 0)})" for k, p in e2e["cpu_pct"].items())
            + f"; machine busy {e2e['system_busy_pct']:.0f}% of {_ncpu()} cores"
            + f" (unattributed {e2e['unattributed_cpu_pct']:.0f}%)")
    if lat:
        rec, recv = lat["recorded"], lat["received"]
        lines.append(row.format("latency publish->recorded",
                                f"{_ms(rec['p50_ms'])}/{_ms(rec['p99_ms'])}/{_ms(rec['max_ms'])} ms",
                                f"p50/p99/max of {rec['count']:,}/{lat['n']:,} at {lat['offered_rate']:g}/s; "
                                f"target p99 <= {TARGET_P99_MS:g}", mark(v["p99_ms"])))
        lines.append(f"    publish->received (ingest commit): p50 {_ms(recv['p50_ms'])} ms, "
                     f"p99 {_ms(recv['p99_ms'])} ms; commits: "
                     + ", ".join(f"{s} {lat['records_per_commit'][s]} rec/commit" for s in SERVICES)
                     + "; CPU %: " + ", ".join(f"{k} {p:.0f}" for k, p in lat["cpu_pct"].items())
                     + f"; unattributed {lat['unattributed_cpu_pct']:.0f}%")
    peaks, idle = result.get("peak_rss_mb", {}), result.get("idle_rss_mb", {})
    anon = result.get("peak_anon_mb", {})
    for name, peak in peaks.items():
        if name == "bench":
            continue
        targeted = name in SERVICES or (kind == "embedded" and name.startswith("broker"))
        lines.append(row.format(f"peak RSS {name}", f"{peak:.1f} MB",
                                f"idle {idle.get(name, 0):.1f}; anon {anon.get(name, 0):.1f} MB"
                                + (f"; target <= {TARGET_RSS_MB:g}" if targeted else " (not targeted)"),
                                mark(v.get(f"rss_{name}")) if targeted else ""))
    if result.get("stage_log_errors") and any(result["stage_log_errors"].values()):
        lines.append(f"    error lines in stage logs: {result['stage_log_errors']}")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    lines = ["", "=== summary " + "=" * 84]
    row = "{:<10} {:>14} {:>8} {:>7} {:>18} {:>7} {:>26} {:>7}"
    lines.append(
        row.format("broker", "records/s", "of raw", "", "p99 @load (ms)", "", "max service RSS (MB)", "")
    )
    for result in results:
        kind, v = result["broker"], verdicts(result)
        e2e, lat, raw = result.get("e2e"), result.get("latency"), result.get("raw")
        rss = {k: x for k, x in result.get("peak_rss_mb", {}).items()
               if k in SERVICES or (kind == "embedded" and k.startswith("broker"))}
        worst = max(rss, key=rss.get) if rss else None
        rss_ok = None if not rss else all(v[f"rss_{k}"] for k in rss)
        lines.append(row.format(
            kind,
            f"{e2e['rate']:,.0f}" if e2e else "-",
            f"{e2e['rate'] / raw['rate']:.1%}" if e2e and raw else "-",
            mark(v["records_per_s"]),
            _ms(lat["recorded"]["p99_ms"]) if lat else "-",
            mark(v["p99_ms"]),
            f"{rss[worst]:.1f} ({worst})" if worst else "-",
            mark(rss_ok),
        ))
    return "\n".join(lines)


def _ncpu() -> int:
    import os

    return os.cpu_count() or 1


# Device intake with stock clients (bench/intake.py, issue 8)
TARGET_INTAKE_RATIO = 0.3
TARGET_INTAKE_RECORDED_P99_MS = 100.0
TARGET_PUBACK_P99_MS = 20.0


def intake_verdicts(result: dict) -> dict:
    raw, e2e, lat = result.get("raw"), result.get("e2e"), result.get("latency")
    ratio = e2e["rate"] / raw["rate"] if e2e and raw and raw["rate"] else None
    return {
        "ratio": None if ratio is None else e2e["complete"] and ratio >= TARGET_INTAKE_RATIO,
        "recorded_p99_ms": None if not lat else lat["complete"] and (
            lat["publish_recorded"]["p99_ms"] or 1e9) <= TARGET_INTAKE_RECORDED_P99_MS,
        "puback_p99_ms": None if not lat else (lat["puback"]["p99_ms"] or 1e9) <= TARGET_PUBACK_P99_MS,
        "kill_loss": None if "kill_ingest_down" not in result else
        (result["kill_ingest_running"]["lost"] + result["kill_ingest_down"]["lost"]) == 0,
    }


def intake_table(result: dict) -> str:
    kind = result["broker"]
    lines = ["", f"=== intake, stock clients: {kind} " + "=" * (72 - len(kind))]
    if "error" in result:
        return "\n".join(lines + [f"    failed: {result['error']}"])
    v = intake_verdicts(result)
    row = "{:<36} {:>22}  {:<32} {}"
    raw, e2e, lat, win = (
        result.get("raw"),
        result.get("e2e"),
        result.get("latency"),
        result.get("burst_window"),
    )
    if raw:
        lines.append(row.format("raw broker QoS1 pub->sub", f"{raw['rate']:,.0f} msg/s",
                                f"{raw['n']:,} x {raw['bytes']} B (same run)", ""))
    if e2e:
        ratio = e2e["rate"] / raw["rate"] if raw and raw["rate"] else 0.0
        lines.append(
            row.format(
                f"publish->ledger ({e2e['ledger_added']:,}/{e2e['n']:,})",
                f"{e2e['rate']:,.0f} rec/s",
                f"{ratio:.2f} x raw; target >= {TARGET_INTAKE_RATIO}",
                mark(v["ratio"]),
            )
        )
        lines.append(
            f"    mosquitto_pub bursts of 500: {e2e['bursts']} connections, all PUBACKs in "
            f"{e2e['puback_all_s']:.1f} s ({e2e['puback_rate']:,.0f}/s), "
            f"ledger done at {e2e['seconds']:.1f} s; "
            f"broker CPU {e2e['broker_cpu_us_per_record']} us/record; failed bursts {e2e['burst_errors']}"
        )
    if lat:
        rec, pub, recv = lat["publish_recorded"], lat["puback"], lat["publish_received"]
        lines.append(
            row.format(
                "publish->recorded p50/p99",
                f"{_ms(rec['p50_ms'])} / {_ms(rec['p99_ms'])} ms",
                f"{rec['count']:,}/{lat['n']:,} at {lat['offered_rate']:g}/s; "
                f"<= {TARGET_INTAKE_RECORDED_P99_MS:g}",
                mark(v["recorded_p99_ms"]),
            )
        )
        lines.append(row.format("PUBACK p50/p99", f"{_ms(pub['p50_ms'])} / {_ms(pub['p99_ms'])} ms",
                                f"paho on_publish; <= {TARGET_PUBACK_P99_MS:g}", mark(v["puback_p99_ms"])))
        lines.append(
            f"    publish->received (ingest commit) p50/p99 {_ms(recv['p50_ms'])} / {_ms(recv['p99_ms'])} ms"
        )
        w = lat["window"]
        lines.append(
            row.format(
                "PUBACK->ingest commit p50/p99/max"
                if kind == "embedded"
                else "PUBACKed, not in ingest: p50/p99/max",
                f"{_ms(w['p50_ms'])}/{_ms(w['p99_ms'])}/{_ms(w['max_ms'])} ms",
                "at the paced rate" + ("; already in the spool" if kind == "embedded" else ""),
                "",
            )
        )
    if win:
        w = win["window"]
        lines.append(
            row.format(
                "  the same in a full-speed burst",
                f"{_ms(w['p50_ms'])}/{_ms(w['p99_ms'])}/{_ms(w['max_ms'])} ms",
                f"{win['acked']:,} records, 4 paho devices",
                "",
            )
        )
    for mode in ("ingest_running", "ingest_down"):
        k = result.get(f"kill_{mode}")
        if k:
            lines.append(row.format(f"broker kill -9, {mode.replace('_', ' ')}",
                                    f"{k['lost']:,} of {k['acked']:,} lost",
                                    f"per kill {k['lost_per_kill']}; duplicated {k['duplicated']}",
                                    mark(k["lost"] == 0) if kind == "embedded" else ""))
    return "\n".join(lines)
