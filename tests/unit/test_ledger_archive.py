"""`mro-edge ledger archive` on a real sign store (LMDB, the real `Sign` handler via LocalSign):
the archive verifies alone (verify_audit, sha256sum, openssl), the box keeps the compact range,
checkpoints and the chain's link, signing goes on (and records the archival in the ledger), the
box's audit export verifies from where it starts and together with the archives; refusals leave
everything as it was. The same with the real gateway and services:
tests/integration/test_ledger_archive_running_box.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nacl.signing
import pytest

from services.uplink.store import UPLINK_STAGE, UPLINK_TABLES, UplinkStore
from shared.ledger.archive import (
    LEDGER_ARCHIVED,
    MANIFEST,
    ArchiveRefused,
    archive_ledger,
    verify_archive,
)
from shared.ledger.audit import AuditError, export_audit, verify_audit
from shared.ledger.checkpoint import cosign, split_note
from shared.ledger.entry import parse_entry
from shared.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from shared.ledger.store import open_ledger
from shared.runtime.config import Config
from shared.runtime.store import Store
from tests.support.sign import LocalSign, record_item
from tests.unit.test_audit import TOOLS, transcript

COSIGNER = nacl.signing.SigningKey(bytes(range(32)))


def grow(config: Config, start: int, count: int, *, every: int = 10) -> None:
    """Sign `count` records, a checkpoint after every `every` of them."""
    with LocalSign(config) as sign:
        sign.open()
        for at in range(start, start + count, every):
            sign.append([record_item(i) for i in range(at, min(at + every, start + count))])
            sign.checkpoint()


def gateway_holds(config: Config, acked: int, cosigned: int) -> None:
    """What the uplink stores when the gateway acknowledged `acked` entries and cosigned the box's
    checkpoint of size `cosigned` (its receipt)."""
    with open_ledger(config) as reader, reader.snapshot() as view:
        note = view.checkpoint_at(cosigned)
    assert note is not None
    text = split_note(note)[0]
    cosigned_note = note.decode() + cosign(text, "gateway.test", COSIGNER, int(time.time()))
    store = Store(config.stage_dir(UPLINK_STAGE), UPLINK_TABLES)
    try:
        UplinkStore(store).acknowledge(acked)
        UplinkStore(store).record_cosigned(cosigned_note, cosigned)
    finally:
        store.close()


@pytest.fixture
def box(tmp_path) -> Config:
    config = Config(data_dir=str(tmp_path / "data"))
    grow(config, 0, 60)
    return config


def test_archive_prunes_and_everything_goes_on(box, tmp_path):
    with open_ledger(box) as reader, reader.snapshot() as view:
        full = list(view.entries())
        whole = view.tree()
        assert whole is not None
        roots = {size: whole.root(size) for size in (40, 50, 60)}
        early = view.checkpoint_at(20)
    gateway_holds(box, acked=45, cosigned=40)
    out = tmp_path / "archive-1"
    summary = archive_ledger(box, out, operator="alice")
    assert (summary["first"], summary["n"], summary["entries_deleted"]) == (0, 40, 40)

    report = verify_archive(out)
    assert report["entries"] == 40 and report["first"] == 0
    with open_ledger(box) as reader, reader.snapshot() as view:
        assert view.first_seq() == 40 and view.size() == 60
        assert [e.seq for e in view.entries()] == list(range(40, 60))
        base = view.archived()
        assert base is not None and base.prev == full[39].hash and base.manifest_sha256 == report["manifest_sha256"]
        kept = view.tree()
        assert kept is not None
        # roots and proofs from the kept compact range: as the full tree gave them
        assert {size: kept.root(size) for size in roots} == roots
        assert roots[40].hex() == json.loads((out / "archive.json").read_text())["root"] == base.root
        proof = kept.inclusion_proof(45, 60)
        assert verify_inclusion(leaf_hash(full[45].entry), 45, 60, proof, kept.root(60))
        assert verify_consistency(40, 60, kept.root(40), kept.root(60), kept.consistency_proof(40, 60))
        assert view.checkpoint_at(10) is not None, "every checkpoint stays"

    # the sign service opens the pruned ledger, appends on from seq 60, records the archival
    grow(box, 60, 15, every=5)
    with open_ledger(box) as reader:
        tail = list(reader.entries())
        base = reader.archived()
    assert [e.seq for e in tail] == list(range(40, 76))
    archived = parse_entry(tail[20].entry)
    assert archived.type == LEDGER_ARCHIVED and base is not None and base.recorded_seq == 60
    assert archived.body["archived_count"] == 40 and archived.body["operator"] == "alice"
    assert archived.body["manifest_sha256"] == report["manifest_sha256"]
    assert parse_entry(tail[0].entry).prev == full[39].hash

    # the box's audit export starts at 40; it verifies alone and with the archive as one chain
    export = tmp_path / "export"
    exported = export_audit(box, export, seqs=[41])
    assert exported["first"] == 40 and exported["entries"] == 76
    alone = verify_audit(export)
    assert (alone["first"], alone["entries"], alone["archived_in"]) == (40, 76, str(out.resolve()))
    together = verify_audit(export, archives=[out])
    assert together["archives"] == 1 and together["entries"] == 76
    with pytest.raises(ValueError, match="archived"):
        export_audit(box, tmp_path / "export-bad", seqs=[3])

    # an auditor's checkpoint older than what the box holds needs the archive
    assert early is not None
    with pytest.raises(AuditError, match="--archive"):
        verify_audit(export, known_checkpoints=[early])
    assert verify_audit(export, known_checkpoints=[early], archives=[out])["known_checkpoints"] == 1
    assert verify_audit(export, known_checkpoints=[(out / "checkpoint").read_bytes()])["known_checkpoints"] == 1

    # a second archive continues the first; all three verify as one chain
    gateway_holds(box, acked=75, cosigned=71)  # checkpoints: 66, 71, 76
    second = tmp_path / "archive-2"
    summary2 = archive_ledger(box, second, operator="bob", upto=68)
    assert (summary2["first"], summary2["n"]) == (40, 66)
    assert verify_archive(second)["first"] == 40
    export2 = tmp_path / "export2"
    export_audit(box, export2)
    assert verify_audit(export2, archives=[out, second])["archives"] == 2
    with pytest.raises(AuditError, match="do not continue"):
        verify_audit(export2, archives=[out])
    with pytest.raises(AuditError, match="oldest first"):
        verify_audit(export2, archives=[second, out])


def test_refusals_change_nothing(box, tmp_path):
    out = tmp_path / "archive"
    with pytest.raises(ArchiveRefused, match="has not cosigned"):
        archive_ledger(box, out, operator="alice")
    gateway_holds(box, acked=60, cosigned=60)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ArchiveRefused, match="not an empty directory"):
        archive_ledger(box, tmp_path / "full", operator="alice")
    with pytest.raises(ArchiveRefused, match="nothing to archive"):
        archive_ledger(box, out, operator="alice", older_than_days=1)  # every entry is from today
    with open_ledger(box) as reader:
        assert reader.archived() is None and len(list(reader.entries())) == 60
    assert not out.exists() and not list(tmp_path.glob(".archive.partial-*"))
    # the newest entry always stays: with everything cosigned, n stops at the checkpoint before it
    assert archive_ledger(box, out, operator="alice")["n"] == 50


@pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason="needs openssl, sha256sum, bash, grep")
def test_archive_verifies_with_sha256sum_and_openssl_and_detects_tampering(box, tmp_path):
    gateway_holds(box, acked=30, cosigned=30)
    out = tmp_path / "archive"
    archive_ledger(box, out, operator="alice")
    steps = transcript((out / "README.txt").read_text())
    assert any(cmd.startswith("sha256sum --quiet -c") for cmd, _ in steps)
    assert sum(out_ == ["Signature Verified Successfully"] for _, out_ in steps) == 2
    for cmd, want in steps:
        run = subprocess.run(["bash", "-c", cmd], cwd=out, capture_output=True, text=True, check=False)
        assert run.returncode == 0, (cmd, run.stderr)
        assert run.stdout.splitlines() == want, cmd
    (out / "entry.digest").unlink()  # the recipe's scratch file

    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    rows = (tampered / "entries.jsonl").read_bytes().replace(b'"seq":3,', b'"seq":3, ', 1)
    (tampered / "entries.jsonl").write_bytes(rows)
    run = subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST], cwd=tampered, capture_output=True, text=True,
                         check=False)
    assert run.returncode != 0 and "entries.jsonl" in run.stdout
    with pytest.raises(AuditError, match="entries.jsonl differs"):
        verify_archive(tampered)
    assert verify_archive(Path(out))["entries"] == 30


def test_idle_box_records_the_archival_at_once_and_an_interrupted_prune_resumes(box, tmp_path, monkeypatch):
    gateway_holds(box, acked=60, cosigned=60)
    archive_ledger(box, tmp_path / "a1", operator="carol", upto=20)
    with LocalSign(box) as sign:
        sign.open()
        owed = sign.runtime.outbox.pending()
        assert sign.stage.checkpointer.record_archival() is True, "no record needed to record it"
        assert sign.stage.checkpointer.record_archival() is False, "once"
        assert sign.runtime.outbox.pending() == owed + 1, "forwarded to the uplink"
    with open_ledger(box) as reader:
        head = reader.head()
        base = reader.archived()
    assert head is not None and base is not None and base.recorded_seq == head.seq == 60
    assert parse_entry(head.entry).body["archived_count"] == 20

    # killed after the archival was recorded, before its deletes: the next run finishes them first
    from shared.ledger.store import LedgerPruner

    real_prune = LedgerPruner.prune
    calls: list[int] = []

    def killed_after_record(self, batch=2000):
        calls.append(batch)
        if len(calls) == 2:
            raise SystemExit("killed")
        return real_prune(self, batch)

    monkeypatch.setattr(LedgerPruner, "prune", killed_after_record)
    with pytest.raises(SystemExit):
        archive_ledger(box, tmp_path / "a2", operator="carol", upto=40)
    monkeypatch.setattr(LedgerPruner, "prune", real_prune)
    with open_ledger(box) as reader, reader.snapshot() as view:
        assert view.first_seq() == 40 and next(view.entries()).seq == 20, "recorded, not yet deleted"
    summary = archive_ledger(box, tmp_path / "a3", operator="carol", upto=50)
    assert (summary["first"], summary["n"], summary["entries_deleted"]) == (40, 50, 30)
    with open_ledger(box) as reader:
        assert next(reader.entries()).seq == 50
    assert verify_audit(tmp_path / "a3", archives=[tmp_path / "a1", tmp_path / "a2"])["archives"] == 2


def test_an_archive_that_does_not_verify_is_not_kept_and_nothing_is_deleted(box, tmp_path):
    import msgspec

    from shared.ledger.store import LEDGER_TABLE, SIGN_TABLES, decode_entry, encode_entry
    from shared.runtime.store import u64

    gateway_holds(box, acked=60, cosigned=50)
    store = Store(box.stage_dir("sign"), SIGN_TABLES)
    try:
        with store.write() as txn:
            row = decode_entry(txn.get(u64(5), db=store.table(LEDGER_TABLE)))
            forged = msgspec.structs.replace(row, signature=bytes(64))
            txn.put(u64(5), encode_entry(forged), db=store.table(LEDGER_TABLE))
    finally:
        store.close()
    out = tmp_path / "archive"
    with pytest.raises(AuditError, match="signature") as refused:
        archive_ledger(box, out, operator="alice")
    assert refused.value.seq == 5
    assert not out.exists() and not list(tmp_path.glob(".archive.partial-*"))
    with open_ledger(box) as reader:
        assert reader.archived() is None and next(reader.entries()).seq == 0


def test_a_box_proof_that_needs_archived_nodes_names_the_archive(box, tmp_path):
    gateway_holds(box, acked=45, cosigned=40)
    archive_ledger(box, tmp_path / "archive-1", operator="alice")
    env = {"PATH": "/usr/bin:/bin", "MRO_DATA_DIR": box.data_dir}
    old = subprocess.run([sys.executable, "-m", "mro_edge", "audit", "consistency", "--first", "20", "--second", "60"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert old.returncode != 0 and "archived to" in old.stderr and "damaged" not in old.stderr, old.stderr
    kept = subprocess.run([sys.executable, "-m", "mro_edge", "audit", "consistency", "--first", "40", "--second", "60"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert kept.returncode == 0 and kept.stdout.startswith("OK"), kept.stderr
