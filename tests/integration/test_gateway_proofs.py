"""Proofs for auditors: the gateway's per-origin proofs, cosigned checkpoints and key registry over real
HTTP (SQLite and PostgreSQL), checked by an independent verifier against a real box's own ledger;
and `mro-edge audit consistency | prove | export | verify` against that gateway, as an auditor at
headquarters runs them without the box.

The box is the real sign stage on LMDB (``LocalSign``): its entries and its signed checkpoints are
pushed to the gateway exactly as the uplink does (``POST /v1/entries``, ``POST /v1/checkpoints``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.gateway.admin import register_auditor, register_edge
from services.gateway.storage import open_storage
from shared.ledger.checkpoint import parse_checkpoint, split_note
from shared.ledger.entry import SignedEntry
from shared.ledger.keys import LedgerKeyFiles, SigningKey
from shared.ledger.merkle import verify_consistency, verify_inclusion
from shared.ledger.store import iter_entries, open_ledger
from shared.runtime.config import Config
from tests.brokers import free_port
from tests.edge import database
from tests.pipeline import ROOT
from tests.support.gateway import ThreadedGateway, batch_body
from tests.support.sign import LocalSign, record_item

BATCHES = (30, 45, 1, 24)  # a checkpoint after each: sizes 30, 75, 76, 100


# -- an independent RFC 6962 reference over the box's exact entry bytes -----------------------------

def ref_leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def ref_mth(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return ref_path(m, leaves[:k]) + [ref_mth(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [ref_mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return ref_subproof(m, leaves[:k], complete) + [ref_mth(leaves[k:])]
    return ref_subproof(m - k, leaves[k:], False) + [ref_mth(leaves[:k])]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(values: list[str]) -> list[bytes]:
    return [base64.b64decode(v) for v in values]


# -- a box, pushed to a gateway ------------------------------------------------------------------

@dataclass
class Box:
    data: Path
    config: Config
    origin: str
    entries: list[SignedEntry]
    checkpoints: list[bytes]  # the box's signed notes, oldest first
    token: str  # the edge's token at the gateway
    key: SigningKey

    @property
    def leaves(self) -> list[bytes]:
        return [ref_leaf(e.entry) for e in self.entries]

    def root(self, size: int) -> bytes:
        return ref_mth(self.leaves[:size])


def build_box(data: Path) -> tuple[Config, list[bytes]]:
    notes = []
    with LocalSign(data) as sign:
        sign.open()
        n = 0
        for count in BATCHES:
            sign.append([record_item(n + i) for i in range(count)])
            n += count
            note = sign.checkpoint()
            assert note is not None
            notes.append(note)
        config = sign.config
    return config, notes


def push_box(data: Path, db_url: str, gateway_url: str) -> Box:
    config, notes = build_box(data)
    store = open_ledger(config)
    try:
        entries = list(iter_entries(store))
    finally:
        store.close()
    key = LedgerKeyFiles(data / "keys").current(create=False)
    token = register_edge(db_url, config.origin, key.public_pem())
    with httpx.Client(base_url=gateway_url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        start = 0
        for note in notes:
            size = parse_checkpoint(split_note(note)[0]).size
            r = http.post("/v1/entries", content=batch_body(entries[start:size]),
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            r = http.post("/v1/checkpoints", json={"checkpoint": note.decode()})
            assert r.status_code == 200, r.text
            start = size
    return Box(data, config, config.origin, entries, notes, token, key)


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    with database("postgresql", tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(scope="module")
def pg_gateway(pg_url):
    with ThreadedGateway(pg_url) as gw:
        yield gw


@pytest.fixture(scope="module")
def pg_box(pg_url, pg_gateway, tmp_path_factory) -> Box:
    return push_box(tmp_path_factory.mktemp("box") / "data", pg_url, pg_gateway.url)


@pytest.fixture(scope="module")
def auditor_token(pg_url) -> str:
    return register_auditor(pg_url, "hq-quality")


# -- the HTTP API -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_gateway_proofs_match_the_box_and_an_independent_verifier(backend, tmp_path):
    with database(backend, tmp_path) as db_url, ThreadedGateway(db_url) as gw:
        box = push_box(tmp_path / "data", db_url, gw.url)
        auditor = register_auditor(db_url, "hq")
        http = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {auditor}"}, timeout=30)
        q = {"origin": box.origin}
        leaves = box.leaves

        listing = http.get("/v1/checkpoints", params=q).json()
        sizes = [c["size"] for c in listing["checkpoints"]]
        assert sizes == [30, 75, 76, 100] and listing["next_from_size"] is None
        for c, note in zip(listing["checkpoints"], box.checkpoints, strict=True):
            assert c["cosigned_checkpoint"].startswith(note.decode())  # the box's note, plus the cosignature
            assert base64.b64decode(c["root"]) == box.root(c["size"])  # the box's own root at that size
        page = http.get("/v1/checkpoints", params={**q, "order": "newest", "limit": 2}).json()
        assert [c["size"] for c in page["checkpoints"]] == [100, 76] and page["next_to_size"] == 75
        page = http.get("/v1/checkpoints", params={**q, "from_size": 31, "limit": 1}).json()
        assert [c["size"] for c in page["checkpoints"]] == [75] and page["next_from_size"] == 76

        for size in sizes + [1, 2, 64, 99]:
            for index in sorted({0, size // 2, size - 1}):
                r = http.get("/v1/proofs/inclusion", params={**q, "index": index, "size": size})
                assert r.status_code == 200, r.text
                body = r.json()
                proof = unb64(body["proof"])
                assert proof == ref_path(index, leaves[:size])
                assert base64.b64decode(body["leaf_hash"]) == leaves[index]
                assert body["entry_hash"] == box.entries[index].hash
                assert verify_inclusion(leaves[index], index, size, proof, box.root(size))
        for first in (1, 2, 30, 64, 75, 76, 100):
            for second in (s for s in (30, 75, 76, 100) if s >= first):
                body = http.get("/v1/proofs/consistency", params={**q, "first": first, "second": second}).json()
                proof = unb64(body["proof"])
                assert proof == ref_subproof(first, leaves[:second], True)
                assert verify_consistency(first, second, box.root(first), box.root(second), proof)
                assert base64.b64decode(body["second_root"]) == box.root(second)
        # defaults: the newest cosigned checkpoint
        assert http.get("/v1/proofs/inclusion", params={**q, "index": 3}).json()["tree_size"] == 100
        assert http.get("/v1/proofs/consistency", params={**q, "first": 30}).json()["second"] == 100
        keys = http.get("/v1/keys", params=q).json()["keys"]
        assert [k["kid"] for k in keys] == [box.key.kid] and keys[0]["public_key_pem"] == box.key.public_pem()

        # refusals: each says what was wrong
        def code(path: str, params: dict, headers: dict | None = None) -> tuple[int, str]:
            r = http.get(path, params=params, headers=headers)
            return r.status_code, r.json()["error"]["code"]

        assert code("/v1/proofs/inclusion", {**q, "index": 100, "size": 100}) == (400, "bad_index")
        assert code("/v1/proofs/inclusion", {**q, "index": 0, "size": 101}) == (409, "not_held")
        assert code("/v1/proofs/inclusion", {**q, "index": "x"}) == (400, "bad_parameter")
        assert code("/v1/proofs/inclusion", q) == (400, "bad_parameter")
        assert code("/v1/proofs/consistency", {**q, "first": 0, "second": 5}) == (400, "bad_parameter")
        assert code("/v1/proofs/consistency", {**q, "first": 9, "second": 5}) == (400, "bad_sizes")
        assert code("/v1/checkpoints", {**q, "order": "sideways"}) == (400, "bad_parameter")
        assert code("/v1/keys", {"origin": "mro-edge/NOWHERE"}) == (404, "unknown_origin")
        assert code("/v1/keys", {}) == (400, "missing_origin")
        assert code("/v1/keys", q, {"Authorization": "Bearer nope"}) == (401, "invalid_token")
        assert code("/v1/keys", q, {"Authorization": ""}) == (401, "unauthenticated")
        # the edge's own token reads its own origin (default) and no other
        edge = {"Authorization": f"Bearer {box.token}"}
        assert http.get("/v1/checkpoints", headers=edge).json()["origin"] == box.origin
        assert code("/v1/keys", {"origin": "mro-edge/OTHER"}, edge) == (403, "forbidden")
        # an auditor's token pushes nothing; registering the name again replaces it
        r = http.post("/v1/entries", content=batch_body(box.entries[:1]), headers={"Content-Type": "application/json"})
        assert r.status_code == 401
        renewed = register_auditor(db_url, "hq")
        assert code("/v1/keys", q) == (401, "invalid_token")
        http.headers["Authorization"] = f"Bearer {renewed}"
        assert http.get("/v1/keys", params=q).status_code == 200
        from services.gateway.admin import RegistrationError, revoke_auditor

        gone = register_auditor(db_url, "leaving")
        assert revoke_auditor(db_url, "leaving") == 1
        assert code("/v1/keys", q, {"Authorization": f"Bearer {gone}"}) == (401, "invalid_token")
        with pytest.raises(RegistrationError, match="no auditor named"):
            revoke_auditor(db_url, "leaving")

        # a damaged tree is reported, never papered over
        storage = open_storage(db_url, pool_size=1)
        try:
            with storage.transaction() as tx:
                tx._exec("DELETE FROM merkle_nodes WHERE origin = ? AND level = 0 AND idx = 5", (box.origin,))
        finally:
            storage.close()
        assert code("/v1/proofs/inclusion", {**q, "index": 4, "size": 8}) == (500, "tree_damaged")
        assert http.get("/v1/proofs/inclusion", params={**q, "index": 40, "size": 100}).status_code == 200

        metrics = httpx.get(gw.url + "/metrics").text
        served = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("mro_gateway_audit_answers_total{")}
        assert served['kind="inclusion"'] >= 20 and served['kind="consistency"'] >= 10 and served['kind="keys"'] == 2
        http.close()


VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "merkle"  # provenance: tests/vectors/README.md
RFC6962_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                              "606162636465666768696a6b6c6d6e6f")]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_gateway_proofs_reproduce_the_public_rfc6962_vectors(backend, tmp_path):
    """The gateway's tree table and proof endpoints over RFC 6962's 8-leaf test tree (the leaves the
    transparency-dev vectors use; the gateway's ingest only takes signed entries, so the leaves go in
    through its tree code, ``OriginTree``, as ingest puts them): every happy-path proof, byte for byte."""
    from services.gateway.tree import OriginTree

    origin = "rfc6962/test-tree"
    with database(backend, tmp_path) as db_url, ThreadedGateway(db_url) as gw:
        storage = open_storage(db_url, pool_size=1)
        try:
            with storage.transaction() as tx:
                tx.ensure_head(origin, "2025-01-01T00:00:00Z")
                tree = OriginTree(tx, origin)
                tree.extend(RFC6962_LEAVES, 0)
                tree.flush()
        finally:
            storage.close()
        auditor = register_auditor(db_url, "vectors")
        checked = 0
        with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {auditor}"}, timeout=30) as http:
            for path in sorted((VECTORS / "inclusion").glob("[0-9]/happy-path.json")):
                v = json.loads(path.read_text())
                body = http.get("/v1/proofs/inclusion", params={"origin": origin, "index": v["leafIdx"],
                                                                 "size": v["treeSize"]}).json()
                assert (body["leaf_hash"], body["root"], body["proof"]) == (v["leafHash"], v["root"], v["proof"] or [])
                checked += 1
            for path in sorted((VECTORS / "consistency").glob("[0-9]/happy-path.json")):
                v = json.loads(path.read_text())
                body = http.get("/v1/proofs/consistency", params={"origin": origin, "first": v["size1"],
                                                                   "second": v["size2"]}).json()
                assert (body["first_root"], body["second_root"], body["proof"]) == (v["root1"], v["root2"],
                                                                                    v["proof"] or [])
                checked += 1
        assert checked == 10


# -- the CLI, as an auditor runs it -----------------------------------------------------------------

def cli(*args: str, env: dict[str, str] | None = None, data: Path | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    full.update(env or {})
    if data is not None:
        full["MRO_DATA_DIR"] = str(data)
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_consistency_and_inclusion_from_the_gateway_and_from_the_box(pg_box, pg_gateway, auditor_token, tmp_path):
    box = pg_box
    env = {"MRO_AUDIT_TOKEN": auditor_token}
    gw = ["--gateway", pg_gateway.url, "--origin", box.origin]

    # without the box: the gateway's cosigned checkpoints, its proof, its key registry
    r = cli("audit", "consistency", *gw, "--json", env=env, data=tmp_path / "no-box")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["ok"], report["first"], report["second"]) == (True, 76, 100)
    assert report["keys_from"] == "the gateway's key registry" and report["proof_from"] == "the gateway"
    assert base64.b64decode(report["second_root"]) == box.root(100)
    assert any("taken from the gateway itself" in w for w in report["warnings"])
    vkey = httpx.get(pg_gateway.url + "/v1/cosigner-key").json()["vkey"]
    r = cli("audit", "consistency", *gw, "--first", "30", "--second", "76", "--cosigner-key", vkey, env=env,
            data=tmp_path / "no-box")
    assert r.returncode == 0 and "OK: the checkpoint of size 30 is a prefix of the checkpoint of size 76" in r.stdout
    assert "taken from the gateway itself" not in r.stderr
    wrong = "mro-gateway+" + vkey.split("+", 2)[1] + "+" + b64(b"\x04" + bytes(32))
    r = cli("audit", "consistency", *gw, "--cosigner-key", wrong, env=env, data=tmp_path / "no-box")
    assert r.returncode == 2 and "--cosigner-key" in r.stderr  # a malformed (ID mismatch) vkey is a usage error
    other = SigningKey.generate()
    from shared.ledger.checkpoint import cosignature_vkey

    r = cli("audit", "consistency", *gw, "--cosigner-key", cosignature_vkey("mro-gateway", other.public_bytes),
            env=env, data=tmp_path / "no-box")
    assert r.returncode == 1 and "carries no cosignature of mro-gateway" in r.stderr

    # on the box, no gateway: its own checkpoints and Merkle tree
    r = cli("audit", "consistency", "--json", data=box.data)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["first"], report["second"], report["proof_from"]) == (76, 100, "the box's Merkle tree")
    # two checkpoint files: the box's first against the gateway's newest receipt, the proof from the gateway
    (tmp_path / "old").write_bytes(box.checkpoints[0])
    newest = httpx.get(pg_gateway.url + "/v1/checkpoints", params={"origin": box.origin, "order": "newest"},
                       headers={"Authorization": f"Bearer {auditor_token}"}).json()["checkpoints"][0]
    (tmp_path / "new").write_text(newest["cosigned_checkpoint"])
    r = cli("audit", "consistency", str(tmp_path / "old"), str(tmp_path / "new"), *gw, env=env,
            data=tmp_path / "no-box")
    assert r.returncode == 0 and "size 30 is a prefix of the checkpoint of size 100" in r.stdout, r.stderr

    # a checkpoint of another history, signed by the box's own key: not a prefix -> exit 1, said loudly
    from shared.ledger.checkpoint import Checkpoint, sign_checkpoint

    forged = Checkpoint(box.origin, 30, hashlib.sha256(b"rewritten").digest())
    (tmp_path / "forged").write_text(sign_checkpoint(forged, box.key))
    r = cli("audit", "consistency", str(tmp_path / "forged"), str(tmp_path / "new"), *gw, env=env,
            data=tmp_path / "no-box")
    assert r.returncode == 1 and "INCONSISTENT" in r.stderr

    # inclusion of one record, with its exact bytes, without the box
    (tmp_path / "rec").write_bytes(box.entries[42].entry)
    r = cli("audit", "prove", "42", "--entry", str(tmp_path / "rec"), *gw, "--json", env=env,
            data=tmp_path / "no-box")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["tree_size"] == 100 and unb64(report["proof"]) == ref_path(42, box.leaves)
    r = cli("audit", "prove", "41", "--entry", str(tmp_path / "rec"), *gw, env=env, data=tmp_path / "no-box")
    assert r.returncode == 1 and "it is not this record" in r.stderr
    r = cli("audit", "prove", "7", "--size", "30", data=box.data)
    assert r.returncode == 0 and "the box's Merkle tree" in r.stdout, r.stderr
    r = cli("audit", "consistency", *gw, "--first", "31", env=env, data=tmp_path / "no-box")
    assert r.returncode == 2 and "no checkpoint of size 31" in r.stderr
    # no token: a usage error that says how to get one
    r = cli("audit", "consistency", *gw, data=tmp_path / "no-box")
    assert r.returncode == 2 and "register-auditor" in r.stderr


def test_export_bundles_the_cosigned_checkpoints_and_verify_needs_an_anchor(pg_box, pg_gateway, auditor_token,
                                                                             tmp_path):
    box = pg_box
    link = {"MRO_LINK_GATEWAY_URL": pg_gateway.url, "MRO_LINK_TOKEN": box.token}
    r = cli("audit", "export", "--out", str(tmp_path / "export"), env=link, data=box.data)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "export" / "gateway.json").read_text())
    assert manifest["fetched"] is True and [c["size"] for c in manifest["checkpoints"]] == [30, 75, 76, 100]
    vkey = httpx.get(pg_gateway.url + "/v1/cosigner-key").json()["vkey"]
    assert manifest["cosigner"]["vkey"] == vkey

    # plain verify: passes, but says loudly that only self-consistency was proved
    r = cli("audit", "verify", str(tmp_path / "export"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["gateway_checkpoints"] == 4 and report["anchored_by"] == []
    assert report["warning"].startswith("NOT ANCHORED") and "NOT ANCHORED" in r.stderr
    # anchored: the pinned cosigner key, the gateway's registry, or the box's key
    r = cli("audit", "verify", str(tmp_path / "export"), "--cosigner-key", vkey, "--json")
    assert r.returncode == 0 and "NOT ANCHORED" not in r.stderr, r.stdout + r.stderr
    assert json.loads(r.stdout)["anchored_by"] == ["4 gateway cosignatures under the pinned cosigner key"]
    r = cli("audit", "verify", str(tmp_path / "export"), "--gateway", pg_gateway.url, "--json",
            env={"MRO_AUDIT_TOKEN": auditor_token})
    assert r.returncode == 0 and "NOT ANCHORED" not in r.stderr, r.stdout + r.stderr
    assert json.loads(r.stdout)["anchored_by"] == ["the gateway's key registry",
                                                   "the gateway's live cosigned checkpoints"]

    # a bundled cosignature that was tampered with is refused
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(tmp_path / "export"), str(bad)], check=True)
    doc = json.loads((bad / "gateway.json").read_text())
    note = doc["checkpoints"][1]["cosigned_checkpoint"]
    line = note.rstrip("\n").rsplit("\n", 1)[1]
    sig = bytearray(base64.b64decode(line.rsplit(" ", 1)[1]))
    sig[-1] ^= 1
    doc["checkpoints"][1]["cosigned_checkpoint"] = note.replace(line, line.rsplit(" ", 1)[0] + " " + b64(bytes(sig)))
    (bad / "gateway.json").write_text(json.dumps(doc))
    r = cli("audit", "verify", str(bad))
    assert r.returncode == 1 and "cosignature" in r.stdout, r.stdout

    # a complete forgery: the same origin, every entry re-signed under another key
    forged_cfg, _ = build_box(tmp_path / "forger")
    assert forged_cfg.origin == box.origin
    r = cli("audit", "export", "--out", str(tmp_path / "forgery"), "--no-gateway", data=tmp_path / "forger")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "forgery" / "gateway.json").read_text())["reason"] == "not asked (--no-gateway)"
    r = cli("audit", "verify", str(tmp_path / "forgery"))
    assert r.returncode == 0 and "NOT ANCHORED" in r.stderr  # passes plain verify, only with the warning
    (tmp_path / "box.pem").write_text(box.key.public_pem())
    r = cli("audit", "verify", str(tmp_path / "forgery"), "--trusted-key", str(tmp_path / "box.pem"))
    assert r.returncode == 1 and "not one of the trusted" in r.stdout
    r = cli("audit", "verify", str(tmp_path / "forgery"), "--gateway", pg_gateway.url,
            env={"MRO_AUDIT_TOKEN": auditor_token})
    assert r.returncode == 1 and "FAILED" in r.stdout, r.stdout + r.stderr


def test_export_says_when_the_gateway_could_not_be_asked(pg_box, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    r = cli("audit", "export", "--out", str(tmp_path / "e"), env={"MRO_LINK_GATEWAY_URL": closed,
                                                                  "MRO_LINK_TOKEN": pg_box.token}, data=pg_box.data)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "e" / "gateway.json").read_text())
    assert manifest["fetched"] is False and "could not be asked" in manifest["reason"]
    assert "bundles no gateway checkpoints" in r.stderr
    r = cli("audit", "verify", str(tmp_path / "e"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["gateway_manifest"]["fetched"] is False


def test_auditor_tokens_from_the_cli(pg_url, pg_gateway, pg_box, tmp_path):
    env = {"MRO_GATEWAY_DB_URL": pg_url}
    r = cli("gateway", "register-auditor", "cli-auditor", env=env, data=tmp_path / "none")
    assert r.returncode == 0 and "read-only" in r.stderr, r.stderr
    token = r.stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(pg_gateway.url + "/v1/keys", params={"origin": pg_box.origin}, headers=headers).status_code == 200
    r = cli("gateway", "revoke-auditor", "cli-auditor", env=env, data=tmp_path / "none")
    assert r.returncode == 0, r.stderr
    assert httpx.get(pg_gateway.url + "/v1/keys", params={"origin": pg_box.origin}, headers=headers).status_code == 401
    r = cli("gateway", "revoke-auditor", "cli-auditor", env=env, data=tmp_path / "none")
    assert r.returncode == 2 and "no auditor named" in r.stderr
