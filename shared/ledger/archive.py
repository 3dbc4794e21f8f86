"""``mro-edge ledger archive``: move the oldest part of the ledger off the box, verifiably.

A box runs for years and the ledger is its biggest store. Nothing is ever pruned unless the
operator asks, and then only a prefix [first, n) that the gateway already holds and has
cosigned (``services.uplink.store.gateway_receipt``): never what only the box holds. In order:

1. plan: n is the size of a checkpoint the sign service signed and stored, at most the gateway's
   acknowledged count and its cosigned size, at most ``--upto``, before the first entry younger
   than ``--older-than``, and below the ledger's head (the newest entry always stays, so the
   chain goes on from a stored entry); the cosigned checkpoint must match this ledger's tree;
2. write the archive into a fresh directory, in the ``mro-edge audit export`` format (entries,
   the signed checkpoint over exactly n entries with checkpoint.body/.sig, ledger-key.pem, keys/,
   proofs of its first and last entry, README.txt) plus ``checkpoint.cosigned`` (the gateway's
   receipt), ``archive.json`` (what was archived, its root and the compact range at n) and
   ``MANIFEST.sha256`` (``sha256sum -c`` format, every other file);
3. verify it (manifest, then ``verify_audit``, which also runs on it later on its own), fsync
   every file and directory, and rename it into place;
4. only then record the archival in the sign store (``LedgerPruner.record``: the ledger now starts
   at n, with the hash of entry n-1, the root and compact range at n) and delete the archived
   entries and the Merkle nodes no later root or proof needs (``shared.ledger.frontier``), in
   short transactions beside the running sign service. Every checkpoint stays.

The sign service appends a ``ledger_archived`` entry for the archival at its next batch
(``services.sign.stage``), so the ledger itself says what left it, when, by whom, and the
archive's manifest SHA-256. An archival interrupted after step 4's record resumes its deletes
at the next ``mro-edge ledger archive``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from shared.ledger.audit import (
    CHECKPOINT,
    CHECKPOINT_BODY,
    CHECKPOINT_SIG,
    ENTRIES,
    KEY_PEM,
    KEYS,
    PROOFS,
    README,
    AuditError,
    _archived_doc,
    _Chain,
    _ledger_entries,
    _open_with,
    _readme,
    _signature_by,
    _start_of,
    _write_proofs,
    verify_audit,
)
from shared.ledger.checkpoint import CheckpointError, NoteError, parse_checkpoint, split_note
from shared.ledger.entry import export_line, parse_entry
from shared.ledger.frontier import frontier_hashes
from shared.ledger.keys import KeyFileError, LedgerKeyFiles, public_key_to_pem
from shared.ledger.merkle import leaf_hash
from shared.ledger.store import ArchivedBase, LedgerPruner, LedgerView
from shared.runtime.clock import parse_utc, utc_now
from shared.runtime.config import Config
from shared.runtime.files import fsync_dir

LEDGER_ARCHIVED = "ledger_archived"
MANIFEST = "MANIFEST.sha256"
ARCHIVE_INFO = "archive.json"
COSIGNED = "checkpoint.cosigned"
FORMAT = "mro.ledger-archive/1"


class ArchiveRefused(Exception):
    """Nothing was archived or deleted; the message says why and what to do."""


@dataclass(frozen=True)
class Plan:
    """What an archival takes: seq ``first``..``n - 1``, under the stored checkpoint ``checkpoint``."""

    first: int
    n: int
    checkpoint: bytes
    acknowledged: int
    cosigned_size: int
    cosigned_note: bytes | None


def archival_body(base: ArchivedBase) -> dict[str, Any]:
    """The body of the ``ledger_archived`` entry the sign service appends for ``base``."""
    return {
        "first_seq": base.first,
        "archived_count": base.n,
        "root": base.root,
        "last_hash": base.prev,
        "archive": base.archive,
        "manifest_sha256": base.manifest_sha256,
        "operator": base.operator,
        "archived_at": base.archived_at,
    }


# -- 1. plan ---------------------------------------------------------------------------------------

def plan_archive(view: LedgerView, receipt: Any, *, upto: int | None = None,
                 older_than_days: float | None = None, now: datetime | None = None) -> Plan:
    """The prefix to archive (see the module doc); ``ArchiveRefused`` if there is none."""
    first, size = view.first_seq(), view.size()
    acked, cosigned = receipt.acknowledged, receipt.cosigned_size
    if cosigned <= 0 or receipt.cosigned_note is None:
        raise ArchiveRefused(
            "the gateway has not cosigned any checkpoint of this ledger yet, and only what the gateway holds "
            f"and has cosigned is archived (acknowledged: {acked} entries). Check the uplink "
            "(mro-edge status: uplink connected, cosigned_size > 0) and run this again once it has.")
    _check_cosigned(view, receipt.cosigned_note, cosigned, size)
    limit, why = min(acked, cosigned), f"the gateway acknowledged {acked} and cosigned {cosigned} entries"
    if size - 1 < limit:
        limit, why = size - 1, f"the newest entry (seq {size - 1}) always stays on the box"
    if upto is not None and upto < limit:
        limit, why = upto, f"--upto {upto}"
    if older_than_days is not None:
        cutoff = (now or datetime.now(UTC)) - timedelta(days=older_than_days)
        young = _first_recorded_after(view, first, limit, cutoff)
        if young is not None and young < limit:
            limit, why = young, f"seq {young} is younger than {older_than_days:g} days"
    n = view.newest_checkpoint_size(limit)
    if n is None or n <= first:
        raise ArchiveRefused(
            f"nothing to archive: the ledger holds seq {first}..{size - 1} and at most {limit} entries may go "
            f"({why}), but no checkpoint the sign service signed lies between {first + 1} and {limit}. Try again "
            "later (the sign service signs checkpoints as the ledger grows) or with a larger --upto/--older-than.")
    note = view.checkpoint_at(n)
    assert note is not None  # found by newest_checkpoint_size in the same snapshot
    return Plan(first, n, note, acked, cosigned, receipt.cosigned_note)


def _check_cosigned(view: LedgerView, note: bytes, size: int, held: int) -> None:
    """The gateway's receipt must be over this ledger's own tree at its size."""
    try:
        cp = parse_checkpoint(split_note(note)[0])
    except (NoteError, CheckpointError) as exc:
        raise ArchiveRefused(f"the uplink's cosigned checkpoint is unreadable ({exc}): nothing was archived; "
                             "check the uplink (mro-edge status)") from None
    tree = view.tree()
    if cp.size != size or size > held or tree is None or tree.root(size) != cp.root:
        raise ArchiveRefused(
            f"the checkpoint the gateway cosigned (size {cp.size}) does not match this ledger's Merkle tree: the "
            "box and the gateway disagree about the history. Nothing was archived; run 'mro-edge audit export' "
            "and compare it with the gateway before archiving.")


def _first_recorded_after(view: LedgerView, first: int, limit: int, cutoff: datetime) -> int | None:
    """The first seq below ``limit`` recorded at or after ``cutoff`` (None if all are older)."""
    for e in view.entries(first):
        if e.seq >= limit:
            return None
        if parse_utc(parse_entry(e.entry).recorded_at) >= cutoff:
            return e.seq
    return None


# -- 2. write --------------------------------------------------------------------------------------

def write_archive(view: LedgerView, config: Config, plan: Plan, tmp: Path, operator: str) -> dict[str, Any]:
    """Write the archive of ``plan`` into the empty directory ``tmp``; returns its archive.json."""
    try:
        available = LedgerKeyFiles(config.data_path / "keys").public_keys()
    except KeyFileError as exc:
        raise ArchiveRefused(f"cannot read the ledger's public keys: {exc}") from None
    chain = _Chain(available, None)
    base = view.archived()
    frontier = _start_of(base, chain)
    if frontier.size != plan.first:
        raise ArchiveRefused(f"the ledger changed while archiving (it starts at {frontier.size}): run it again")
    wanted = {plan.first, plan.n - 1}
    examples: list[dict[str, Any]] = []
    (tmp / PROOFS).mkdir()
    with open(tmp / ENTRIES, "wb") as f:
        for e in _ledger_entries(view, plan.first):
            if e.seq >= plan.n:
                break
            chain.check(e)
            leaf = leaf_hash(e.entry)
            frontier.append(leaf)
            f.write(export_line(e))
            if e.seq in wanted:
                (tmp / PROOFS / f"{e.seq}.entry").write_bytes(e.entry)
                (tmp / PROOFS / f"{e.seq}.sig").write_bytes(e.signature)
                (tmp / PROOFS / f"{e.seq}.pem").write_text(public_key_to_pem(chain.kids[e.kid]))
                examples.append({"seq": e.seq, "hash": e.hash, "leaf_hash": leaf.hex(), "kid": e.kid})
    if chain.seq != plan.n:
        raise AuditError(chain.seq, f"the ledger ends at seq {chain.seq - 1}, the archive needs seq up to {plan.n - 1}")
    root = frontier.root()
    origin = chain.origin or config.origin
    signed, kid = _open_with(plan.checkpoint, origin, chain.signer_keys(plan.n), f"the stored checkpoint {plan.n}")
    if (signed.size, signed.root) != (plan.n, root):
        raise AuditError(None, f"the stored checkpoint at {plan.n} signs another root than the entries' {root.hex()}")
    public = chain.signer_keys(plan.n)[kid]
    note = plan.checkpoint.decode("utf-8")
    tree = view.tree()
    _write_proofs(tmp, tree, examples, plan.n, root)
    (tmp / CHECKPOINT).write_text(note, encoding="utf-8")
    (tmp / CHECKPOINT_BODY).write_text(signed.text(), encoding="utf-8")
    (tmp / CHECKPOINT_SIG).write_bytes(_signature_by(note, origin, public))
    (tmp / KEY_PEM).write_text(public_key_to_pem(public))
    (tmp / KEYS).mkdir()
    for k, key in {**chain.kids, kid: public}.items():
        (tmp / KEYS / f"{k}.pem").write_text(public_key_to_pem(key))
    if plan.cosigned_note is not None:
        (tmp / COSIGNED).write_bytes(plan.cosigned_note)
    if base is not None:
        (tmp / "archived.json").write_text(json.dumps(_archived_doc(base), indent=1) + "\n")
    info = {
        "format": FORMAT,
        "origin": origin,
        "first": plan.first,
        "n": plan.n,
        "entries": plan.n - plan.first,
        "root": root.hex(),
        "last_hash": chain.prev,
        "frontier": [h.hex() for h in frontier_hashes(frontier)],
        "checkpoint_kid": kid,
        "acknowledged": plan.acknowledged,
        "cosigned_size": plan.cosigned_size,
        "station": config.station,
        "operator": operator,
        "archived_at": utc_now(),
    }
    (tmp / ARCHIVE_INFO).write_text(json.dumps(info, indent=1) + "\n")
    (tmp / README).write_text(_readme(origin, kid, plan.n, root, examples) + _archive_readme(info))
    write_manifest(tmp)
    return info


def _archive_readme(info: dict[str, Any]) -> str:
    first, n = info["first"], info["n"]
    return "\n".join([
        "",
        f"This is an archive made by `mro-edge ledger archive`: seq {first}..{n - 1} of {info['origin']}, removed",
        f"from the box afterwards (the checkpoint covers all {n} entries of the ledger up to here"
        + (f"; seq 0..{first - 1} are in an earlier archive, see archived.json" if first else "") + ").",
        f"{MANIFEST} lists the SHA-256 of every other file. Check it first:",
        "",
        f"  $ sha256sum --quiet -c {MANIFEST} && echo intact",
        "  intact",
        "",
        f"{COSIGNED} is the gateway's receipt (a checkpoint over {info['cosigned_size']} entries it holds, with its",
        "cosignature); check it with the gateway's cosigner key (GET /v1/cosigner-key).",
        "The box keeps the rest. To verify both together (oldest archive first):",
        "",
        "  mro-edge audit export --out EXPORT      (on the box)",
        "  mro-edge audit verify EXPORT --archive <this directory>",
        "",
    ])


def write_manifest(d: Path) -> None:
    """``MANIFEST.sha256``: ``<sha256>  <path>`` for every other file, sorted (``sha256sum -c`` reads it)."""
    lines = [f"{_sha256_file(p)}  {p.relative_to(d).as_posix()}\n"
             for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST]
    (d / MANIFEST).write_text("".join(lines), encoding="utf-8")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- 3. verify ---------------------------------------------------------------------------------------

def check_manifest(d: Path) -> str:
    """Every file listed with its SHA-256, nothing unlisted; returns the manifest's own SHA-256."""
    try:
        text = (d / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuditError(None, f"{MANIFEST} is missing: not an archive of mro-edge ledger archive") from None
    listed: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise AuditError(None, f"{MANIFEST} line {number} is not '<sha256>  <path>'")
        if not (d / name).is_file():
            raise AuditError(None, f"{name} is listed in {MANIFEST} but missing")
        if _sha256_file(d / name) != digest:
            raise AuditError(None, f"{name} differs from its SHA-256 in {MANIFEST}: the archive was altered")
        listed.add(name)
    extra = [p.relative_to(d).as_posix() for p in d.rglob("*")
             if p.is_file() and p.name != MANIFEST and p.relative_to(d).as_posix() not in listed]
    if extra:
        raise AuditError(None, f"{extra[0]} is not listed in {MANIFEST}: the archive was altered")
    return _sha256_file(d / MANIFEST)


def verify_archive(d: str | Path, *, trusted_keys: Iterable[bytes] | None = None) -> dict[str, Any]:
    """The manifest, then ``verify_audit`` of the directory, then archive.json against what verified."""
    d = Path(d)
    manifest = check_manifest(d)
    report = verify_audit(d, trusted_keys=trusted_keys)
    try:
        info = json.loads((d / ARCHIVE_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditError(None, f"{ARCHIVE_INFO} is unreadable: {exc}") from None
    if (info.get("n"), info.get("root"), info.get("first")) != (report["entries"], report["root"], report["first"]):
        raise AuditError(None, f"{ARCHIVE_INFO} describes other entries than the ones that verified")
    return {**report, "manifest_sha256": manifest, "n": info["n"], "last_hash": info["last_hash"]}


def _fsync_tree(d: Path) -> None:
    for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fsync_dir(p)
    fsync_dir(d)


# -- 4. the whole archival ---------------------------------------------------------------------------

def archive_ledger(config: Config, out: str | Path, *, operator: str, upto: int | None = None,
                   older_than_days: float | None = None, log: Any = None) -> dict[str, Any]:
    """Steps 1 to 4 of the module doc; returns a summary. ``ArchiveRefused`` / ``AuditError``: nothing
    was deleted (an archive directory may have been written if the refusal came after it)."""
    from services.uplink.store import gateway_receipt

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArchiveRefused(f"{out} exists and is not an empty directory: choose a new --out (an archive is "
                             "never written over another one)")
    with LedgerPruner(config) as pruner:
        resumed = pruner.prune()
        if log is not None and any(resumed):
            log.info("interrupted archival resumed", entries_deleted=resumed[0], nodes_deleted=resumed[1],
                     state_transition="LEDGER_PRUNE_RESUMED")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        try:
            with pruner.snapshot() as view:
                plan = plan_archive(view, gateway_receipt(config), upto=upto, older_than_days=older_than_days)
                info = write_archive(view, config, plan, tmp, operator)
            verified = verify_archive(tmp)
            _fsync_tree(tmp)
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
            fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        base = ArchivedBase(n=plan.n, prev=info["last_hash"], root=info["root"], frontier=info["frontier"],
                            archive=str(out.resolve()), manifest_sha256=verified["manifest_sha256"],
                            operator=operator, archived_at=info["archived_at"], first=plan.first)
        try:
            pruner.record(base)
        except ValueError as exc:
            raise ArchiveRefused(f"the archive {out} was written and verifies, but the ledger changed under it "
                                 f"({exc}); nothing was deleted. Keep or remove {out}, and run this again") from None
        if log is not None:
            log.info("ledger archive recorded", first=plan.first, n=plan.n, root=base.root, archive=base.archive,
                     manifest_sha256=base.manifest_sha256, operator=operator, state_transition="LEDGER_ARCHIVING")
        entries, nodes = pruner.prune()
    summary = {"first": plan.first, "n": plan.n, "root": base.root, "archive": base.archive,
               "manifest_sha256": base.manifest_sha256, "entries_deleted": entries + resumed[0],
               "nodes_deleted": nodes + resumed[1], "acknowledged": plan.acknowledged,
               "cosigned_size": plan.cosigned_size, "operator": operator}
    if log is not None:
        log.info("ledger archived", **summary, state_transition="LEDGER_ARCHIVED")
    return summary
