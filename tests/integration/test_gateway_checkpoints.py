"""The gateway's checkpoint cosigning and key-rotation registry, over real HTTP, SQLite and PostgreSQL.

Edges sign real C2SP checkpoints over real chains; the gateway must cosign exactly the ones
that match the entries it holds and extend the last one it accepted, and its cosignatures
must verify with our code and with stock OpenSSL. The fixtures (a gateway per database
backend, an edge registered at it) are in tests/integration/conftest.py.
"""


from __future__ import annotations

import base64
import shutil
import subprocess
import uuid

import httpx

from services.gateway.admin import register_edge
from services.gateway.storage import open_storage
from shared.ledger.canonical import canonical_json, sha256_hex
from shared.ledger.checkpoint import (
    Checkpoint,
    parse_checkpoint,
    parse_vkey,
    sign_checkpoint,
    split_note,
    verified_cosignatures,
    verify_cosignature,
)
from shared.ledger.entry import KEY_ROTATION, SignedEntry, entry_bytes, rotation_body, sign_entry
from shared.ledger.keys import SigningKey
from shared.ledger.merkle import Frontier, leaf_hash
from tests.support.gateway_edge import Edge, entry_with


def checkpoint_of(entries: list[SignedEntry], origin: str, key: SigningKey) -> str:
    frontier = Frontier()
    for e in entries:
        frontier.append(leaf_hash(e.entry))
    return sign_checkpoint(Checkpoint(origin, len(entries), frontier.root()), key)


def post_checkpoint(edge: Edge, note: str) -> httpx.Response:
    return edge.http.post("/v1/checkpoints", json={"checkpoint": note})


def rotation_entry(edge: Edge, old: SigningKey, new: SigningKey) -> SignedEntry:
    seq = len(edge.chain)
    body = rotation_body(new.public_bytes, seq + 1)
    idem = sha256_hex(canonical_json(body))
    data = entry_bytes(origin=edge.origin, seq=seq, prev=edge.chain[-1].hash, idem=idem, kid=old.kid,
                       recorded_at="2025-01-02T00:00:00.000Z", type=KEY_ROTATION, body=body)
    signed = sign_entry(old, data, seq, idem)
    edge.chain.append(signed)
    return signed


def test_checkpoint_is_cosigned_and_the_cosignature_verifies(edge, gateway, tmp_path):
    batch = edge.extend(300)
    assert edge.post(batch).status_code == 200
    note = checkpoint_of(batch, edge.origin, edge.key)
    r = post_checkpoint(edge, note)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["size"] == 300 and answer["origin"] == edge.origin and answer["signed_by"] == edge.key.kid
    assert answer["cosigned_checkpoint"] == note + answer["cosignature"]

    info = httpx.get(gateway.url + "/v1/cosigner-key").json()  # no token needed
    name, public = parse_vkey(info["vkey"], 0x04)
    assert name == answer["cosigner"] == info["name"]
    text, _ = split_note(note)
    assert verify_cosignature(text, answer["cosignature"], name, public) == answer["timestamp"]
    assert verified_cosignatures(answer["cosigned_checkpoint"], {name: public}) == {name: answer["timestamp"]}

    if shutil.which("openssl"):
        # The cosignature by hand: Ed25519 over "cosignature/v1\ntime <t>\n" + checkpoint text.
        raw = base64.b64decode(answer["cosignature"].split(" ")[2])
        (tmp_path / "msg").write_bytes(f"cosignature/v1\ntime {answer['timestamp']}\n{text}".encode())
        (tmp_path / "sig").write_bytes(raw[12:])
        (tmp_path / "gw.pem").write_text(info["public_key_pem"])
        run = subprocess.run(["openssl", "pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", "gw.pem", "-in", "msg",
                              "-sigfile", "sig"], cwd=tmp_path, capture_output=True, text=True, check=False)
        assert run.returncode == 0 and "Signature Verified Successfully" in run.stdout, run.stderr


def test_order_replay_and_not_held(edge):
    batch = edge.extend(120)
    assert edge.post(batch[:100]).status_code == 200
    cp50, cp100, cp120 = (checkpoint_of(batch[:n], edge.origin, edge.key) for n in (50, 100, 120))

    r = post_checkpoint(edge, cp120)
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_held"
    assert r.json()["error"]["held"] == 100 and r.json()["error"]["head"]["seq"] == 99

    assert post_checkpoint(edge, cp50).status_code == 200
    assert post_checkpoint(edge, cp100).status_code == 200
    again = post_checkpoint(edge, cp100)  # idempotent: a fresh cosignature of the same checkpoint
    assert again.status_code == 200 and again.json()["size"] == 100

    replay = post_checkpoint(edge, cp50)
    assert replay.status_code == 409
    assert replay.json()["error"]["code"] == "stale_checkpoint" and replay.json()["error"]["last_size"] == 100

    assert edge.post(batch[100:]).status_code == 200
    assert post_checkpoint(edge, cp120).status_code == 200


def test_forked_checkpoint_is_refused_and_kept_as_evidence(db_url, edge):
    batch = edge.extend(64)
    assert edge.post(batch).status_code == 200
    # The same key signs a checkpoint over a different history of the same length.
    forked = batch[:40] + list(_rechain(edge, batch[39], 24))
    note = checkpoint_of(forked, edge.origin, edge.key)
    r = post_checkpoint(edge, note)
    assert r.status_code == 409 and r.json()["error"]["code"] == "inconsistent"
    assert "FORK" in r.json()["error"]["message"]
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction(write=False) as tx:
            evidence = tx.checkpoint_forks(edge.origin)
            assert tx.last_checkpoint(edge.origin) is None
    finally:
        storage.close()
    assert [(e["size"], e["note"]) for e in evidence] == [(64, note)]
    # The genuine one is still accepted, and a fork of a smaller size after it is refused too.
    assert post_checkpoint(edge, checkpoint_of(batch, edge.origin, edge.key)).status_code == 200
    r = post_checkpoint(edge, checkpoint_of(forked[:50], edge.origin, edge.key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "inconsistent"


def _rechain(edge: Edge, after: SignedEntry, count: int):
    prev, seq = after.hash, after.seq + 1
    for i in range(count):
        e = entry_with(edge.key, edge.origin, seq, prev, {"forked": i})
        prev, seq = e.hash, seq + 1
        yield e


def test_bad_signatures_origins_and_bodies(db_url, gateway, edge):
    batch = edge.extend(10)
    assert edge.post(batch).status_code == 200
    note = checkpoint_of(batch, edge.origin, edge.key)
    tampered = note.replace("\n10\n", "\n9\n", 1)
    r = post_checkpoint(edge, tampered)
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_signature"
    stranger = SigningKey.generate()
    r = post_checkpoint(edge, checkpoint_of(batch, edge.origin, stranger))
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_signature"
    other = Edge(db_url, gateway.url)
    try:
        r = post_checkpoint(other, note)
        assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_origin"
    finally:
        other.close()
    r = post_checkpoint(edge, "not a note")
    assert r.status_code == 422 and r.json()["error"]["code"] == "malformed_checkpoint"
    r = edge.http.post("/v1/checkpoints", content=b'{"note": "x"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(gateway.url + "/v1/checkpoints", json={"checkpoint": note})
    assert r.status_code == 401


def test_key_rotation_is_honoured(db_url, gateway, edge):
    old = edge.key
    assert edge.post(edge.extend(10)).status_code == 200
    new = SigningKey.generate()
    rotation = rotation_entry(edge, old, new)
    edge.key = new
    after = edge.extend(5)
    # The new key was never registered: the rotation entry signed by the old key introduces it.
    r = edge.post([rotation] + after)
    assert r.status_code == 200, r.text
    assert r.json()["head"]["seq"] == 15

    # The old key is retired from seq 11 on, even for a validly chained entry.
    stale = entry_with(old, edge.origin, 16, after[-1].hash, {"signed": "by the old key"})
    r = edge.post([stale])
    assert r.status_code == 422 and r.json()["error"]["code"] == "retired_key"
    assert "retired" in r.json()["error"]["message"]
    # The new key cannot sign history from before the rotation.
    early = entry_with(new, edge.origin, 5, edge.chain[4].hash, {"backdated": True})
    r = edge.post([early])
    assert r.status_code == 422 and r.json()["error"]["code"] == "retired_key"

    # Checkpoints: the new key signs sizes from 11 on; the old key only up to size 11.
    assert post_checkpoint(edge, checkpoint_of(edge.chain[:11], edge.origin, old)).status_code == 200
    assert post_checkpoint(edge, checkpoint_of(edge.chain, edge.origin, new)).status_code == 200
    r = post_checkpoint(edge, checkpoint_of(edge.chain, edge.origin, old))
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_signature"

    # A second rotation, by the new key, to a key another origin already uses: refused.
    other_key = SigningKey.generate()
    register_edge(db_url, f"mro-edge/O{uuid.uuid4().hex[:6]}", other_key.public_pem())
    bad = rotation_entry(edge, new, other_key)
    r = edge.post([bad])
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_rotation"
    edge.chain.pop()
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction(write=False) as tx:
            assert [(x.seq, x.old_kid, x.new_kid) for x in tx.rotations(edge.origin)] == [(10, old.kid, new.kid)]
    finally:
        storage.close()


def test_tree_is_built_for_entries_stored_before_it_existed(db_url, edge):
    batch = edge.extend(1000)
    assert edge.post(batch).status_code == 200
    storage = open_storage(db_url, pool_size=1)
    try:
        with storage.transaction() as tx:
            tx._exec("DELETE FROM merkle_nodes WHERE origin = ?", (edge.origin,))
            tx._exec("DELETE FROM merkle_sizes WHERE origin = ?", (edge.origin,))
    finally:
        storage.close()
    r = post_checkpoint(edge, checkpoint_of(batch[:777], edge.origin, edge.key))
    assert r.status_code == 200, r.text
    more = edge.extend(30)
    assert edge.post(more).status_code == 200
    r = post_checkpoint(edge, checkpoint_of(edge.chain, edge.origin, edge.key))
    assert r.status_code == 200, r.text
    assert parse_checkpoint(split_note(r.json()["cosigned_checkpoint"])[0]).size == 1030
