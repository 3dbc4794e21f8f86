"""`mro-edge audit export | verify`: a real ledger store, every tamper case, and the openssl path."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shared.ledger.audit import AuditError, export_audit, verify_audit
from shared.ledger.canonical import canonical_json, sha256_hex
from shared.ledger.checkpoint import Checkpoint, sign_checkpoint
from shared.ledger.entry import GENESIS_PREV, SignedEntry, entry_bytes, export_line, parse_export_line, sign_entry
from shared.ledger.keys import SigningKey, public_key_to_pem
from shared.ledger.merkle import MERKLE_TABLE, leaf_hash, lmdb_tree, node_key
from shared.ledger.store import LEDGER_TABLE, decode_entry, encode_entry
from shared.runtime.config import Config
from shared.runtime.store import Store, u64

AT = "2025-03-14T09:26:53.589Z"
TOOLS = ("openssl", "sha256sum", "bash", "grep")


def body(seq: int, variant: str = "a") -> dict[str, Any]:
    return {
        "schema": "mro.record/1",
        "type": "torque_event",
        "event_id": f"00000000-0000-4000-8000-{seq:012d}",
        "torque_nm": "25.5",
        "variant": variant,
        "notes": 'wrench "B" \u00e9 \U0001f527',
    }


class Ledger:
    """A sign-stage store (``$data/sign``, table ``ledger`` and optionally ``merkle``) we append to."""

    def __init__(self, data_dir: Path, *, merkle: bool = False, keys_from: Ledger | None = None) -> None:
        self.config = Config(data_dir=str(data_dir))
        if keys_from is not None:
            shutil.copytree(keys_from.config.data_path / "keys", self.config.data_path / "keys")
        self.key = SigningKey.load_or_create(self.config.data_path / "keys")
        self.tables = (LEDGER_TABLE, MERKLE_TABLE) if merkle else (LEDGER_TABLE,)
        self.entries: list[SignedEntry] = []

    def store(self) -> Store:
        return Store(self.config.stage_dir("sign"), self.tables, map_size_mb=64)

    def append(self, n: int, variant: str = "a", key: SigningKey | None = None) -> None:
        key = key or self.key
        store = self.store()
        try:
            with store.write() as txn:
                for _ in range(n):
                    seq = len(self.entries)
                    prev = self.entries[-1].hash if self.entries else GENESIS_PREV
                    b = body(seq, variant)
                    idem = sha256_hex(canonical_json(b))
                    entry = entry_bytes(origin=self.config.origin, seq=seq, prev=prev, idem=idem, kid=key.kid,
                                        recorded_at=AT, type=b["type"], body=b)
                    signed = sign_entry(key, entry, seq, idem)
                    txn.put(u64(seq), encode_entry(signed), db=store.table(LEDGER_TABLE), append=True)
                    if MERKLE_TABLE in self.tables:
                        lmdb_tree(txn, store.table(MERKLE_TABLE)).append(leaf_hash(entry))
                    self.entries.append(signed)
        finally:
            store.close()

    def copy_prefix(self, other: Ledger, n: int) -> None:
        """Start this ledger with the first n entries of ``other`` (same key: a forked history)."""
        store = self.store()
        try:
            with store.write() as txn:
                for e in other.entries[:n]:
                    txn.put(u64(e.seq), encode_entry(e), db=store.table(LEDGER_TABLE), append=True)
                    if MERKLE_TABLE in self.tables:
                        lmdb_tree(txn, store.table(MERKLE_TABLE)).append(leaf_hash(e.entry))
                    self.entries.append(e)
        finally:
            store.close()


def lines(d: Path) -> list[bytes]:
    return (d / "entries.jsonl").read_bytes().splitlines(keepends=True)


def write_lines(d: Path, rows: list[bytes]) -> None:
    (d / "entries.jsonl").write_bytes(b"".join(rows))


def expect(d: Path, seq: int | None, match: str, **kw: Any) -> AuditError:
    with pytest.raises(AuditError) as info:
        verify_audit(d, **kw)
    assert info.value.seq == seq, str(info.value)
    assert re.search(match, info.value.reason), info.value.reason
    return info.value


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Ledger, Path]:
    base = tmp_path_factory.mktemp("audit")
    ledger = Ledger(base / "data")
    ledger.append(25)
    out = base / "export"
    summary = export_audit(ledger.config, out, seqs=[0, 7, 24])
    assert summary["entries"] == 25 and summary["proofs"] == [0, 7, 24]
    assert summary["merkle"] == "recomputed"
    return ledger, out


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(exported[1], d)
    return d


def test_export_layout_and_verify(exported):
    ledger, out = exported
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert names == sorted(["README.txt", "checkpoint", "checkpoint.body", "checkpoint.sig", "entries.jsonl",
                            "ledger-key.pem", "keys", f"keys/{ledger.key.kid}.pem", "proofs",
                            *(f"proofs/{s}.{x}" for s in (0, 7, 24) for x in ("json", "entry", "sig", "pem"))])
    report = verify_audit(out, trusted_keys=[ledger.key.public_bytes])
    assert report["ok"] and report["entries"] == 25 and report["proofs"] == 3
    assert report["origin"] == ledger.config.origin and report["kid"] == ledger.key.kid
    proof = json.loads((out / "proofs" / "7.json").read_text())
    assert set(proof) == {"seq", "tree_size", "leaf_hash", "proof", "root"} and proof["tree_size"] == 25
    assert (out / "proofs" / "7.entry").read_bytes() == ledger.entries[7].entry
    assert (out / "ledger-key.pem").read_text() == ledger.key.public_pem()


def test_export_with_the_stored_merkle_table_and_empty_ledger(tmp_path):
    ledger = Ledger(tmp_path / "data", merkle=True)
    ledger.append(0)
    summary = export_audit(ledger.config, tmp_path / "empty")
    assert summary["entries"] == 0
    assert verify_audit(tmp_path / "empty")["tree_size"] == 0
    ledger.append(13)
    ledger.append(4)
    summary = export_audit(ledger.config, tmp_path / "out", seqs=[3, 16])
    assert summary["merkle"] == "stored" and summary["entries"] == 17
    assert verify_audit(tmp_path / "out")["proofs"] == 2
    # the same ledger without the stored tree yields the same checkpoint root and proofs
    plain = Ledger(tmp_path / "plain", keys_from=ledger)
    plain.copy_prefix(ledger, 17)
    other = export_audit(plain.config, tmp_path / "out2", seqs=[3, 16])
    assert other["merkle"] == "recomputed" and other["root"] == summary["root"]
    for s in (3, 16):
        assert (tmp_path / "out" / "proofs" / f"{s}.json").read_text() == (
            tmp_path / "out2" / "proofs" / f"{s}.json").read_text()
    with pytest.raises(FileExistsError):
        export_audit(ledger.config, tmp_path / "out")
    with pytest.raises(ValueError):
        export_audit(ledger.config, tmp_path / "out3", seqs=[17])
    assert not (tmp_path / "out3").exists()


def test_damaged_store_is_reported_with_its_seq_and_nothing_is_exported(tmp_path):
    ledger = Ledger(tmp_path / "data", merkle=True)
    ledger.append(12)
    store = ledger.store()
    with store.write() as txn:
        e = decode_entry(txn.get(u64(5), db=store.table(LEDGER_TABLE)))
        flipped = SignedEntry(e.seq, e.idem, e.entry.replace(b"25.5", b"26.5"), e.hash, e.signature, e.kid)
        txn.put(u64(5), encode_entry(flipped), db=store.table(LEDGER_TABLE))
    store.close()
    with pytest.raises(AuditError) as info:
        export_audit(ledger.config, tmp_path / "out")
    assert info.value.seq == 5 and "hash" in info.value.reason
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))

    ledger2 = Ledger(tmp_path / "data2", merkle=True)
    ledger2.append(12)
    store = ledger2.store()
    with store.write() as txn:
        txn.put(node_key(0, 9), bytes(32), db=store.table(MERKLE_TABLE))
    store.close()
    with pytest.raises(AuditError) as info:
        export_audit(ledger2.config, tmp_path / "out2")
    assert info.value.seq == 9 and "Merkle leaf" in info.value.reason

    store = ledger2.store()
    with store.write() as txn:
        merkle = store.table(MERKLE_TABLE)
        txn.put(node_key(0, 9), leaf_hash(ledger2.entries[9].entry), db=merkle)
        good = txn.get(node_key(2, 2), db=merkle)
        txn.put(node_key(2, 2), bytes(32), db=merkle)  # interior node of leaves 8..11, part of root(12)
    store.close()
    with pytest.raises(AuditError, match="interior node"):
        export_audit(ledger2.config, tmp_path / "out3")

    store = ledger2.store()
    with store.write() as txn:
        merkle = store.table(MERKLE_TABLE)
        txn.put(node_key(2, 2), good, db=merkle)
        txn.put(node_key(2, 1), bytes(32), db=merkle)  # leaves 4..7: not in root(12), in the proof of seq 0
    store.close()
    export_audit(ledger2.config, tmp_path / "out4", seqs=[9])
    with pytest.raises(AuditError) as info:
        export_audit(ledger2.config, tmp_path / "out5", seqs=[0])
    assert info.value.seq == 0 and "proof" in info.value.reason


# -- tamper cases on an export -------------------------------------------------------------------

def test_edited_body(export_copy):
    rows = lines(export_copy)
    rows[9] = rows[9].replace(b"25.5", b"99.5", 1)
    write_lines(export_copy, rows)
    expect(export_copy, 9, "hash does not match")


def test_edited_body_with_recomputed_hash(export_copy, exported):
    e = exported[0].entries[9]
    forged = e.entry.replace(b"25.5", b"99.5")
    rows = lines(export_copy)
    rows[9] = export_line(SignedEntry(e.seq, e.idem, forged, sha256_hex(forged), e.signature, e.kid))
    assert rows[9] != lines(export_copy)[9]
    write_lines(export_copy, rows)
    expect(export_copy, 9, "signature is not valid")


def test_reordered(export_copy):
    rows = lines(export_copy)
    rows[4], rows[5] = rows[5], rows[4]
    write_lines(export_copy, rows)
    expect(export_copy, 4, "found seq 5")


def test_deleted(export_copy):
    rows = lines(export_copy)
    del rows[11]
    write_lines(export_copy, rows)
    expect(export_copy, 11, "found seq 12")


def test_inserted(export_copy):
    rows = lines(export_copy)
    rows.insert(6, rows[5])
    write_lines(export_copy, rows)
    expect(export_copy, 6, "found seq 5")


def test_truncated(export_copy):
    write_lines(export_copy, lines(export_copy)[:20])
    expect(export_copy, 20, "missing")


def test_truncated_mid_line(export_copy):
    data = (export_copy / "entries.jsonl").read_bytes()
    (export_copy / "entries.jsonl").write_bytes(data[:-40])
    expect(export_copy, 24, "line 25")


def test_appended_row_beyond_checkpoint(export_copy):
    rows = lines(export_copy)
    rows.append(rows[-1])
    write_lines(export_copy, rows)
    expect(export_copy, 25, "found seq 24")


def test_swapped_key_pem(export_copy, exported):
    intruder = SigningKey(bytes(range(1, 33))).public_pem()
    (export_copy / "ledger-key.pem").write_text(intruder)
    expect(export_copy, None, "not the key that signed checkpoint")
    (export_copy / "keys" / f"{exported[0].key.kid}.pem").write_text(intruder)
    expect(export_copy, 0, "unknown key")


def test_swapped_record_key_file(export_copy):
    (export_copy / "proofs" / "7.pem").write_text(SigningKey(bytes(range(1, 33))).public_pem())
    expect(export_copy, 7, r"7\.pem is not the key")


def test_untrusted_key_pem_even_if_consistent(exported):
    """A forger who re-signs everything with their own key is caught only by the out-of-band kid."""
    with pytest.raises(AuditError, match="not one of the trusted"):
        verify_audit(exported[1], trusted_keys=[SigningKey(bytes(range(1, 33))).public_bytes])


def test_checkpoint_tampered_or_resigned(export_copy, exported):
    ledger, _ = exported
    note = (export_copy / "checkpoint").read_text()
    (export_copy / "checkpoint").write_text(note.replace("\n25\n", "\n24\n"))
    expect(export_copy, None, "does not verify")
    intruder = SigningKey(bytes(range(1, 33)))
    cp = Checkpoint(ledger.config.origin, 25, bytes(32))
    (export_copy / "checkpoint").write_text(sign_checkpoint(cp, intruder))
    expect(export_copy, None, "no signature from a known key")


def test_replayed_old_checkpoint(tmp_path):
    ledger = Ledger(tmp_path / "data")
    ledger.append(10)
    export_audit(ledger.config, tmp_path / "old")
    ledger.append(5)
    export_audit(ledger.config, tmp_path / "new", seqs=[12])
    verify_audit(tmp_path / "new")
    for name in ("checkpoint", "checkpoint.body", "checkpoint.sig"):
        shutil.copy(tmp_path / "old" / name, tmp_path / "new" / name)
    expect(tmp_path / "new", 10, "continue past")


def test_checkpoint_from_another_tree(tmp_path):
    a = Ledger(tmp_path / "a")
    a.append(10)
    b = Ledger(tmp_path / "b", keys_from=a)
    b.append(10, variant="b")
    export_audit(a.config, tmp_path / "ea")
    export_audit(b.config, tmp_path / "eb")
    shutil.copy(tmp_path / "eb" / "checkpoint", tmp_path / "ea" / "checkpoint")
    expect(tmp_path / "ea", None, "does not match the signed")


def test_forked_history_and_rollback_against_known_checkpoints(tmp_path):
    a = Ledger(tmp_path / "a")
    a.append(6)
    export_audit(a.config, tmp_path / "a6")
    a.append(6)
    export_audit(a.config, tmp_path / "a12")
    known = [(tmp_path / name / "checkpoint").read_text() for name in ("a6", "a12")]
    assert verify_audit(tmp_path / "a12", known_checkpoints=known)["known_checkpoints"] == 2

    # b: restored from a backup taken at 6 entries, then kept appending with the same key
    b = Ledger(tmp_path / "b", keys_from=a)
    b.copy_prefix(a, 6)
    b.append(8, variant="fork")
    export_audit(b.config, tmp_path / "b14", seqs=[7])
    verify_audit(tmp_path / "b14")  # self-consistent on its own...
    err = expect(tmp_path / "b14", 6, "forked history", known_checkpoints=known)  # ...but not with what we hold
    assert "seq 6..11" in err.reason

    # rollback: a restored store that is behind a checkpoint the auditor already holds
    c = Ledger(tmp_path / "c", keys_from=a)
    c.copy_prefix(a, 9)
    export_audit(c.config, tmp_path / "c9")
    expect(tmp_path / "c9", 9, "rolled back", known_checkpoints=known)


def test_tampered_proof_files(export_copy):
    doc = json.loads((export_copy / "proofs" / "7.json").read_text())
    doc["proof"][1] = "00" * 32
    (export_copy / "proofs" / "7.json").write_text(json.dumps(doc))
    expect(export_copy, 7, "inclusion proof")


def test_tampered_record_files(export_copy):
    entry = (export_copy / "proofs" / "24.entry").read_bytes()
    (export_copy / "proofs" / "24.entry").write_bytes(entry.replace(b"25.5", b"25.6"))
    expect(export_copy, 24, r"24\.entry differs")


def test_checkpoint_body_must_match(export_copy):
    body = (export_copy / "checkpoint.body").read_text()
    (export_copy / "checkpoint.body").write_text(body.replace("\n25\n", "\n26\n"))
    expect(export_copy, None, "checkpoint.body")


# -- the auditor's openssl / sha256sum path ----------------------------------------------------------

def transcript(readme: str) -> list[tuple[str, list[str]]]:
    """The "  $ command" lines of README.txt, each with the output lines printed under it."""
    steps: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    for line in readme.splitlines():
        if line.startswith("  $ "):
            current = (line[4:], [])
            steps.append(current)
        elif current is not None and line.startswith("  ") and line.strip():
            current[1].append(line[2:])
        else:
            current = None
    return steps


@pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason="needs openssl, sha256sum, bash, grep")
def test_readme_commands_verify_with_openssl_and_sha256sum(export_copy, exported):
    ledger, _ = exported
    steps = transcript((export_copy / "README.txt").read_text())
    assert [c.split()[0] for c, _ in steps] == ["openssl", "openssl", "sha256sum", "grep", "openssl", "openssl",
                                                    "openssl", "(printf"]
    assert sum(out == ["Signature Verified Successfully"] for _, out in steps) == 2
    for cmd, want in steps:
        run = subprocess.run(["bash", "-c", cmd], cwd=export_copy, capture_output=True, text=True, check=False)
        assert run.returncode == 0, (cmd, run.stderr)
        assert run.stdout.splitlines() == want, cmd
    assert steps[0][1] == [ledger.key.kid] and steps[4][1] == [ledger.key.kid]
    e = ledger.entries[0]
    sha_line = next(out for cmd, out in steps if cmd.startswith("sha256sum"))
    assert sha_line == [f"{e.hash}  proofs/0.entry"]
    leaf_line = next(out for cmd, out in steps if cmd.startswith("(printf"))
    assert leaf_line == [f"{leaf_hash(e.entry).hex()}  -"]

    # and the same commands fail on a tampered record or checkpoint
    (export_copy / "proofs" / "0.sig").write_bytes(bytes(64))
    (export_copy / "checkpoint.body").write_text(
        (export_copy / "checkpoint.body").read_text().replace("\n25\n", "\n26\n"))
    for cmd, _ in steps:
        if "pkeyutl" in cmd:
            run = subprocess.run(["bash", "-c", cmd], cwd=export_copy, capture_output=True, text=True, check=False)
            assert run.returncode != 0 and "Signature Verified Successfully" not in run.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_checkpoint_and_key_pem_are_openssl_compatible(exported, tmp_path):
    ledger, out = exported
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(out / "ledger-key.pem"), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    assert der[-32:] == ledger.key.public_bytes
    assert public_key_to_pem(der[-32:]) == (out / "ledger-key.pem").read_text()
    run = subprocess.run(["openssl", "pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", "ledger-key.pem",
                          "-in", "checkpoint.body", "-sigfile", "checkpoint.sig"],
                         cwd=out, capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "Signature Verified Successfully" in run.stdout


# -- docs/auditors.md: exactly the commands the README's "For auditors" section shows ----------------

AUDITORS_MD = Path(__file__).resolve().parents[2] / "docs" / "auditors.md"


def doc_transcript(text: str) -> list[tuple[str, list[str]]]:
    """The ``$ command`` lines of the fenced blocks of docs/auditors.md, each with the lines under it."""
    steps: list[tuple[str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps and line.strip():
            steps[-1][1].append(line)
    return steps


def _matches(want: str, got: str) -> bool:
    """``got`` is ``want`` with each ``<placeholder>`` standing for some non-empty text."""
    return re.fullmatch(".+".join(re.escape(p) for p in re.split(r"<[^>]*>", want)), got) is not None


def run_doc(steps: list[tuple[str, list[str]]], cwd: Path) -> list[tuple[int, list[str]]]:
    """Run every command in one bash session; (exit status, stdout lines) per command."""
    script = ["set -u"]
    for i, (cmd, _) in enumerate(steps):
        script += [f"echo '@@{i}'", f"( {cmd} ) || echo \"@@rc $?\"" if not cmd.startswith(("cd ", "SEQ="))
                   else cmd]
    run = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    chunks = re.split(r"^@@\d+\n", run.stdout, flags=re.M)[1:]
    results = []
    for chunk in chunks:
        lines = chunk.splitlines()
        rc = 0
        if lines and lines[-1].startswith("@@rc "):
            rc = int(lines.pop()[5:])
        results.append((rc, lines))
    assert len(results) == len(steps), run.stdout
    return results


@pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS + ("od", "sed")), reason="needs openssl and coreutils")
def test_auditors_doc_commands_verify_one_record_and_one_checkpoint(exported, tmp_path):
    ledger, out = exported
    steps = doc_transcript(AUDITORS_MD.read_text())
    commands = [c for c, _ in steps]
    assert sum("pkeyutl -verify" in c for c in commands) == 2 and "SEQ=7" in commands
    assert not [c for c in commands if c.split()[0] in ("python", "python3", "mro-edge")]
    shutil.copytree(out, tmp_path / "export")
    results = run_doc(steps, tmp_path)
    for (cmd, want), (rc, got) in zip(steps, results, strict=True):
        assert rc == 0, (cmd, got)
        assert len(got) == len(want) and all(_matches(w, g) for w, g in zip(want, got, strict=True)), (cmd, want, got)
    by_cmd = {cmd: got for (cmd, _), (_, got) in zip(steps, results, strict=True)}
    e = ledger.entries[7]
    assert by_cmd["sha256sum proofs/$SEQ.entry"] == [f"{e.hash}  proofs/7.entry"]
    assert by_cmd["cat cp.body"][:2] == [ledger.config.origin, "25"]
    kid_lines = [got for cmd, got in by_cmd.items() if cmd.endswith("cut -c1-16")]
    assert kid_lines == [[ledger.key.kid], [ledger.key.kid]]
    assert [leaf_hash(e.entry).hex()] in by_cmd.values()

    # Tampered record, signature or checkpoint: the same commands fail.
    export = tmp_path / "export"
    (export / "proofs" / "7.sig").write_bytes(bytes(64))
    (export / "checkpoint").write_text((export / "checkpoint").read_text().replace("\n25\n", "\n26\n"))
    results = run_doc(steps, tmp_path)
    verdicts = [rc for (cmd, _), (rc, _) in zip(steps, results, strict=True) if "pkeyutl -verify" in cmd]
    assert len(verdicts) == 2 and all(rc != 0 for rc in verdicts)


# -- a ledger written by the sign stage itself: stored checkpoints, rotations, rollback ----------------

def test_rotated_ledger_exports_and_verifies_from_its_first_key(tmp_path):
    from shared.ledger.keys import LedgerKeyFiles
    from tests.support.sign import LocalSign, record_item

    data = tmp_path / "data"
    with LocalSign(data).open() as sign:
        sign.append([record_item(i) for i in range(6)])
        files = LedgerKeyFiles(data / "keys")
        first = files.current(create=False)
        new = files.stage_rotation()
        sign.append([record_item(i) for i in range(6, 12)])
    config = Config(data_dir=str(data))
    summary = export_audit(config, tmp_path / "out", seqs=[2, 10])
    assert summary["entries"] == 13 and summary["kids"] == sorted([first.kid, new.kid])
    assert summary["checkpoint"] == "stored" and summary["kid"] == new.kid
    out = tmp_path / "out"
    assert (out / "proofs" / "2.pem").read_text() == first.public_pem()
    assert (out / "proofs" / "10.pem").read_text() == new.public_pem()
    report = verify_audit(out, trusted_keys=[first.public_bytes])
    assert report["kid"] == new.kid and report["entries"] == 13
    # The retired private key destroyed (as the key policy asks): exports still work from its .pub.pem.
    for retired in (data / "keys" / "retired").glob("*.key"):
        retired.unlink()
    assert export_audit(config, tmp_path / "again")["kids"] == summary["kids"]
    with pytest.raises(AuditError, match="not one of the trusted"):
        verify_audit(out, trusted_keys=[new.public_bytes])

    # The retired key signing after the rotation (a stolen old key) is caught at its seq.
    rows = lines(out)
    e = parse_export_line(rows[6])
    from shared.ledger.entry import entry_bytes, parse_entry, sign_entry

    parsed = parse_entry(e.entry)
    forged = sign_entry(first, entry_bytes(origin=parsed.origin, seq=7, prev=e.hash, idem=parsed.idem, kid=first.kid,
                                           recorded_at=parsed.recorded_at, type=parsed.type, body=parsed.body),
                        7, parsed.idem)
    write_lines(out, rows[:7] + [export_line(forged)])
    expect(out, 7, "retired")


def test_export_of_a_rolled_back_store_is_refused(tmp_path):
    from tests.support.sign import LocalSign, record_item

    data = tmp_path / "data"
    with LocalSign(data).open() as sign:
        sign.append([record_item(i) for i in range(5)])
    shutil.copytree(data / "sign", tmp_path / "backup")
    with LocalSign(data).open() as sign:
        sign.append([record_item(i) for i in range(5, 9)])
    shutil.rmtree(data / "sign")
    shutil.copytree(tmp_path / "backup", data / "sign")
    with pytest.raises(AuditError, match="ROLLBACK") as info:
        export_audit(Config(data_dir=str(data)), tmp_path / "out")
    assert info.value.seq == 5 and not (tmp_path / "out").exists()
