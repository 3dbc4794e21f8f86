"""Start-up checks of the sign stage: the ledger must not be behind what was already signed or sent.

Before the sign service appends anything it checks, in this order:

1. the Merkle table agrees with the ledger table (same size, same last leaf): any disagreement
   is damage, reported and never repaired (``check_tree``);
2. the store is not behind, nor different from, the newest checkpoint the service signed
   (``keys/checkpoint.latest``, kept outside the LMDB file so that restoring an old copy of
   the store does not restore it too): fewer entries means a rollback (restored backup,
   SD-card image, VM snapshot), a different root at that size means another history (a fork)
   (``check_checkpoint``);
3. the store holds every entry the gateway has acknowledged (the uplink's ``acknowledged_count``)
   (``check_acknowledged``).

Steps 2 and 3 are ``shared.ledger.verify.check_length``/``check_roots``, which the audit export
runs too. A failed check raises ``SignRefused`` whose message says what was found and how to
recover; ``refuse`` publishes it as an alarm on ``mro/<station>/alarm`` first. Nothing is changed.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping

from services.uplink.store import UPLINK_STAGE, acknowledged_count
from shared.ledger.checkpoint import CheckpointError, NoteError, open_checkpoint, split_note
from shared.ledger.merkle import MerkleCorruptError, leaf_hash
from shared.ledger.store import latest_checkpoint_path, ledger_view, read_latest_checkpoint
from shared.ledger.verify import LEDGER_ROLLBACK, HistoryClaim, RolledBack, check_length, check_roots
from shared.runtime.alarms import alarm_payload
from shared.runtime.clock import utc_now
from shared.runtime.config import Config
from shared.runtime.logs import get_logger
from shared.runtime.messages import json_encode
from shared.runtime.stage import StageRefused
from shared.runtime.store import Store


class SignRefused(StageRefused):
    """The sign stage must not append: ``kind`` names the alarm, the message explains the recovery."""


class LedgerRollbackError(SignRefused):
    """The ledger is behind (or forked from) a checkpoint already signed or an acknowledged seq."""


class LedgerDamagedError(SignRefused):
    """The ledger and its Merkle tree disagree, or a stored node or entry is unreadable."""


def check_tree(store: Store) -> int:
    """Step 1: the ledger and its Merkle table agree; returns the number of entries."""
    try:
        with ledger_view(store) as view:
            count = view.size()
            tree = view.tree()
            size = tree.size() if tree is not None else 0
            if size != count:
                raise ValueError(f"the Merkle tree covers {size} entries but the ledger table holds {count}")
            head = view.head()
            if tree is not None and head is not None:
                if head.seq != count - 1:
                    raise ValueError(f"the last entry is seq {head.seq}, not seq {count - 1}")
                if tree.leaf(count - 1) != leaf_hash(head.entry):
                    raise ValueError(f"the Merkle leaf of seq {count - 1} is not the hash of that entry")
    except (ValueError, MerkleCorruptError) as exc:  # an unreadable row is a LedgerReadError(ValueError)
        raise LedgerDamagedError("ledger_damaged", _damaged(store, str(exc))) from None
    return count


def _damaged(store: Store, what: str) -> str:
    return (f"the sign store {store.path} is damaged: {what}. Refusing to append; nothing was changed or "
            "repaired. Run 'mro-edge audit export --out DIR' to find the first bad seq, then restore the "
            "newest backup of the store that verifies (history is never repaired in place).")


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
    moved = shlex.quote(str(path))
    aside = shlex.quote(f"{path}.rolled-back-{time.strftime('%Y%m%dT%H%M%S')}")
    accept = (f"Only if losing those entries is known and accepted, acknowledge the rollback by moving "
              f"the checkpoint aside: mv {moved} {aside} (the gateway will then report the re-used seqs as "
              "a fork: that is the evidence it must keep).")
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
            f"{path} {why}. Refusing to append: the keys directory or the checkpoint was replaced, so "
            "the ledger cannot be checked for a rollback. Restore keys/ (with checkpoint.latest) from "
            f"your backup; only if the file is known to be bad, move it aside: mv {moved} {aside}"))
    store_dir = config.stage_dir("sign")
    try:
        claim = [HistoryClaim(str(path), cp.size, cp.root)]
        check_length(count, claim)
        check_roots(claim, root_at, count)
    except RolledBack as found:
        if found.kind == LEDGER_ROLLBACK:
            raise LedgerRollbackError(found.kind, (
                f"ROLLBACK: the ledger holds {count} entries, but the sign service already signed a "
                f"checkpoint over {cp.size} entries (root {cp.root.hex()}). The store {store_dir} was "
                "restored from an older copy (backup, SD-card image, VM snapshot). Refusing to append; "
                "nothing was changed. Recover by stopping the sign service and restoring the newest "
                f"backup of {store_dir} (one that holds at least {cp.size} entries), then start it "
                f"again. {accept}")) from None
        raise LedgerRollbackError(found.kind, (
            f"FORK: the first {cp.size} entries of the ledger are not the ones the sign service signed "
            f"a checkpoint over (root {cp.root.hex()}): the store {store_dir} holds another history. "
            f"Refusing to append; nothing was changed. Restore the newest backup of {store_dir} whose "
            "entries match that checkpoint ('mro-edge audit export' then 'mro-edge audit verify' shows "
            f"which entries differ). {accept}")) from None
    return cp.size


def check_acknowledged(config: Config, count: int) -> int:
    """Step 3 (see the module doc); returns the acknowledged count."""
    acked = acknowledged_count(config)
    uplink, store_dir = config.stage_dir(UPLINK_STAGE), config.stage_dir("sign")
    try:
        check_length(count, [HistoryClaim(str(uplink), acked)])
    except RolledBack as found:
        aside = shlex.quote(f"{uplink}.rolled-back-{time.strftime('%Y%m%dT%H%M%S')}")
        raise LedgerRollbackError(found.kind, (
            f"ROLLBACK: the ledger holds {count} entries, but the gateway has already acknowledged "
            f"entries up to seq {acked - 1}. The store {store_dir} was restored from an older copy. "
            "Refusing to append; nothing was changed. Recover by restoring the newest backup of "
            f"{store_dir} (at least {acked} entries); the gateway also holds the acknowledged entries, "
            "signed and verifiable. Only if losing them is known and accepted, acknowledge the rollback "
            f"by moving the uplink store aside: mv {shlex.quote(str(uplink))} {aside} (and the "
            "checkpoint, if the service says so next).")) from None
    return acked


def refuse(config: Config, exc: SignRefused) -> None:
    """Log the refusal and publish it as an alarm (best effort: the broker may be down too)."""
    log, detail = get_logger(stage="sign"), str(exc)
    log.error("refusing to append", alarm=exc.kind, detail=detail,
              state_transition=f"ALARM_{exc.kind.upper()}")
    from shared.runtime.mqtt import MqttLink, client_id_for, service_credentials
    from shared.runtime.topics import Topics

    topics = Topics(config.station)
    try:
        login = service_credentials(config, "sign")
        link = MqttLink(config, client_id=client_id_for(config, "sign-alarm", login), persistent=False,
                        credentials=login)
        link.start(wait_s=5)
    except Exception as err:  # best effort, whatever failed: the refusal stands anyway
        log.warning("alarm not published: no broker", error=str(err)[:200])
        return
    try:
        alarm = link.client.publish(
            topics.alarm, alarm_payload("sign", exc.kind, detail, detail_max=len(detail)), qos=1)
        status = link.client.publish(topics.status("sign"), json_encode(
            {"service": "sign", "state": "refused", "alarm": exc.kind, "detail": detail, "at": utc_now()}),
            qos=1, retain=True)
        alarm.wait_for_publish(5)
        status.wait_for_publish(5)
    except (RuntimeError, ValueError) as err:
        log.warning("alarm not published", error=str(err)[:200])
    finally:
        link.stop()
