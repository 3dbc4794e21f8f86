"""The sign stage's ledger on a real LMDB store: Merkle tree in the append transaction, signed
checkpoints after commit, rollback/fork refusal on start, and key rotation (``LocalSign`` runs
``Sign.open``/``Sign.handle`` exactly as the service does, without a broker)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from services.sign.guard import LedgerDamagedError, LedgerRollbackError, SignRefused
from services.uplink.store import UPLINK_TABLES, UplinkStore
from shared.ledger.checkpoint import Checkpoint, open_checkpoint, parse_checkpoint, sign_checkpoint, split_note
from shared.ledger.entry import KEY_ROTATION, parse_entry
from shared.ledger.keys import KeyFileError, LedgerKeyFiles, SigningKey
from shared.ledger.merkle import MERKLE_TABLE, Frontier, leaf_hash, lmdb_tree, verify_inclusion
from shared.ledger.store import (
    LEDGER_TABLE,
    encode_entry,
    iter_entries,
    latest_checkpoint,
    latest_checkpoint_path,
    open_ledger,
    read_latest_checkpoint,
)
from shared.ledger.verify import LedgerVerifyError, verify_chain
from shared.runtime.config import Config
from shared.runtime.store import Store, u64
from tests.support.sign import LocalSign, record_item

N = 0  # running record counter so that every test record is distinct


def items(n: int) -> list:
    global N
    out = [record_item(N + i) for i in range(n)]
    N += n
    return out


def cfg(data: Path) -> Config:
    return Config(data_dir=str(data))


def entries(data: Path) -> list:
    store = open_ledger(cfg(data))
    try:
        return list(iter_entries(store))
    finally:
        store.close()


def open_sign(data: Path) -> LocalSign:
    return LocalSign(data).open()


def first_key(data: Path) -> SigningKey:
    return LedgerKeyFiles(Path(data) / "keys").current(create=False)


def test_tree_grows_in_the_append_transaction_and_proves_every_entry(tmp_path):
    with open_sign(tmp_path) as sign:
        for size in (1, 7, 100, 1):
            sign.append(items(size))
        with sign.store.read() as txn:
            tree = lmdb_tree(txn, sign.store.table(MERKLE_TABLE), write=False)
            size, root = tree.size(), tree.root()
            got = list(iter_entries(sign.store))
            proofs = {s: tree.inclusion_proof(s) for s in (0, 50, 108)}
    assert size == len(got) == 109
    frontier = Frontier()
    for e in got:
        frontier.append(leaf_hash(e.entry))
    assert frontier.root() == root
    for s, proof in proofs.items():
        assert verify_inclusion(leaf_hash(got[s].entry), s, size, proof, root)


def test_checkpoints_are_signed_after_commit_and_kept(tmp_path):
    with LocalSign(tmp_path) as sign:
        sign.open(checkpointer=True)
        cp = sign.stage.checkpointer
        cp.min_interval_s = 0.05
        sign.append(items(10))
        deadline = time.monotonic() + 10
        while cp.size != 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cp.size == 10
        note = latest_checkpoint(sign.store)
        assert note == read_latest_checkpoint(latest_checkpoint_path(sign.config))
        key = first_key(tmp_path)
        checkpoint, names = open_checkpoint(note, {sign.config.origin: key.public_bytes})
        assert names == [sign.config.origin] and checkpoint.size == 10
        # No growth: nothing new until the interval; then the same checkpoint again (fresh file).
        before = cp.last_at
        assert cp.tick() is None and cp.last_at == before
        cp.interval_s = 0.0
        assert cp.tick() == note
        sign.append(items(5))
    # A clean stop checkpoints what was committed last.
    store = open_ledger(cfg(tmp_path))
    try:
        assert parse_checkpoint(split_note(latest_checkpoint(store))[0]).size == 15
    finally:
        store.close()


def test_store_whose_tree_is_gone_is_refused_not_rebuilt(tmp_path):
    with open_sign(tmp_path) as sign:
        sign.append(items(40))
        with sign.store.write() as txn:
            txn.drop(sign.store.table(MERKLE_TABLE), delete=False)
    sign = LocalSign(tmp_path)
    with pytest.raises(LedgerDamagedError, match="covers 0 entries but the ledger table holds 40") as info:
        sign.open()
    assert sign.alarms == [info.value]
    sign.close()
    assert verify_chain(entries(tmp_path), {first_key(tmp_path).kid: first_key(tmp_path).public_bytes}) == 40


def test_tree_that_disagrees_with_the_ledger_is_refused_not_repaired(tmp_path):
    with open_sign(tmp_path) as sign:
        sign.append(items(20))
        with sign.store.write() as txn:  # one extra ledger row the tree never saw
            txn.put(u64(20), encode_entry(entries_of(sign)[19]), db=sign.store.table(LEDGER_TABLE))
    sign = LocalSign(tmp_path)
    with pytest.raises(LedgerDamagedError, match="covers 20 entries but the ledger table holds 21") as info:
        sign.open()
    assert sign.alarms == [info.value]
    assert "nothing was changed or repaired" in str(info.value)
    sign.close()


def entries_of(sign: LocalSign) -> list:
    return list(iter_entries(sign.store))


def _backup(data: Path, name: str) -> Path:
    target = data.parent / name
    shutil.copytree(data / "sign", target)
    return target


def _restore(data: Path, backup: Path) -> None:
    shutil.rmtree(data / "sign")
    shutil.copytree(backup, data / "sign")


def test_rollback_to_an_older_copy_is_refused_with_the_recovery(tmp_path):
    data = tmp_path / "data"
    with open_sign(data) as sign:
        sign.append(items(30))
    backup = _backup(data, "backup-30")
    with open_sign(data) as sign:
        sign.append(items(20))
    _restore(data, backup)
    sign = LocalSign(data)
    with pytest.raises(LedgerRollbackError) as info:
        sign.open()
    sign.close()
    message = str(info.value)
    assert info.value.kind == "ledger_rollback" and sign.alarms == [info.value]
    assert "ROLLBACK: the ledger holds 30 entries" in message and "over 50 entries" in message
    assert "restoring the newest backup" in message and "mv " in message and "checkpoint.latest" in message
    assert len(entries(data)) == 30  # nothing changed

    # The operator acknowledges the rollback by moving the checkpoint aside: appending resumes.
    path = latest_checkpoint_path(sign.config)
    path.rename(path.with_name("checkpoint.latest.rolled-back"))
    with open_sign(data) as sign:
        sign.append(items(1))
    assert len(entries(data)) == 31


def test_forked_history_at_the_same_size_is_refused(tmp_path):
    data = tmp_path / "data"
    with open_sign(data) as sign:
        sign.append(items(10))
    backup = _backup(data, "backup-10")
    with open_sign(data) as sign:
        sign.append(items(10))
    signed = read_latest_checkpoint(latest_checkpoint_path(cfg(data)))
    assert parse_checkpoint(split_note(signed)[0]).size == 20
    # Another history from the same backup, of the same length (different records).
    _restore(data, backup)
    latest_checkpoint_path(cfg(data)).unlink()
    with open_sign(data) as sign:
        sign.append(items(10))
    latest_checkpoint_path(sign.config).write_bytes(signed)
    sign = LocalSign(data)
    with pytest.raises(LedgerRollbackError, match="FORK: the first 20 entries") as info:
        sign.open()
    sign.close()
    assert info.value.kind == "ledger_fork"


def test_behind_the_gateways_acknowledged_seq_is_refused(tmp_path):
    with open_sign(tmp_path) as sign:
        sign.append(items(5))
    uplink = Store(tmp_path / "uplink", UPLINK_TABLES, map_size_mb=16)
    UplinkStore(uplink).acknowledge(8)  # the gateway holds seq 0..7
    uplink.close()
    sign = LocalSign(tmp_path)
    with pytest.raises(LedgerRollbackError, match="acknowledged entries up to seq 7") as info:
        sign.open()
    sign.close()
    assert "mv " in str(info.value) and "uplink" in str(info.value)


def test_checkpoint_file_signed_by_a_stranger_is_refused(tmp_path):
    with open_sign(tmp_path) as sign:
        sign.append(items(3))
        stranger = SigningKey.generate()
        forged = sign_checkpoint(Checkpoint(sign.config.origin, 1, bytes(32)), stranger)
    latest_checkpoint_path(sign.config).write_text(forged)
    sign = LocalSign(tmp_path)
    with pytest.raises(SignRefused, match="not signed by any ledger key") as info:
        sign.open()
    sign.close()
    assert info.value.kind == "checkpoint_untrusted"


def test_key_rotation_entry_then_new_key_and_crash_before_rename(tmp_path):
    data = tmp_path / "data"
    files = LedgerKeyFiles(data / "keys")
    with open_sign(data) as sign:
        sign.append(items(4))
        old = files.current(create=False)
        new = files.stage_rotation()
        assert sign.stage.status_extra()["rotation_pending"] is True
        sign.append(items(3))
        # Committed; the key file is renamed after the commit, by the next checkpoint or batch.
        assert files.current(create=False).kid == old.kid and files.next_path.exists()
        sign.checkpoint()
        assert files.current(create=False).kid == new.kid and not files.next_path.exists()
        assert [k.kid for k in files.retired()] == [old.kid]
    got = entries(data)
    assert [e.kid for e in got] == [old.kid] * 5 + [new.kid] * 3
    rotation = parse_entry(got[4].entry)
    assert rotation.type == KEY_ROTATION and rotation.body["new_kid"] == new.kid
    assert rotation.body["effective_seq"] == 5
    # Only the first key is needed: the rotation entry, signed by it, introduces the new one.
    assert verify_chain(got, {old.kid: old.public_bytes}) == 8
    note = read_latest_checkpoint(latest_checkpoint_path(cfg(data)))
    open_checkpoint(note, {"mro-edge/HGR1": new.public_bytes})

    # A crash after the commit of a rotation but before the key file's rename: the next start
    # sees the ledger naming the new key and finishes the rename.
    newer = files.stage_rotation()
    with open_sign(data) as sign:
        sign.append(items(1))
    (data / "keys" / "ledger.key").rename(data / "keys" / "ledger.next.key")
    shutil.copy(data / "keys" / "retired" / f"ledger.{new.kid}.key", data / "keys" / "ledger.key")
    with open_sign(data) as sign:
        assert files.current(create=False).kid == newer.kid and not files.next_path.exists()
        sign.append(items(1))
    got = entries(data)
    assert [e.kid for e in got[8:]] == [new.kid, newer.kid, newer.kid]
    assert verify_chain(got, {old.kid: old.public_bytes}) == 11


def test_a_key_the_ledger_did_not_introduce_is_never_used(tmp_path):
    with open_sign(tmp_path) as sign:
        sign.append(items(2))
    (tmp_path / "keys" / "ledger.key").unlink()
    LedgerKeyFiles(tmp_path / "keys").generate()  # swapped key, not a rotation
    sign = LocalSign(tmp_path)
    with pytest.raises(SignRefused, match="does not hold that key") as info:
        sign.open()
    sign.close()
    assert info.value.kind == "ledger_key"


def test_old_key_after_rotation_is_refused_by_the_verifier(tmp_path):
    with open_sign(tmp_path) as sign:
        sign.append(items(2))
        old = first_key(tmp_path)
        LedgerKeyFiles(tmp_path / "keys").stage_rotation()
        sign.append(items(2))
    got = entries(tmp_path)
    # Forge seq 4 with the retired key (validly chained): refused because the rotation retired it.
    from shared.ledger.entry import entry_bytes, sign_entry

    forged_bytes = entry_bytes(origin="mro-edge/HGR1", seq=4, prev=got[3].hash, idem="ab" * 32, kid=old.kid,
                               recorded_at="2026-01-01T00:00:00.000Z", type="torque_event", body={"x": "y"})
    forged = sign_entry(old, forged_bytes, 4, "ab" * 32)
    with pytest.raises(LedgerVerifyError, match="retired") as info:
        verify_chain([*got[:4], forged], {old.kid: old.public_bytes})
    assert info.value.seq == 4


def test_checkpoint_at_most_a_size_for_the_uplink(tmp_path):
    from shared.ledger.store import checkpoint_at_most

    with open_sign(tmp_path) as sign:
        assert checkpoint_at_most(sign.store, 100) is None
        for n in (3, 4, 5):
            sign.append(items(n))
            sign.checkpoint()  # sizes 3, 7, 12
        sizes = {s: checkpoint_at_most(sign.store, s) for s in (2, 3, 6, 7, 11, 12, 50)}
    size_of = {s: (parse_checkpoint(split_note(n)[0]).size if n else None) for s, n in sizes.items()}
    assert size_of == {2: None, 3: 3, 6: 3, 7: 7, 11: 7, 12: 12, 50: 12}


def test_a_retired_key_is_never_rotated_back_in(tmp_path):
    files = LedgerKeyFiles(tmp_path / "keys")
    with open_sign(tmp_path) as sign:
        sign.append(items(1))
        first = files.current(create=False)
        files.stage_rotation()
        sign.append(items(1))
        sign.checkpoint()
        shutil.copy(files.dir / "retired" / f"ledger.{first.kid}.key", files.next_path)
        with pytest.raises(KeyFileError, match="never signs again"):
            sign.append(items(1))
    assert len(entries(tmp_path)) == 3
