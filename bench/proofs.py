"""The gateway's audit proofs (issue 12): what an inclusion or consistency proof costs to serve.

A real gateway on PostgreSQL holds one origin's chain of ``n`` signed entries (pushed over HTTP
in batches, as the uplink does) with a cosigned checkpoint at ``n``. Then, over one keep-alive
HTTP client, the same number of requests of each kind, one at a time:

- reference: ``GET /v1/head`` (token lookup and one indexed row: the cheapest authenticated read);
- ``GET /v1/proofs/inclusion`` of a random leaf in the tree of size ``n``;
- ``GET /v1/proofs/consistency`` from a random size to ``n``.

A proof reads at most 2*log2(n) stored subtree hashes (one primary-key lookup each), so its
latency should stay a small multiple of the reference and grow with log n, not n.

``python -m bench --only proofs [--quick]``
"""

from __future__ import annotations

import base64
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.stats import percentiles
from services.gateway.admin import register_auditor, register_edge
from shared.ledger.checkpoint import Checkpoint, sign_checkpoint
from shared.ledger.keys import SigningKey
from shared.ledger.merkle import Frontier, leaf_hash, verify_consistency, verify_inclusion
from tests.edge import database
from tests.support.gateway import ThreadedGateway, batch_body, make_entries

BATCH = 5000


def _timed(http: httpx.Client, path: str, params: list[dict[str, Any]]) -> tuple[list[float], list[dict]]:
    times, bodies = [], []
    for p in params:
        started = time.perf_counter()
        r = http.get(path, params=p)
        times.append((time.perf_counter() - started) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path} {p}: HTTP {r.status_code} {r.text[:200]}")
        bodies.append(r.json())
    return times, bodies


def _figures(times: list[float]) -> dict[str, float]:
    found = percentiles(times)
    return {"p50_ms": round(found["p50_ms"], 3), "p99_ms": round(found["p99_ms"], 3)}


def run_proofs_bench(quick: bool = False) -> dict[str, Any]:
    n = 20_000 if quick else 200_000
    requests = 200 if quick else 1000
    rng = random.Random(12)
    with tempfile.TemporaryDirectory(prefix="mro-bench-proofs-") as tmp, \
            database("postgresql", Path(tmp)) as db_url, ThreadedGateway(db_url) as gw:
        key = SigningKey.generate()
        origin = "mro-edge/BENCH"
        token = register_edge(db_url, origin, key.public_pem())
        auditor = register_auditor(db_url, "bench")
        frontier = Frontier()
        started = time.perf_counter()
        with httpx.Client(base_url=gw.url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as edge:
            entries = make_entries(key, origin, n)
            batch = []
            for e in entries:
                frontier.append(leaf_hash(e.entry))
                batch.append(e)
                if len(batch) == BATCH:
                    edge.post("/v1/entries", content=batch_body(batch), headers={"Content-Type": "application/json"})
                    batch = []
            if batch:
                edge.post("/v1/entries", content=batch_body(batch), headers={"Content-Type": "application/json"})
            root = frontier.root()
            r = edge.post("/v1/checkpoints", json={"checkpoint": sign_checkpoint(Checkpoint(origin, n, root), key)})
            if r.status_code != 200:
                raise RuntimeError(f"checkpoint refused: {r.text[:300]}")
        load_s = time.perf_counter() - started

        with httpx.Client(base_url=gw.url, timeout=60, headers={"Authorization": f"Bearer {auditor}"}) as http, \
                httpx.Client(base_url=gw.url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as edge:
            q = {"origin": origin}
            head_ms, _ = _timed(edge, "/v1/head", [{}] * requests)
            leaves = [rng.randrange(n) for _ in range(requests)]
            inc_ms, inc = _timed(http, "/v1/proofs/inclusion", [{**q, "index": i, "size": n} for i in leaves])
            firsts = [rng.randrange(1, n) for _ in range(requests)]
            con_ms, con = _timed(http, "/v1/proofs/consistency", [{**q, "first": m, "second": n} for m in firsts])
        # every answer checked against the root we computed ourselves (the bench measures correct answers)
        for i, body in zip(leaves, inc, strict=True):
            proof = [base64.b64decode(p) for p in body["proof"]]
            assert verify_inclusion(base64.b64decode(body["leaf_hash"]), i, n, proof, root)
        for m, body in zip(firsts, con, strict=True):
            proof = [base64.b64decode(p) for p in body["proof"]]
            assert verify_consistency(m, n, base64.b64decode(body["first_root"]), root, proof)
    result = {
        "entries": n,
        "requests_each": requests,
        "load_s": round(load_s, 1),
        "reference_head": _figures(head_ms),
        "inclusion": _figures(inc_ms),
        "consistency": _figures(con_ms),
        "proof_hashes_max": max(len(b["proof"]) for b in inc + con),
    }
    print(f"proofs on PostgreSQL, {n} entries, {requests} requests each, one at a time:")
    print(f"  reference GET /v1/head          p50 {result['reference_head']['p50_ms']:.2f} ms  "
          f"p99 {result['reference_head']['p99_ms']:.2f} ms")
    for kind in ("inclusion", "consistency"):
        print(f"  GET /v1/proofs/{kind:<12}    p50 {result[kind]['p50_ms']:.2f} ms  "
              f"p99 {result[kind]['p99_ms']:.2f} ms")
    return result
