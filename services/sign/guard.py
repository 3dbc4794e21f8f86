"""Start-up checks of the sign stage: the ledger must not be behind what was already signed or sent.

Before the sign service appends anything it checks, in this order (``check_store``):

1. the Merkle table agrees with the ledger table (same size, same last leaf); a store written
   before the tree existed gets its tree built once from the entries (hash chain checked while
   doing so); any other disagreement is damage, reported and never repaired;
2. the store is not behind, nor different from, the newest checkpoint the service signed
   (``keys/checkpoint.latest``, kept outside the LMDB file so that restoring an old copy of
   the store does not restore it too): fewer entries means a rollback (restored backup,
   SD-card image, VM snapshot), a different root at that size means another history (a fork);
3. the store holds every entry the gateway has acknowledged (the uplink's ``acknowledged_count``).

A failed check raises ``SignRefused`` whose message says what was found and how to recover;
``refuse`` publishes it as an alarm on ``mro/<station>/alarm`` first. Nothing is changed.
"""

from __future__ import annotations

from shared.runtime.stage import StageRefused

import shlex
import time
from collections.abc import Callable, Mapping

from services.uplink.store import UPLINK_STAGE, acknowledged_count
from shared.ledger.checkpoint import CheckpointError, NoteError, open_checkpoint, split_note
from shared.runtime.config import Config
from shared.ledger.entry import GENESIS_PREV, entry_hash, parse_entry
from shared.ledger.store import LEDGER_TABLE, decode_entry, latest_checkpoint_path, read_latest_checkpoint
from shared.runtime.logs import get_logger
from shared.ledger.merkle import MERKLE_TABLE, MerkleCorruptError, leaf_hash, lmdb_tree
from shared.runtime.store import Store, from_u64
from shared.runtime.messages import json_encode, utc_now

_FILL_CHUNK = 10_000


class SignRefused(StageRefused):
    """The sign stage must not append: ``kind`` names the alarm, the message explains the recovery."""


class LedgerRollbackError(SignRefused):
    """The ledger is behind (or forked from) a checkpoint already signed or an acknowledged seq."""


class LedgerDamagedError(SignRefused):
    """The ledger and its Merkle tree disagree, or a stored node or entry is unreadable."""


def check_tree(store: Store) -> tuple[int, int]:
    """Step 1: ledger and Merkle table agree; returns (entries, tree size before this check).

    Builds the tree once (in one write transaction) when the table is empty and the ledger is
    not: a store from before the Merkle tree. While doing so the hash chain is checked; a break
    is damage, and nothing is written.
    """
    ledger, merkle = store.table(LEDGER_TABLE), store.table(MERKLE_TABLE)
    with store.write() as txn:
        count = txn.stat(ledger)["entries"]
        tree = lmdb_tree(txn, merkle)
        try:
            size = tree.size()
        except MerkleCorruptError as exc:
            raise LedgerDamagedError("ledger_damaged", _damaged(store, str(exc))) from None
        if size == 0 and count > 0:
            _fill(txn, ledger, tree, count, store)
            return count, 0
        if size != count:
            raise LedgerDamagedError("ledger_damaged", _damaged(
                store, f"the Merkle tree covers {size} entries but the ledger table holds {count}"))
        if count:
            cursor = txn.cursor(db=ledger)
            cursor.last()
            try:
                head = decode_entry(cursor.value())
                if from_u64(cursor.key()) != count - 1 or head.seq != count - 1:
                    raise ValueError(f"the last key is seq {from_u64(cursor.key())}, the entry says {head.seq}")
                if tree.leaf(count - 1) != leaf_hash(head.entry):
                    raise ValueError(f"the Merkle leaf of seq {count - 1} is not the hash of that entry")
            except (ValueError, MerkleCorruptError) as exc:
                raise LedgerDamagedError("ledger_damaged", _damaged(store, str(exc))) from None
    return count, size


def _fill(txn, ledger, tree, count: int, store: Store) -> None:
    prev, expect, leaves = GENESIS_PREV, 0, []
    cursor = txn.cursor(db=ledger)
    cursor.first()
    for key, value in cursor:
        try:
            e = decode_entry(value)
        except ValueError as exc:
            raise LedgerDamagedError("ledger_damaged", _damaged(store, f"seq {expect}: unreadable entry: {exc}")) \
                from None
        if from_u64(key) != expect or e.seq != expect:
            raise LedgerDamagedError("ledger_damaged", _damaged(store, f"seq {expect}: found seq {e.seq}"))
        try:
            linked = parse_entry(e.entry).prev == prev
        except ValueError:
            linked = False
        if entry_hash(e.entry) != e.hash or not linked:
            raise LedgerDamagedError("ledger_damaged", _damaged(
                store, f"seq {expect}: the entry's hash or its link to seq {expect - 1} is broken"))
        leaves.append(leaf_hash(e.entry))
        if len(leaves) >= _FILL_CHUNK:
            tree.extend(leaves)
            leaves = []
        prev, expect = e.hash, expect + 1
    tree.extend(leaves)
    if expect != count:
        raise LedgerDamagedError("ledger_damaged", _damaged(store, f"read {expect} of {count} entries"))


def _damaged(store: Store, what: str) -> str:
    return (f"the sign store {store.path} is damaged: {what}. Refusing to append; nothing was changed or "
            "repaired. Run 'mro-edge audit export --out DIR' to find the first bad seq, then restore the newest "
            "backup of the store that verifies (history is never repaired in place).")


def check_checkpoint(config: Config, count: int, root_at: Callable[[int], bytes],
                     keys: Mapping[str, bytes]) -> int:
    """Step 2 (see the module doc); returns the size of ``keys/checkpoint.latest`` (0 if none).

    ``root_at(size)`` is the store's Merkle root at ``size``; ``keys`` maps kid -> public key of
    every ledger key this box holds (current, pending, retired): one of them must have signed it.
    """
    path = latest_checkpoint_path(config)
    note = read_latest_checkpoint(path)
    if note is None:
        return 0
    aside = shlex.quote(f"{path}.rolled-back-{time.strftime('%Y%m%dT%H%M%S')}")
    accept = (f"Only if losing those entries is known and accepted, acknowledge the rollback by moving the "
              f"checkpoint aside: mv {shlex.quote(str(path))} {aside} (the gateway will then report the re-used "
              "seqs as a fork: that is the evidence it must keep).")
    cp = None
    for public in keys.values():
        try:
            cp, _ = open_checkpoint(note, {config.origin: public})
            break
        except (NoteError, CheckpointError):
            continue
    if cp is None:
        try:
            split_note(note)
            why = "is not signed by any ledger key in keys/ for origin " + config.origin
        except NoteError as exc:
            why = f"is not a signed note ({exc})"
        raise LedgerRollbackError("checkpoint_untrusted", (
            f"{path} {why}. Refusing to append: the keys directory or the checkpoint was replaced, so the "
            f"ledger cannot be checked for a rollback. Restore keys/ (with checkpoint.latest) from your backup; "
            f"only if the file is known to be bad, move it aside: mv {shlex.quote(str(path))} {aside}"))
    store_dir = config.stage_dir("sign")
    if count < cp.size:
        raise LedgerRollbackError("ledger_rollback", (
            f"ROLLBACK: the ledger holds {count} entries, but the sign service already signed a checkpoint over "
            f"{cp.size} entries (root {cp.root.hex()}). The store {store_dir} was restored from an older copy "
            f"(backup, SD-card image, VM snapshot). Refusing to append; nothing was changed. Recover by stopping the "
            f"sign service and restoring the newest backup of {store_dir} (one that holds at least {cp.size} "
            f"entries), then start it again. {accept}"))
    if root_at(cp.size) != cp.root:
        raise LedgerRollbackError("ledger_fork", (
            f"FORK: the first {cp.size} entries of the ledger are not the ones the sign service signed a "
            f"checkpoint over (root {cp.root.hex()}): the store {store_dir} holds another history. Refusing to "
            f"append; nothing was changed. Restore the newest backup of {store_dir} whose entries match that "
            f"checkpoint ('mro-edge audit export' then 'mro-edge audit verify' shows which entries differ). {accept}"))
    return cp.size


def check_acknowledged(config: Config, count: int) -> int:
    """Step 3 (see the module doc); returns the acknowledged count."""
    acked = acknowledged_count(config)
    if count < acked:
        uplink = config.stage_dir(UPLINK_STAGE)
        aside = shlex.quote(f"{uplink}.rolled-back-{time.strftime('%Y%m%dT%H%M%S')}")
        raise LedgerRollbackError("ledger_rollback", (
            f"ROLLBACK: the ledger holds {count} entries, but the gateway has already acknowledged entries up to "
            f"seq {acked - 1}. The store {config.stage_dir('sign')} was restored from an older copy. Refusing to "
            f"append; nothing was changed. Recover by restoring the newest backup of {config.stage_dir('sign')} "
            f"(at least {acked} entries); the gateway also holds the acknowledged entries, signed and verifiable. "
            f"Only if losing them is known and accepted, acknowledge the rollback by moving the uplink store "
            f"aside: mv {shlex.quote(str(uplink))} {aside} (and the checkpoint, if the service says so next)."))
    return acked


def refuse(config: Config, exc: SignRefused) -> None:
    """Log the refusal and publish it as an alarm (best effort: the broker may be down too)."""
    log = get_logger(stage="sign")
    log.error("refusing to append", alarm=exc.kind, detail=str(exc), state_transition=f"ALARM_{exc.kind.upper()}")
    from shared.runtime.mqtt import BrokerUnavailable, MqttLink
    from shared.runtime.topics import Topics

    topics = Topics(config.station)
    try:
        link = MqttLink(config, client_id=f"mro-{config.station}-sign-alarm", persistent=False)
        link.start(wait_s=5)
    except (BrokerUnavailable, Exception) as err:  # noqa: BLE001 - best effort, the refusal stands anyway
        log.warning("alarm not published: no broker", error=str(err)[:200])
        return
    try:
        alarm = link.client.publish(topics.alarm, json_encode(
            {"service": "sign", "alarm": exc.kind, "detail": str(exc), "at": utc_now()}), qos=1)
        status = link.client.publish(topics.status("sign"), json_encode(
            {"service": "sign", "state": "refused", "alarm": exc.kind, "detail": str(exc), "at": utc_now()}),
            qos=1, retain=True)
        alarm.wait_for_publish(5)
        status.wait_for_publish(5)
    except (RuntimeError, ValueError) as err:
        log.warning("alarm not published", error=str(err)[:200])
    finally:
        link.stop()
