"""The central reference gateway over real HTTP, on SQLite and on a real PostgreSQL server.

Every test gets its own database (a SQLite file, or a uniquely named PostgreSQL database that
is dropped afterwards) and a real uvicorn server on a free port; entries are really signed
with Ed25519 and chained. PostgreSQL must be reachable (MRO_TEST_POSTGRES_URL, default
postgresql://postgres@127.0.0.1:5432/test): without it these tests fail, they never skip.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
import yaml

from services.gateway.admin import RegistrationError, register_edge
from services.gateway.server import create_app
from shared.ledger.entry import SignedEntry
from shared.ledger.keys import SigningKey
from tests.brokers import free_port
from tests.support.gateway import batch_body
from tests.support.gateway_edge import Edge, entry_with

ROOT = Path(__file__).resolve().parents[2]
ZEROS = "0" * 64


def test_health_and_empty_head(edge, gateway):
    response = httpx.get(gateway.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert edge.head() == {"origin": edge.origin, "seq": -1, "hash": ZEROS}


def test_accepts_a_batch_and_a_replay_changes_nothing(edge):
    batch = edge.extend(1000)
    first = edge.post(batch)
    assert first.status_code == 200, first.text
    ack = first.json()
    assert ack == {"origin": edge.origin, "head": {"seq": 999, "hash": batch[-1].hash},
                   "accepted": 1000, "replayed": 0, "duplicates": []}

    again = edge.post(batch)
    assert again.status_code == 200
    assert again.json() == {**ack, "accepted": 0, "replayed": 1000}

    # An overlapping batch: the known half is replayed, the new half appended.
    more = edge.extend(500)
    overlap = edge.post(batch[500:] + more)
    assert overlap.status_code == 200, overlap.text
    assert overlap.json()["accepted"] == 500 and overlap.json()["replayed"] == 500
    assert edge.head() == {"origin": edge.origin, "seq": 1499, "hash": more[-1].hash}

    # The same new batch sent twice at once: stored once, one answer accepts, the other replays.
    racing = edge.extend(300)
    answers: list[dict] = []

    def send():
        with httpx.Client(base_url=str(edge.http.base_url), timeout=60,
                          headers={"Authorization": f"Bearer {edge.token}"}) as http:
            r = http.post("/v1/entries", content=batch_body(racing), headers={"Content-Type": "application/json"})
            answers.append(r.json())

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted((a["accepted"], a["replayed"]) for a in answers) == [(0, 300), (300, 0)]
    assert all(a["head"]["seq"] == 1799 for a in answers)
    edge.verify_stored(1800)


def test_refuses_forged_signatures_and_unknown_keys(edge):
    batch = edge.extend(10)
    forged = msgspec.structs.replace(
        batch[5], signature=bytes([batch[5].signature[0] ^ 1]) + batch[5].signature[1:])
    r = edge.post(batch[:5] + [forged] + batch[6:])
    assert r.status_code == 422
    body = r.json()
    assert body["error"]["code"] == "bad_signature" and body["error"]["seq"] == 5
    assert "seq 5" in body["error"]["message"]
    # The good prefix is stored and acknowledged; the client continues from head.seq + 1.
    assert body["accepted"] == 5 and body["head"] == {"seq": 4, "hash": batch[4].hash}

    # Entry bytes altered after signing: with the old hash, and with a recomputed hash.
    tampered_bytes = batch[5].entry.replace(b"INSPECT", b"REPAIR!")
    for new_hash, code in ((batch[5].hash, "hash_mismatch"), (hashlib.sha256(tampered_bytes).hexdigest(),
                                                               "bad_signature")):
        tampered = SignedEntry(5, batch[5].idem, tampered_bytes, new_hash, batch[5].signature, batch[5].kid)
        r = edge.post([tampered])
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text

    # Signed by a key that was never registered for this origin.
    stranger = SigningKey.generate()
    unknown = entry_with(stranger, edge.origin, 5, batch[4].hash, {"x": "y"})
    r = edge.post([unknown])
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "unknown_key" and r.json()["error"]["kid"] == stranger.kid

    # Nothing of that reached the store; the genuine rest still goes in.
    r = edge.post(batch[5:])
    assert r.status_code == 200 and r.json()["accepted"] == 5
    edge.verify_stored(10)
    assert edge.forks() == []


def test_refuses_a_gap_with_the_expected_seq(edge):
    batch = edge.extend(20)
    assert edge.post(batch[:10]).status_code == 200
    r = edge.post(batch[15:])
    assert r.status_code == 409
    body = r.json()
    assert body["error"]["code"] == "gap" and body["error"]["expected_seq"] == 10 and body["error"]["seq"] == 15
    assert body["accepted"] == 0 and body["head"]["seq"] == 9
    # A gap inside a batch: the prefix is kept.
    r = edge.post(batch[10:13] + batch[14:])
    assert r.status_code == 409 and r.json()["error"]["expected_seq"] == 13 and r.json()["accepted"] == 3
    assert edge.post(batch[13:]).json()["head"]["seq"] == 19
    edge.verify_stored(20)


def test_refuses_a_fork_and_keeps_the_evidence(edge):
    batch = edge.extend(10)
    assert edge.post(batch).status_code == 200

    # A different, validly signed entry at a seq already held.
    other = entry_with(edge.key, edge.origin, 5, batch[4].hash, {"different": "entry"})
    r = edge.post([other])
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "fork" and error["seq"] == 5 and "FORK at seq 5" in error["message"]
    assert error["held_hash"] == batch[5].hash and error["received_hash"] == other.hash
    assert r.json()["head"] == {"seq": 9, "hash": batch[9].hash}

    # The next seq, validly signed, but linked to something other than the held head.
    stray = entry_with(edge.key, edge.origin, 10, other.hash, {"after": "the fork"})
    r = edge.post([stray])
    assert r.status_code == 409 and r.json()["error"]["code"] == "fork" and r.json()["error"]["seq"] == 10

    evidence = edge.forks()
    assert [(f["seq"], f["hash"], f["held_hash"]) for f in evidence] == [
        (5, other.hash, batch[5].hash), (10, stray.hash, batch[9].hash)]
    assert evidence[0]["entry"] == other.entry and evidence[0]["signature"] == other.signature
    # The held chain is untouched, and the genuine replay is still acknowledged.
    edge.verify_stored(10)
    assert edge.post(batch).json()["replayed"] == 10


def test_authentication(db_url, gateway, edge):
    batch = edge.extend(3)
    url = gateway.url + "/v1/entries"
    r = httpx.post(url, content=batch_body(batch))
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(url, content=batch_body(batch), headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = edge.post(batch, token="not-a-registered-token")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    assert httpx.get(gateway.url + "/v1/head").status_code == 401

    # A valid token of another origin cannot push this origin's entries.
    other = Edge(db_url, gateway.url)
    try:
        r = other.post(batch)
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "wrong_origin" and edge.origin in r.json()["error"]["message"]
        assert other.head()["seq"] == -1
    finally:
        other.close()
    assert edge.stored() == []


def test_business_duplicates_inside_the_window_only(edge):
    base = datetime(2025, 3, 1, tzinfo=UTC)
    day = {0: 0, 1: 10, 2: 0, 3: 1, 4: 32, 5: 33}  # recorded_at, days after base
    idem = {0: "a", 1: "a", 2: "b", 3: "c", 4: "c", 5: "c"}  # 1 repeats 0 (10 days); 4 repeats 3 (31 days)

    def at(seq: int) -> str:
        return (base + timedelta(days=day[seq])).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    batch = edge.extend(6, recorded_at=at, idem=lambda seq: idem[seq] * 64)
    r = edge.post(batch[:4])
    assert r.status_code == 200
    assert r.json()["duplicates"] == [{"seq": 1, "duplicate_of": 0}]
    r = edge.post(batch[4:])
    # seq 4 is 31 days after seq 3: not a duplicate; seq 5 is one day after seq 4: a duplicate of 4.
    assert r.status_code == 200 and r.json()["duplicates"] == [{"seq": 5, "duplicate_of": 4}]
    # The chain is unbroken and a replay reports the same duplicates again.
    edge.verify_stored(6)
    assert edge.post(batch).json()["duplicates"] == [{"seq": 1, "duplicate_of": 0}, {"seq": 5, "duplicate_of": 4}]
    assert [r["duplicate_of"] for r in edge.stored()] == [None, 0, None, None, None, 4]


def test_malformed_requests(edge):
    batch = edge.extend(2)
    headers = {"Content-Type": "application/json"}
    for body in (b"not json", b'{"rows": []}', b'{"entries": {}}'):
        r = edge.http.post("/v1/entries", content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_request", body
    r = edge.http.post("/v1/entries", content=b'{"entries": [' + b",".join([b"{}"] * 10_001) + b"]}",
                       headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"
    # A malformed second row: the first is stored, the error names the row.
    good = batch_body(batch[:1])[:-2]
    r = edge.http.post("/v1/entries", content=good + b',{"seq": 1}]}', headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "malformed_row"
    assert r.json()["error"]["index"] == 1 and r.json()["accepted"] == 1
    r = edge.http.post("/v1/entries", content=b'{"entries": []}', headers=headers)
    assert r.status_code == 200 and r.json()["head"]["seq"] == 0


def test_register_edge_adds_keys_and_rotates_the_token(db_url, gateway):
    edge = Edge(db_url, gateway.url)
    try:
        assert edge.post(edge.extend(3)).status_code == 200
        # Same origin again: a new token replaces the old; a rotated key signs on from where the chain is.
        new_key = SigningKey.generate()
        second_token = register_edge(db_url, edge.origin, new_key.public_pem())
        assert second_token != edge.token
        nxt = entry_with(new_key, edge.origin, 3, edge.chain[-1].hash, {"rotated": "key"})
        r = edge.post([nxt], token=second_token)
        assert r.status_code == 200 and r.json()["head"]["seq"] == 3
        assert edge.http.get("/v1/head").status_code == 401  # the first token was rotated out
        assert edge.http.get("/v1/head", headers={"Authorization": f"Bearer {second_token}"}).json()["seq"] == 3
        with pytest.raises(RegistrationError, match="already registered for origin"):
            register_edge(db_url, "mro-edge/ELSEWHERE", new_key.public_pem())
        with pytest.raises(RegistrationError, match="PUBLIC KEY"):
            register_edge(db_url, edge.origin, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
        with pytest.raises(RegistrationError, match="origin"):
            register_edge(db_url, "has space", new_key.public_pem())
    finally:
        edge.close()


def test_kill9_mid_stream_loses_nothing_acknowledged(db_url, tmp_path):
    """kill -9 of the gateway while a client streams batches; restart; the client resumes from head."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "gateway.log").open("ab")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "serve", "--db-url", db_url, "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("the gateway did not come up")

    proc = start()
    edge = Edge(db_url, base_url)
    total, size = 12_000, 400
    edge.extend(total)
    acked = {"seq": -1}
    stop = threading.Event()

    def stream():
        seq = 0
        while seq < total and not stop.is_set():
            try:
                r = edge.post(edge.chain[seq : seq + size])
            except httpx.HTTPError:
                return
            assert r.status_code == 200, r.text
            acked["seq"] = r.json()["head"]["seq"]
            seq = acked["seq"] + 1

    try:
        client = threading.Thread(target=stream)
        client.start()
        while acked["seq"] < 3000 and client.is_alive():
            time.sleep(0.001)
        proc.kill()  # SIGKILL, most likely while a batch is in flight
        proc.wait()
        stop.set()
        client.join(timeout=60)
        acknowledged = acked["seq"]
        assert 3000 <= acknowledged < total - 1

        proc = start()
        head = edge.head()
        assert head["seq"] >= acknowledged  # nothing acknowledged is lost (a batch in flight may be in too)
        assert head["hash"] == edge.chain[head["seq"]].hash
        edge.verify_stored(head["seq"] + 1)

        seq = head["seq"] + 1
        while seq < total:
            r = edge.post(edge.chain[seq : seq + 2000])
            assert r.status_code == 200, r.text
            seq = r.json()["head"]["seq"] + 1
        edge.verify_stored(total)

        proc.send_signal(signal.SIGTERM)  # a clean stop on SIGTERM
        assert proc.wait(timeout=30) == 0
    finally:
        edge.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_openapi_describes_exactly_the_served_routes():
    spec = yaml.safe_load((ROOT / "services" / "gateway" / "openapi.yaml").read_text())
    assert spec["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops
                  if method in ("get", "put", "post", "delete", "patch", "options", "head")}
    app = create_app("sqlite:///unused.db")  # routes only; the database opens at startup, never here
    served = {(route.path, method) for route in app.routes for method in route.methods if method != "HEAD"}
    assert served == documented
