"""Uplink drain: from a backlog of n ledger entries on the box into the gateway, once the link is back.

`python -m bench.drain [--n 100000] [--quick] [--backends sqlite,postgresql]`

Building 100,000 entries through the whole pipeline would measure the pipeline, not the drain,
so the backlog is written straight into the stores, exactly as the services write them: real
Ed25519-signed, hash-chained entries in the sign stage's ledger (`shared.ledger.store`) and
the same entries, as export rows, in the uplink stage's `entries` table. Then the real uplink
and heartbeat processes start (on Mosquitto) against a real gateway process behind the test
proxy, which refuses connections: the box is ISOLATED with n entries queued. The proxy is
switched to pass and the clock runs:

- drain rate: entries per second from the first entry stored at the gateway to the last
  (the gateway's head, polled directly every 50 ms);
- restored -> all at the gateway, and restored -> CONNECTED (the heartbeat's retained state):
  these include noticing the link is back (one probe interval) and confirming the heads match.

Beside it, as a reference, the gateway's raw ingest rate in the same run
(`bench_ingest`: one client posting pre-signed batches back to back).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx

from services.gateway.admin import register_edge
from shared.ledger.entry import export_row
from shared.ledger.keys import SigningKey
from shared.ledger.store import LEDGER_TABLE, SIGN_STAGE, encode_entry
from shared.runtime.messages import json_encode
from shared.runtime.stage import RUNTIME_TABLES
from shared.runtime.store import Store, u64
from tests.brokers import start_broker
from tests.edge import GatewayProc, TopicRecorder, database
from tests.linkfault import LinkFault
from tests.pipeline import Pipeline, wait_until
from tests.support.gateway import ThreadedGateway, batch_body, make_entries

TARGET_RATE = 5000
PROBE_INTERVAL_S = 0.5
POLL_S = 0.05  # the gateway's head, polled directly: light enough not to slow it down
WRITE_CHUNK = 10_000


def prefill(data_dir: Path, n: int, station: str = "HGR1") -> SigningKey:
    """n signed entries in the sign stage's ledger and, as export rows, queued in the uplink."""
    key = SigningKey.load_or_create(data_dir / "keys")
    origin = f"mro-edge/{station}"
    sign = Store(data_dir / SIGN_STAGE, RUNTIME_TABLES + (LEDGER_TABLE,), map_size_mb=4096)
    uplink = Store(data_dir / "uplink", RUNTIME_TABLES + ("entries",), map_size_mb=4096)
    try:
        chunk: list = []

        def flush() -> None:
            with sign.write() as txn:
                for e in chunk:
                    txn.put(u64(e.seq), encode_entry(e), db=sign.table(LEDGER_TABLE), append=True)
            with uplink.write() as txn:
                for e in chunk:
                    txn.put(u64(e.seq), json_encode(export_row(e)), db=uplink.table("entries"), append=True)
            chunk.clear()

        for entry in make_entries(key, origin, n, recorded_at="2026-01-01T00:00:00.000Z"):
            chunk.append(entry)
            if len(chunk) >= WRITE_CHUNK:
                flush()
        if chunk:
            flush()
    finally:
        sign.close()
        uplink.close()
    return key


def drain_once(backend: str, n: int, root: Path, say) -> dict:
    data_dir = root / backend / "data"
    data_dir.mkdir(parents=True)
    with ExitStack() as stack:
        db_url = stack.enter_context(database(backend, root / backend))
        t = time.perf_counter()
        key = prefill(data_dir, n)
        say(f"  {backend}: {n:,} signed entries written to the sign ledger and the uplink queue "
            f"in {time.perf_counter() - t:.1f} s")
        broker = start_broker("mosquitto", data_dir)
        stack.callback(broker.stop)
        gateway = GatewayProc(db_url, root / backend / "central")
        gateway.start()
        stack.callback(gateway.stop)
        proxy = LinkFault(gateway.port)
        stack.callback(proxy.close)
        proxy.set("refuse")
        pipeline = Pipeline(broker, data_dir, MRO_LINK_GATEWAY_URL=proxy.url,
                            MRO_LINK_PROBE_INTERVAL_S=str(PROBE_INTERVAL_S), MRO_UPLINK_BREAKER_RESET_S="2",
                            MRO_STAGE_STATUS_INTERVAL_S="1")
        stack.callback(pipeline.stop)
        config = pipeline.config
        token = register_edge(db_url, config.origin, key.public_pem())
        (data_dir / "uplink" / "token").write_text(token + "\n")
        recorder = TopicRecorder(config, (f"mro/{config.station}/status/connectivity",)).start()
        stack.callback(recorder.stop)
        topic = f"mro/{config.station}/status/connectivity"

        def state() -> str | None:
            messages = recorder.of(topic)
            return messages[-1].payload.get("state") if messages else None

        pipeline.start("uplink", "heartbeat")
        wait_until(lambda: state() == "ISOLATED", 60, 0.05, "the box to be ISOLATED")
        http = stack.enter_context(httpx.Client(base_url=gateway.url, timeout=10,
                                                headers={"Authorization": f"Bearer {token}"}))

        def head_seq() -> int:
            return http.get("/v1/head").json()["seq"]

        assert head_seq() == -1
        restored = time.monotonic()
        proxy.set("pass")
        first = None
        while True:
            seq = head_seq()
            now = time.monotonic()
            if seq >= 0 and first is None:
                first = (now, seq)
            if seq >= n - 1:
                done = now
                break
            if now - restored > 600:
                raise RuntimeError(
                    f"the drain stalled at seq {seq} of {n - 1}:\n{pipeline.log_tail('uplink')}"
                )
            time.sleep(POLL_S)
        wait_until(lambda: state() == "CONNECTED", 120, 0.01, "CONNECTED after the drain")
        connected = next(
            m.at for m in recorder.of(topic) if m.at >= restored and m.payload["state"] == "CONNECTED"
        )
        walked = [m.payload["state"] for m in recorder.of(topic) if m.at >= restored]
        walked = [s for i, s in enumerate(walked) if i == 0 or walked[i - 1] != s]
        first_at, first_seq = first
        drained = n - (first_seq + 1)
        rate = drained / (done - first_at) if done > first_at else float("inf")
        result = {
            "n": n,
            "drain_rate": round(rate),
            "restored_to_first_ack_s": round(first_at - restored, 3),
            "restored_to_all_at_gateway_s": round(done - restored, 3),
            "restored_to_connected_s": round(connected - restored, 3),
            "overall_rate": round(n / (done - restored)),
            "walked": walked,
            "probe_interval_s": PROBE_INTERVAL_S,
        }
        pipeline.stop()
    say(
        f"  {backend}: drain {result['drain_rate']:,} entries/s; restored -> all {n:,} at the gateway "
        f"{result['restored_to_all_at_gateway_s']:.2f} s, "
        f"-> CONNECTED {result['restored_to_connected_s']:.2f} s "
        f"({' -> '.join(walked)})"
    )
    return result


def bench_ingest(db_url: str, n: int = 20_000, batch: int = 1000) -> float:
    """Entries per second the gateway verifies and durably stores, ``batch`` entries per request."""
    key = SigningKey.generate()
    origin = f"bench/{uuid.uuid4().hex[:12]}"
    token = register_edge(db_url, origin, key.public_pem())
    entries = list(make_entries(key, origin, n))
    bodies = [batch_body(entries[i : i + batch]) for i in range(0, n, batch)]
    with ThreadedGateway(db_url) as gw, httpx.Client(
        base_url=gw.url, timeout=120, headers={"Authorization": f"Bearer {token}",
                                               "Content-Type": "application/json"}
    ) as http:
        start = time.perf_counter()
        for body in bodies:
            response = http.post("/v1/entries", content=body)
            if response.status_code != 200:
                raise RuntimeError(
                    f"the gateway refused a bench batch: {response.status_code} {response.text[:500]}"
                )
        elapsed = time.perf_counter() - start
        head = http.get("/v1/head").json()
    if head["seq"] != n - 1:
        raise RuntimeError(f"the gateway holds up to seq {head['seq']}, expected {n - 1}")
    return n / elapsed


def run_drain_bench(
    n: int = 100_000, quick: bool = False, backends: tuple[str, ...] = ("sqlite", "postgresql"), say=print
) -> dict:
    """Drain throughput per backend (and the gateway's raw ingest rate beside it)."""
    if quick:
        n = min(n, 20_000)
    root = Path(tempfile.mkdtemp(prefix="mro-drain-"))
    results: dict = {"n": n, "target_rate": TARGET_RATE}
    try:
        for backend in backends:
            say(f"drain of {n:,} entries, {backend}")
            result = drain_once(backend, n, root, say)
            with database(backend, root / backend / "raw") as db_url:
                raw_n = min(n, 20_000)
                result["gateway_raw_ingest_rate"] = round(bench_ingest(db_url, raw_n, batch=2000))
            say(
                f"  {backend}: gateway raw ingest (reference) {result['gateway_raw_ingest_rate']:,} entries/s"
            )
            result["meets_target"] = result["drain_rate"] >= TARGET_RATE
            results[backend] = result
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="20,000 entries")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = run_drain_bench(args.n, args.quick, tuple(b for b in args.backends.split(",") if b))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
