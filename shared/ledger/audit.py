"""``mro-edge audit export`` / ``mro-edge audit verify``: a ledger an auditor can check years later.

An export directory holds::

    entries.jsonl        ledger export rows (shared.ledger.entry.export_line), seq 0..N-1, in order
    checkpoint           signed C2SP tlog-checkpoint over all N entries (origin, N, Merkle root),
                         signed by the ledger key under the key name = origin
    checkpoint.body      the checkpoint's signed text           } for openssl pkeyutl -verify -rawin
    checkpoint.sig       its raw 64-byte Ed25519 signature      }
    ledger-key.pem       the Ed25519 public key that signed the checkpoint (SubjectPublicKeyInfo PEM):
                         the ledger's current key
    keys/<kid>.pem       every key that signed an entry or was introduced by a key_rotation entry
    proofs/<seq>.json    {seq, tree_size, leaf_hash, proof: [hex...], root} for each requested seq
    proofs/<seq>.entry   the entry's exact bytes                } for sha256sum and
    proofs/<seq>.sig     its raw 64-byte Ed25519 signature      } openssl pkeyutl -verify -rawin
    proofs/<seq>.pem     the public key that signed it          }
    README.txt           how to check one record and the checkpoint by hand
    archived.json        only when the entries start after seq 0 (the ledger was archived, or this is an
                         archive of a later part): {first, prev, root, frontier, archive, manifest_sha256}:
                         where the entries start, the hash of entry first-1 they link to, and the Merkle
                         compact range at ``first`` (``shared.ledger.frontier``) the root is computed on from

An export that starts at ``first`` verifies on its own (the chain from ``first``, the root from the
compact range, the signed checkpoint over all ``first + len`` entries binds both), and together with
the archives that hold seq 0..first-1 (``verify_audit(..., archives=[...])``, oldest first): then it
must continue exactly where the last archive ends (seq, hash, compact range, keys).
    gateway.json         the gateway's cosigned checkpoints of this ledger (up to the newest 1000 at or
                         below the export's size) and its cosigner key, fetched when the export was
                         made; when the gateway could not be asked, ``fetched`` is false and
                         ``reason`` says why (see ``GATEWAY_MANIFEST``)

Keys: the first entry's key is the anchor an auditor confirms out of band (``--trusted-key``);
every later key is introduced by a ``key_rotation`` entry signed by the key before it
(``shared.ledger.entry.KeySchedule``), so the chain itself carries its key history.

The checkpoint is the one the sign service signed over exactly these entries when there is
one (``checkpoints`` table); otherwise the export signs one with the ledger's current key. A
stored checkpoint (or ``keys/checkpoint.latest``) covering more entries than the store holds
means the store was rolled back: the export refuses and says so.

Trust: without an anchor (``--trusted-key``, the gateway's key registry, or gateway cosignatures
under a cosigner key the auditor pinned) ``verify_audit`` proves self-consistency only, since an
export carries its own keys: its report says so (``anchored_by`` empty, ``warning``).

Both directions stream: entries are read one at a time and the Merkle root is recomputed with
an O(log n) compact frontier, so memory stays flat for millions of entries. ``verify_audit``
stops at the first problem and raises ``AuditError`` naming the seq (or the file) and why.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lmdb

from shared.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    NoteError,
    note_signatures,
    open_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
    split_note,
)
from shared.ledger.entry import (
    GENESIS_PREV,
    ExportLineError,
    LedgerEntry,
    SignedEntry,
    entry_hash,
    export_line,
    parse_export_line,
)
from shared.ledger.frontier import frontier_hashes, frontier_root, resume_frontier
from shared.ledger.keys import (
    KeyFileError,
    KeyFormatError,
    LedgerKeyFiles,
    SigningKey,
    key_id,
    public_key_from_pem,
    public_key_to_pem,
)
from shared.ledger.merkle import (
    EMPTY_ROOT,
    Frontier,
    MerkleCorruptError,
    MerkleTree,
    leaf_hash,
    lmdb_tree,
    verify_inclusion,
)
from shared.ledger.store import (
    CHECKPOINTS_TABLE,
    ArchivedBase,
    LedgerReadError,
    LedgerView,
    latest_checkpoint_path,
    open_ledger,
    read_latest_checkpoint,
)
from shared.ledger.timeline import TimeOrder
from shared.ledger.verify import (
    ChainVerifier,
    HistoryClaim,
    LedgerVerifyError,
    RolledBack,
    check_length,
    check_roots,
)
from shared.runtime.config import Config

__all__ = ["NOT_ANCHORED", "AuditError", "export_audit", "verify_audit"]

NOT_ANCHORED = (
    "NOT ANCHORED: only self-consistency was proved. The keys came from the export itself, so a complete "
    "forgery re-signed under another key would pass as well. Anchor it: --trusted-key PEM (the box's ledger "
    "key obtained out of band), or --gateway URL (the gateway's key registry and its cosigned checkpoints), "
    "or --cosigner-key VKEY (the gateway's cosignatures bundled in the export, under a key you hold)."
)

ARCHIVED = "archived.json"

ENTRIES = "entries.jsonl"
CHECKPOINT = "checkpoint"
CHECKPOINT_BODY = "checkpoint.body"
CHECKPOINT_SIG = "checkpoint.sig"
KEY_PEM = "ledger-key.pem"
KEYS = "keys"
PROOFS = "proofs"
README = "README.txt"
GATEWAY_MANIFEST = "gateway.json"
_PROOF_NAME = re.compile(r"^(0|[1-9][0-9]*)\.json\Z")
_HEX32 = re.compile(r"^[0-9a-f]{64}\Z")


class AuditError(Exception):
    """The export does not verify. ``seq`` is the first bad entry (None when the problem is a file
    such as the checkpoint or the key rather than an entry); ``reason`` says what is wrong."""

    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(f"seq {seq}: {reason}" if seq is not None else reason)
        self.seq = seq
        self.reason = reason


# -- shared helpers ------------------------------------------------------------------------------

class _Chain:
    """Streaming chain check with the seq of the first problem (``shared.ledger.verify.check_entry``).

    The verifier is created at the first entry, trusting the key that signed it (or, with
    ``trusted``, only those keys); later keys must come from rotation entries.
    """

    def __init__(self, available: Mapping[str, bytes], trusted: Mapping[str, bytes] | None) -> None:
        self.available = dict(available)
        self.trusted = trusted
        self.verifier: ChainVerifier | None = None
        self.origin: str | None = None
        self.kids: dict[str, bytes] = {}
        self.start = (0, GENESIS_PREV)

    def resume(self, first: int, prev: str) -> None:
        """The first entry to come is seq ``first``, linked to ``prev`` (a ledger whose start was archived)."""
        self.start = (first, prev)

    def check(self, e: SignedEntry) -> LedgerEntry:
        if self.verifier is None:
            if self.trusted is not None:
                anchors = dict(self.trusted)
                if e.kid not in anchors and e.kid in self.available:
                    raise AuditError(0, f"key {e.kid} that signed the first entry is not one of the trusted "
                                        "ledger keys")
            else:
                anchors = {e.kid: self.available[e.kid]} if e.kid in self.available else {}
            self.verifier = ChainVerifier(anchors, expect_first_seq=self.start[0], prev=self.start[1])
        try:
            checked = self.verifier.check(e)
        except LedgerVerifyError as exc:
            raise AuditError(exc.seq, exc.reason) from None
        parsed = checked.entry
        if self.origin is None:
            self.origin = self.verifier.chain.origin = parsed.origin
        self.kids.setdefault(e.kid, self.verifier.schedule.keys[e.kid])
        if checked.rotation is not None:
            self.kids.setdefault(checked.rotation.new_kid, checked.rotation.new_public)
        return parsed

    @property
    def seq(self) -> int:
        return self.verifier.seq if self.verifier else self.start[0]

    @property
    def prev(self) -> str:
        return self.verifier.chain.prev if self.verifier else self.start[1]

    def signer_keys(self, size: int) -> dict[str, bytes]:
        """Keys that may sign a checkpoint of ``size`` entries: valid for its last entry or the next."""
        if self.verifier is None:
            return dict(self.available if self.trusted is None else self.trusted)
        schedule, out = self.verifier.schedule, {}
        for kid, public in schedule.keys.items():
            for s in (size - 1, size):
                try:
                    schedule.key_for(kid, max(s, 0))
                except ValueError:
                    continue
                out[kid] = public
                break
        return out


def _ledger_entries(view: LedgerView, first: int = 0) -> Iterator[SignedEntry]:
    """The stored rows in seq order; an unreadable row is reported with the seq its key names."""
    read = first - 1
    try:
        for e in view.entries(first):
            read = e.seq
            yield e
    except LedgerReadError as exc:
        raise AuditError(exc.seq, exc.reason) from None
    except lmdb.Error as exc:
        raise AuditError(read + 1, f"LMDB cannot read the ledger table after seq {read}: {exc}") from None


def _readme(origin: str, kid: str, size: int, root: bytes, examples: list[dict[str, Any]]) -> str:
    lines = [
        "For auditors: checking this ledger export",
        "=========================================",
        "",
        f"Ledger {origin}: {size} entries{f' (seq 0..{size - 1})' if size else ''}, Merkle root {root.hex()},",
        f"checkpoint signed by the Ed25519 key with kid {kid} ({KEY_PEM}).",
        "",
        "Before trusting anything here, confirm the kid of the key that signed seq 0 with the",
        "operator's key registry (the gateway, or `mro-edge keys show` on the box): an export carries",
        "its own public keys, so a forger could ship matching ones. Every later key is introduced by a",
        "key_rotation entry signed by the key before it. The kid is the first 8 bytes (16 hex digits)",
        "of SHA-256 over the 32-byte raw public key, which is the end of the key's DER form.",
        "",
        "Files",
        "  entries.jsonl      one entry per line: seq, idempotency_key, entry (the exact signed bytes,",
        "                     canonical JSON, as a JSON string), hash (SHA-256 of those bytes; the next",
        "                     entry's \"prev\" repeats it, forming a hash chain), signature (hex Ed25519",
        "                     over the 32-byte SHA-256 digest of the bytes) and kid.",
        "  checkpoint         signed C2SP tlog-checkpoint: origin, number of entries, base64 RFC 6962",
        "                     Merkle root over all entries (leaf = SHA-256(0x00 || entry bytes)).",
        "  checkpoint.body    the checkpoint's signed text; checkpoint.sig its raw 64-byte signature",
        "                     (plain Ed25519 over the text, per the signed-note format).",
        "  keys/<kid>.pem     every public key of the ledger's history (key_rotation entries).",
        "  proofs/<seq>.json  inclusion proof of entry <seq> under the checkpoint's root;",
        "  proofs/<seq>.entry the entry's exact bytes, proofs/<seq>.sig its raw 64-byte signature,",
        "  proofs/<seq>.pem   the public key that signed it.",
        "  gateway.json       the central gateway's cosigned checkpoints of this ledger and its cosigner",
        "                     key, when the export could ask it (else \"fetched\": false and why).",
        "",
        "Without an anchor, `mro-edge audit verify` proves self-consistency only (it says so): pass",
        "--trusted-key (the first key, from the registry), --gateway URL, or --cosigner-key VKEY.",
        "",
        "Everything at once (hash chain, every signature, Merkle root, checkpoint and proofs):",
        "",
        "  mro-edge audit verify <this directory>",
        "",
        "By hand, with OpenSSL 3.0 or later and sha256sum. Run the commands below in this directory",
        "(or a writable copy: step 3 writes one scratch file, entry.digest); each command is followed",
        "by the output it must print.",
        "",
        "0. The key's kid (compare it with the registry):",
        "",
        f"  $ openssl pkey -pubin -in {KEY_PEM} -outform DER | tail -c 32 | sha256sum | cut -c1-16",
        f"  {kid}",
        "",
        "1. The checkpoint is signed by the ledger key:",
        "",
        f"  $ openssl pkeyutl -verify -rawin -pubin -inkey {KEY_PEM} -in {CHECKPOINT_BODY} -sigfile {CHECKPOINT_SIG}",
        "  Signature Verified Successfully",
        "",
    ]
    if not examples:
        lines += [
            "2. No per-record files were exported. Run `mro-edge audit export --seq N` to get",
            "   proofs/N.entry and proofs/N.sig for the records you want to check by hand.",
            "",
        ]
        return "\n".join(lines)
    ex = examples[0]
    seq = ex["seq"]
    entry_file, sig_file, pem_file = f"{PROOFS}/{seq}.entry", f"{PROOFS}/{seq}.sig", f"{PROOFS}/{seq}.pem"
    lines += [
        f"2. Record seq {seq}: its bytes hash to the value entries.jsonl records for it (and that",
        f"   seq {seq + 1} carries as \"prev\", if it exists):",
        "",
        f"  $ sha256sum {entry_file}",
        f"  {ex['hash']}  {entry_file}",
        f"  $ grep -F '{{\"seq\":{seq},' {ENTRIES} | grep -c -F '\"hash\":\"{ex['hash']}\"'",
        "  1",
        "",
        f"3. Its signature is by the key it names, kid {ex['kid']} (Ed25519 over the SHA-256 digest of",
        "   the bytes):",
        "",
        f"  $ openssl pkey -pubin -in {pem_file} -outform DER | tail -c 32 | sha256sum | cut -c1-16",
        f"  {ex['kid']}",
        f"  $ openssl dgst -sha256 -binary -out entry.digest {entry_file}",
        f"  $ openssl pkeyutl -verify -rawin -pubin -inkey {pem_file} -in entry.digest -sigfile {sig_file}",
        "  Signature Verified Successfully",
        "",
        "4. Its Merkle leaf hash (SHA-256 of a 0x00 byte followed by the bytes) is the leaf_hash of",
        f"   {PROOFS}/{seq}.json, whose proof leads to the checkpoint's root (checked by",
        "   `mro-edge audit verify`, or by hand per RFC 9162 section 2.1.3.2):",
        "",
        f"  $ (printf '\\000'; cat {entry_file}) | sha256sum",
        f"  {ex['leaf_hash']}  -",
        "",
    ]
    if len(examples) > 1:
        others = ", ".join(str(e["seq"]) for e in examples[1:])
        lines += [f"The same works for the other exported records: {others}.", ""]
    return "\n".join(lines)


def export_audit(
    config: Config,
    out_dir: str | Path,
    seqs: Iterable[int] = (),
    *,
    public_keys: Mapping[str, bytes] | None = None,
    gateway: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an audit export of the whole ledger to ``out_dir`` (must not exist, or be empty).

    ``gateway``: what ``mro-edge audit export`` fetched from the gateway (``GATEWAY_MANIFEST``:
    ``fetched``, ``reason``, ``cosigner``, ``checkpoints``); each bundled checkpoint is checked like
    the box's own (none may cover more entries than the store holds, each must sign the store's
    root at its size), so an export never bundles a gateway view that contradicts the box.

    The chain is verified while it is exported (a damaged store is reported with its seq and
    nothing is written); the Merkle root is recomputed from the entries, and when the sign
    stage's ``merkle`` table is present its leaves and root must agree with it. The checkpoint
    is the sign service's own one over exactly these entries if it stored one, else one signed
    now with the ledger's current key. ``public_keys`` (kid -> raw key) are the trusted keys for
    the first entry; by default the keys the box has held (``LedgerKeyFiles.public_keys``).
    Returns a summary dict.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new --out")
    wanted = sorted(set(int(s) for s in seqs))
    store = open_ledger(config)
    try:
        key_files = LedgerKeyFiles(config.data_path / "keys")
        try:
            current = key_files.current(create=False)
            private = {current.kid: current}
            own = key_files.public_keys()
        except KeyFileError:
            private, own = {}, {}
        trusted = dict(public_keys) if public_keys is not None else None
        available = own | (trusted or {})
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        try:
            with store.snapshot() as view:
                summary = _export(view, config, _Chain(available, trusted), private, tmp, wanted, gateway)
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        store.close()
    summary["out"] = str(out)
    return summary


def _history_claims(view: LedgerView, config: Config) -> tuple[bytes | None, list[HistoryClaim]]:
    """(the newest stored checkpoint note if it covers exactly the entries held, else None; the sizes
    and roots it and ``keys/checkpoint.latest`` vouch for: none may exceed the store)."""
    claims: list[HistoryClaim] = []
    newest = view.newest_checkpoint()
    exact = None
    if newest is not None:
        size, note = newest
        where = f"the newest checkpoint in {CHECKPOINTS_TABLE}"
        cp = _read_checkpoint_text(note, where)
        claims.append(HistoryClaim(where, cp.size, cp.root))
        exact = note if size == view.size() else None
    latest = read_latest_checkpoint(latest_checkpoint_path(config))
    if latest is not None:
        where = str(latest_checkpoint_path(config))
        cp = _read_checkpoint_text(latest, where)
        claims.append(HistoryClaim(where, cp.size, cp.root))
    return exact, claims


def _gateway_claims(gateway: Mapping[str, Any] | None) -> list[HistoryClaim]:
    """The sizes and roots the bundled gateway checkpoints vouch for (shape only; signatures are
    checked by ``verify_audit``, which knows the keys current at each size)."""
    claims = []
    for i, row in enumerate((gateway or {}).get("checkpoints") or []):
        cp = _read_checkpoint_text(str(row.get("cosigned_checkpoint", "")), f"the gateway's checkpoint {i}")
        claims.append(HistoryClaim(f"the gateway's cosigned checkpoint of size {cp.size}", cp.size, cp.root))
    return claims


def _export(view: LedgerView, config: Config, chain: _Chain, private: dict[str, SigningKey], tmp: Path,
            wanted: list[int], gateway: Mapping[str, Any] | None = None) -> dict[str, Any]:
    with ExitStack() as stack:
        count = view.size()
        base = view.archived()
        start = _start_of(base, chain)
        _check_wanted(wanted, count, base)
        stored_note, claims = _history_claims(view, config)
        claims += _gateway_claims(gateway)
        _refuse_rollback(count, claims)
        claims = [claim for claim in claims if claim.size >= start.size]  # older ones: in the archive
        stored = view.tree()
        stored_size = _stored_tree_size(stored)
        use_stored = stored is not None and stored_size >= count
        scratch = _scratch_tree(stack) if wanted and not use_stored else None
        (tmp / PROOFS).mkdir()
        frontier, roots, examples = _write_entries(view, chain, tmp, set(wanted), {claim.size for claim in claims},
                                                   stored, stored_size, scratch, start)
        seq = chain.seq
        if seq != count:
            raise AuditError(seq, f"the ledger table lists {count} entries but {seq} were read")
        root = frontier.root()
        _refuse_fork(claims, roots, count)
        if stored is not None and use_stored:
            _check_stored_root(stored, count, root)
        _write_proofs(tmp, stored if use_stored else scratch, examples, count, root)

    origin = chain.origin or config.origin
    note_text, signer_kid = _export_checkpoint(stored_note, Checkpoint(origin, count, root), chain, private)
    signer_public = chain.signer_keys(count)[signer_kid] if chain.verifier else private[signer_kid].public_bytes
    (tmp / CHECKPOINT).write_text(note_text, encoding="utf-8")
    (tmp / CHECKPOINT_BODY).write_text(Checkpoint(origin, count, root).text(), encoding="utf-8")
    (tmp / CHECKPOINT_SIG).write_bytes(_signature_by(note_text, origin, signer_public))
    (tmp / KEY_PEM).write_text(public_key_to_pem(signer_public))
    (tmp / KEYS).mkdir()
    for kid, public in {**chain.kids, signer_kid: signer_public}.items():
        (tmp / KEYS / f"{kid}.pem").write_text(public_key_to_pem(public))
    readme = _readme(origin, signer_kid, count, root, examples)
    if base is not None:
        (tmp / ARCHIVED).write_text(json.dumps(_archived_doc(base), indent=1) + "\n")
        readme += _archived_readme(base)
    (tmp / README).write_text(readme)
    if gateway is not None:
        (tmp / GATEWAY_MANIFEST).write_text(json.dumps(dict(gateway), indent=1) + "\n")
    return {
        "first": base.n if base is not None else 0,
        "archive": base.archive if base is not None else None,
        "entries": count,
        "origin": origin,
        "tree_size": count,
        "root": root.hex(),
        "kid": signer_kid,
        "kids": sorted(chain.kids),
        "proofs": [ex["seq"] for ex in examples],
        "merkle": "stored" if use_stored else "recomputed",
        "checkpoint": "stored" if stored_note is not None and note_text.encode() == stored_note else "signed",
        "gateway_checkpoints": len((gateway or {}).get("checkpoints") or []) if gateway is not None else None,
    }


def _check_wanted(wanted: list[int], count: int, base: ArchivedBase | None = None) -> None:
    first = base.n if base is not None else 0
    for s in wanted:
        if 0 <= s < first and base is not None:
            raise ValueError(f"seq {s} was archived (seq 0..{first - 1} are in the archive {base.archive}): "
                             "take it from there")
        if not first <= s < count:
            raise ValueError(f"seq {s} is not in the ledger (it holds seq {first}..{count - 1})")


def _start_of(base: ArchivedBase | None, chain: _Chain) -> Frontier:
    """The frontier the entries held continue (empty, or the archived part's compact range)."""
    if base is None:
        return Frontier()
    chain.resume(base.n, base.prev)
    frontier = resume_frontier(base.n, [bytes.fromhex(h) for h in base.frontier])
    if frontier.root().hex() != base.root:
        raise AuditError(None, f"the stored compact range at {base.n} does not give the archived root {base.root}")
    return frontier


def _archived_doc(base: ArchivedBase) -> dict[str, Any]:
    return {"first": base.n, "prev": base.prev, "root": base.root, "frontier": base.frontier,
            "archive": base.archive, "manifest_sha256": base.manifest_sha256}


def _archived_readme(base: ArchivedBase) -> str:
    return "\n".join([
        "",
        f"Archived part: seq 0..{base.n - 1} are not in this directory. They were moved to the archive",
        f"{base.archive} (its MANIFEST.sha256 has SHA-256 {base.manifest_sha256}) by `mro-edge ledger archive`",
        f"on {base.archived_at}. {ARCHIVED} gives where these entries continue it: seq {base.n}, linked to",
        f"the hash {base.prev} of seq {base.n - 1}, and the Merkle compact range at {base.n} (root {base.root}).",
        "Verify both together (the archive first, oldest first if there are several):",
        "",
        "  mro-edge audit verify <this directory> --archive <archive directory>",
        "",
    ])


def _refuse_rollback(count: int, claims: list[HistoryClaim]) -> None:
    """No checkpoint may vouch for more entries than the store holds."""
    try:
        check_length(count, claims)
    except RolledBack as found:
        raise AuditError(count, f"ROLLBACK: the ledger holds {count} entries but {found.claim.where} was "
                                f"signed over {found.claim.size}: the store was restored from an older copy "
                                "(see the sign service's alarm for the recovery)") from None


def _refuse_fork(claims: list[HistoryClaim], roots: dict[int, bytes], count: int) -> None:
    """Every checkpoint must sign the root of the store's own first entries."""
    try:
        check_roots(claims, roots.__getitem__, count)
    except RolledBack as found:
        where, size = found.claim.where, found.claim.size
        raise AuditError(None, f"FORK: {where} (size {size}) was signed over other entries than the "
                               f"store's first {size}: the store holds another history") from None


def _stored_tree_size(stored: MerkleTree | None) -> int:
    try:
        return stored.size() if stored is not None else 0
    except MerkleCorruptError as exc:
        raise AuditError(None, f"stored Merkle tree: {exc}") from None


def _write_entries(view: LedgerView, chain: _Chain, tmp: Path, wanted: set[int], checked_sizes: set[int],
                   stored: MerkleTree | None, stored_size: int, scratch: MerkleTree | None,
                   start: Frontier | None = None) -> tuple[Frontier, dict[int, bytes], list[dict[str, Any]]]:
    """Check and write every entry to ``ENTRIES``, and the proof inputs of the ``wanted`` ones.

    Returns the frontier over all leaves, the roots at ``checked_sizes`` (and 0), and one example
    per wanted entry; the leaves also go into ``scratch`` when proofs need a tree of their own."""
    frontier = start if start is not None else Frontier()
    roots: dict[int, bytes] = {0: EMPTY_ROOT, frontier.size: frontier.root()}
    examples: list[dict[str, Any]] = []
    with open(tmp / ENTRIES, "wb") as f:
        for e in _ledger_entries(view, frontier.size):
            chain.check(e)
            seq = chain.seq - 1
            leaf = leaf_hash(e.entry)
            if stored is not None and seq < stored_size:
                _check_stored_leaf(stored, seq, leaf)
            frontier.append(leaf)
            if frontier.size in checked_sizes:
                roots[frontier.size] = frontier.root()
            if scratch is not None:
                scratch.append(leaf)
            f.write(export_line(e))
            if seq in wanted:
                (tmp / PROOFS / f"{seq}.entry").write_bytes(e.entry)
                (tmp / PROOFS / f"{seq}.sig").write_bytes(e.signature)
                (tmp / PROOFS / f"{seq}.pem").write_text(public_key_to_pem(chain.kids[e.kid]))
                examples.append({"seq": seq, "hash": e.hash, "leaf_hash": leaf.hex(), "kid": e.kid})
        f.flush()
        os.fsync(f.fileno())
    return frontier, roots, examples


def _check_stored_leaf(stored: MerkleTree, seq: int, leaf: bytes) -> None:
    try:
        if stored.node(0, seq) != leaf:
            raise AuditError(seq, "the stored Merkle leaf differs from the entry's leaf hash")
    except MerkleCorruptError as exc:
        raise AuditError(seq, f"stored Merkle tree: {exc}") from None


def _check_stored_root(stored: MerkleTree, count: int, root: bytes) -> None:
    try:
        if stored.root(count) != root:
            raise AuditError(None, f"the stored Merkle tree's root at size {count} differs from the root "
                                   "recomputed from the entries: an interior node of the tree is damaged")
    except MerkleCorruptError as exc:
        raise AuditError(None, f"stored Merkle tree: {exc}") from None


def _write_proofs(tmp: Path, tree: MerkleTree | None, examples: list[dict[str, Any]], count: int,
                  root: bytes) -> None:
    """One verified inclusion proof per example, as ``PROOFS/<seq>.json``."""
    for ex in examples:
        s = ex["seq"]
        assert tree is not None  # requested proofs: the stored tree, else the scratch one
        proof = tree.inclusion_proof(s, count)
        if not verify_inclusion(bytes.fromhex(ex["leaf_hash"]), s, count, proof, root):
            raise AuditError(s, "the inclusion proof built for this entry does not verify")
        doc = {"seq": s, "tree_size": count, "leaf_hash": ex["leaf_hash"],
               "proof": [p.hex() for p in proof], "root": root.hex()}
        (tmp / PROOFS / f"{s}.json").write_text(json.dumps(doc, indent=1) + "\n")


def _export_checkpoint(stored: bytes | None, cp: Checkpoint, chain: _Chain,
                       private: dict[str, SigningKey]) -> tuple[str, str]:
    """(signed note, kid that signed it): the stored one if it signs exactly ``cp``, else a new one."""
    candidates = chain.signer_keys(cp.size)
    if stored is not None:
        for kid, public in candidates.items():
            try:
                signed, _ = open_checkpoint(stored, {cp.origin: public})
            except (NoteError, CheckpointError):
                continue
            if (signed.origin, signed.size, signed.root) == (cp.origin, cp.size, cp.root):
                return stored.decode("utf-8"), kid
    usable = [k for kid, k in private.items() if kid in candidates]
    if not usable:
        raise AuditError(None, f"no stored checkpoint covers all {cp.size} entries and none of the keys in "
                               f"keys/ may sign one (the ledger's current key is one of {sorted(candidates)})")
    key = usable[-1]
    return sign_checkpoint(cp, key), key.kid


def _signature_by(note: str, name: str, public: bytes) -> bytes:
    """The raw 64-byte signature of ``name``/``public`` in ``note`` (for checkpoint.sig)."""
    from shared.ledger.checkpoint import ED25519_TYPE
    from shared.ledger.checkpoint import key_id as note_key_id

    want = note_key_id(name, ED25519_TYPE, public)
    for signer, kid, signature in note_signatures(note):
        if signer == name and kid == want:
            return signature
    raise AuditError(None, f"{CHECKPOINT} carries no signature of {name} with the exported key")


def _scratch_tree(stack: ExitStack) -> MerkleTree:
    """A throwaway on-disk tree (bounded memory) for proofs when the store has no Merkle table."""
    path = stack.enter_context(tempfile.TemporaryDirectory(prefix="mro-audit-"))
    env = lmdb.open(path, map_size=1 << 40, sync=False, metasync=False, lock=False, max_dbs=1)
    stack.callback(env.close)
    txn = env.begin(write=True)
    stack.callback(txn.abort)
    return lmdb_tree(txn)


# -- verify ---------------------------------------------------------------------------------------

def _read_pem(path: Path, name: str) -> bytes:
    try:
        return public_key_from_pem(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        raise AuditError(None, f"{name} is missing") from None
    except (KeyFormatError, UnicodeDecodeError) as exc:
        raise AuditError(None, f"{name}: {exc}") from None


def _read_keys(d: Path) -> tuple[bytes, dict[str, bytes]]:
    """(ledger-key.pem, {kid: key} of it and every keys/*.pem); kids are computed, never read from names."""
    current = _read_pem(d / KEY_PEM, KEY_PEM)
    available = {key_id(current): current}
    if (d / KEYS).is_dir():
        for p in sorted((d / KEYS).glob("*.pem")):
            public = _read_pem(p, f"{KEYS}/{p.name}")
            available[key_id(public)] = public
    return current, available


def _read_checkpoint_text(note: bytes | str, what: str) -> Checkpoint:
    """Shape-only parse (the signature is checked once the key and entries are known)."""
    try:
        text, _ = split_note(note)
        return parse_checkpoint(text)
    except (NoteError, CheckpointError) as exc:
        raise AuditError(None, f"{what}: {exc}") from None


def _load_proofs(d: Path) -> dict[int, dict[str, Any]]:
    proofs: dict[int, dict[str, Any]] = {}
    pdir = d / PROOFS
    if not pdir.is_dir():
        return proofs
    for p in sorted(pdir.iterdir()):
        if p.suffix != ".json":
            continue
        m = _PROOF_NAME.match(p.name)
        if not m:
            raise AuditError(None, f"{PROOFS}/{p.name}: a proof file is named <seq>.json")
        seq = int(m.group(1))
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise AuditError(seq, f"{PROOFS}/{p.name} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != {"seq", "tree_size", "leaf_hash", "proof", "root"}:
            raise AuditError(seq, f"{PROOFS}/{p.name} must hold exactly seq, tree_size, leaf_hash, proof, root")
        hexes = [doc["leaf_hash"], doc["root"], *(doc["proof"] if isinstance(doc["proof"], list) else [None])]
        if (type(doc["seq"]) is not int or type(doc["tree_size"]) is not int
                or not all(isinstance(h, str) and _HEX32.match(h) for h in hexes)):
            raise AuditError(seq, f"{PROOFS}/{p.name} has a malformed field")
        if doc["seq"] != seq:
            raise AuditError(seq, f"{PROOFS}/{p.name} says seq {doc['seq']}")
        proofs[seq] = doc
    return proofs


def _iter_rows(path: Path) -> Iterator[tuple[int, SignedEntry]]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise AuditError(None, f"{ENTRIES} is missing") from None
    with f:
        for lineno, line in enumerate(f):
            try:
                yield lineno, parse_export_line(line)
            except ExportLineError as exc:
                raise AuditError(lineno, f"{ENTRIES} line {lineno + 1}: {exc}") from None


class _Stream:
    """What verifying a directory leaves for the next one (``archives``): the chain, the frontier,
    the roots captured at the sizes of the known checkpoints, and which archives were covered."""

    def __init__(self, chain: _Chain, targets: set[int]) -> None:
        self.chain = chain
        self.frontier = Frontier()
        self.targets = targets
        self.roots: dict[int, bytes] = {0: EMPTY_ROOT} if 0 in targets else {}
        self.dirs = 0
        self.time_order = TimeOrder()  # recorded_at across the directories, as one ledger
        self.findings: list[dict[str, Any]] = []


def verify_audit(
    path: str | Path,
    *,
    trusted_keys: Iterable[bytes] | None = None,
    known_checkpoints: Iterable[str | bytes] = (),
    extra_public_keys: Iterable[bytes] = (),
    archives: Iterable[str | Path] = (),
    trusted_label: str = "--trusted-key",
    cosigner_key: tuple[str, bytes] | None = None,
    gateway_checkpoints: Iterable[str | bytes] = (),
    gateway_cosigner: tuple[str, bytes] | None = None,
) -> dict[str, Any]:
    """Verify an export directory; returns a report dict, raises ``AuditError`` at the first problem.

    Checks, streaming: every row parses; the hash chain, seqs and every entry signature
    (``shared.ledger.verify.check_entry``: the first entry's key from ledger-key.pem / keys/*.pem /
    ``extra_public_keys``, later keys only through key_rotation entries, retired keys refused);
    one origin; the Merkle root of entries 0..size-1 equals the signed checkpoint's, whose
    signature must verify under the key the chain has current at that size (= ledger-key.pem);
    the entry count equals the checkpoint's size; checkpoint.body/.sig and every proofs/<seq>.*
    file agree with the entries and checkpoint, and every inclusion proof verifies.

    ``findings`` in the report: what verifies but an auditor must know, one dict per entry whose
    ``recorded_at`` is earlier than the one before it (``shared.ledger.timeline.TimeOrder``).

    ``trusted_keys``: raw public keys obtained out of band; the first entry's key must be one.
    ``known_checkpoints``: signed checkpoint notes the auditor already holds (older exports, the
    gateway's cosigned receipts); each must be consistent with the exported history, which catches
    rollback (export behind a known checkpoint) and forks (a different root at a known size).
    ``archives``: directories of ``mro-edge ledger archive`` holding the entries before the
    export's first one, oldest first: each is verified, and each next directory must continue it
    exactly (seq, hash, compact range, key schedule). Without them, an export that starts after
    seq 0 (``archived.json``) is verified from its start and the report says which seqs it lacks.

    The gateway's cosigned checkpoints (bundled in ``GATEWAY_MANIFEST``, and ``gateway_checkpoints``
    fetched live with the ``gateway_cosigner`` key) are checked the same way, and each must carry a
    valid cosignature: by ``cosigner_key`` when the auditor pinned one (then they anchor the
    export), else by the key the manifest names. ``trusted_label`` says where ``trusted_keys`` came
    from. The report's ``anchored_by`` lists the anchors; empty, ``warning`` is ``NOT_ANCHORED``.
    """
    d = Path(path)
    archives = list(archives)
    known = [(n, _read_checkpoint_text(n, f"known checkpoint {i}")) for i, n in enumerate(known_checkpoints)]
    manifest, bundled, bundled_cosigner = _read_gateway_manifest(d, cosigner_key)
    live = list(gateway_checkpoints) if gateway_cosigner is not None else []
    witnessed = ([(n, bundled_cosigner, f"{GATEWAY_MANIFEST} checkpoint {i}") for i, n in enumerate(bundled)]
                 + [(n, gateway_cosigner, f"the gateway's checkpoint {i}") for i, n in enumerate(live)])
    if not archives:  # the gateway's checkpoints of entries archived away can only be checked with the archives
        archived = _read_archived(d)
        start = archived["first"] if archived else 0
        witnessed = [w for w in witnessed if _read_checkpoint_text(w[0], w[2]).size >= start]
    names = {len(known) + i: what for i, (_n, _key, what) in enumerate(witnessed)}
    known += [(n, _read_checkpoint_text(n, what)) for n, _key, what in witnessed]
    extras = list(extra_public_keys)
    trusted = {key_id(k): k for k in trusted_keys} if trusted_keys is not None else None
    stream: _Stream | None = None
    for archive in archives:
        _, stream = _verify_dir(Path(archive), trusted, extras, known, stream)
    report, stream = _verify_dir(d, trusted, extras, known, stream)
    chain, count = stream.chain, stream.chain.seq
    first = report.pop("_first")
    unchecked = [k for _, k in known if k.size < first]
    if unchecked:
        raise AuditError(None, f"a known checkpoint covers {unchecked[0].size} entries, but this export starts at "
                               f"seq {first}: pass the archives that hold seq 0..{first - 1} (--archive DIR)")
    _check_known(known, chain, stream.roots, count, chain.origin or report["origin"], names)
    for note_, cosigner, what in witnessed:
        _check_cosigned(note_, cosigner, what)
    anchored_by = [label for label, anchored in (
        (trusted_label, trusted is not None),
        (f"{len(bundled)} gateway cosignatures under the pinned cosigner key", cosigner_key is not None and bundled),
        ("the gateway's live cosigned checkpoints", bool(live)),
    ) if anchored]
    report["known_checkpoints"] = len(known) - len(witnessed)
    report["gateway_checkpoints"] = len(witnessed)
    report["gateway_manifest"] = manifest
    report["anchored_by"] = anchored_by
    if not anchored_by:
        report["warning"] = NOT_ANCHORED
    report["archives"] = stream.dirs - 1
    return report


def _read_archived(d: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((d / ARCHIVED).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuditError(None, f"{ARCHIVED}: not valid JSON: {exc}") from None
    fields = {"first": int, "prev": str, "root": str, "frontier": list, "archive": str, "manifest_sha256": str}
    if not isinstance(doc, dict) or any(not isinstance(doc.get(k), t) for k, t in fields.items()):
        raise AuditError(None, f"{ARCHIVED} must hold {', '.join(fields)}")
    hexes = [doc["prev"], doc["root"], *doc["frontier"]]
    if not all(isinstance(h, str) and _HEX32.match(h) for h in hexes) or doc["first"] < 1:
        raise AuditError(None, f"{ARCHIVED} has a malformed field")
    return doc


def _start(d: Path, stream: _Stream | None, trusted: dict[str, bytes] | None,
           available: dict[str, bytes], targets: set[int]) -> tuple[_Stream, int]:
    """The stream this directory continues, checked against its ``archived.json``; (stream, first seq)."""
    archived = _read_archived(d)
    if stream is None:
        stream = _Stream(_Chain(available, trusted), targets)
        if archived is not None:
            stream.chain.resume(archived["first"], archived["prev"])
            try:
                stream.frontier = resume_frontier(archived["first"], [bytes.fromhex(h) for h in archived["frontier"]])
            except ValueError as exc:
                raise AuditError(None, f"{ARCHIVED}: {exc}") from None
            if stream.frontier.root().hex() != archived["root"]:
                raise AuditError(None, f"{ARCHIVED}: the compact range does not give its root")
            if stream.frontier.size in targets:
                stream.roots[stream.frontier.size] = stream.frontier.root()
        stream.dirs += 1
        return stream, archived["first"] if archived else 0
    chain, frontier = stream.chain, stream.frontier
    if archived is None:
        raise AuditError(None, f"{d} starts at seq 0 but follows an archive that ends at seq {chain.seq - 1}: "
                               "give the archives oldest first, and the export last")
    if archived["first"] != chain.seq or archived["prev"] != chain.prev:
        raise AuditError(chain.seq, f"{d} starts at seq {archived['first']} (after hash {archived['prev']}) but the "
                                    f"archive before it ends at seq {chain.seq - 1} with hash {chain.prev}: "
                                    "these directories do not continue each other (missing or foreign archive)")
    if archived["frontier"] != [h.hex() for h in frontier_hashes(frontier)] \
            or frontier_root(frontier_hashes(frontier)).hex() != archived["root"]:
        raise AuditError(chain.seq, f"{d}: its {ARCHIVED} compact range differs from the archive's Merkle tree")
    chain.available.update(available)
    stream.dirs += 1
    return stream, archived["first"]


def _verify_dir(d: Path, trusted: dict[str, bytes] | None, extras: list[bytes],
                known: list[tuple[str | bytes, Checkpoint]],
                stream: _Stream | None) -> tuple[dict[str, Any], _Stream]:
    """One directory of ``verify_audit`` (an archive or the export), continuing ``stream``."""
    current, available = _read_keys(d)
    for extra in extras:
        available[key_id(extra)] = extra
    try:
        note = (d / CHECKPOINT).read_bytes()
    except FileNotFoundError:
        raise AuditError(None, f"{CHECKPOINT} is missing") from None
    cp = _read_checkpoint_text(note, CHECKPOINT)
    proofs = _load_proofs(d)
    stream, first = _start(d, stream, trusted, available, {cp.size} | {k.size for _, k in known})
    stream.targets.add(cp.size)
    if first == cp.size:
        stream.roots[cp.size] = stream.frontier.root()
    captured: dict[int, tuple[bytes, str, bytes, bytes]] = {}
    frontier, chain, roots = stream.frontier, stream.chain, stream.roots
    time_order, findings = stream.time_order, stream.findings
    for _lineno, e in _iter_rows(d / ENTRIES):
        parsed = chain.check(e)
        if (backwards := time_order.see(e.seq, parsed.recorded_at)) is not None:
            findings.append(backwards.as_dict())
        leaf = leaf_hash(e.entry)
        frontier.append(leaf)
        if frontier.size in stream.targets:
            roots[frontier.size] = frontier.root()
        if e.seq in proofs:
            captured[e.seq] = (leaf, e.hash, e.signature, chain.kids[e.kid])
    count = chain.seq
    origin = chain.origin

    # The checkpoint: signed by the key current at its size, over these entries.
    signers = chain.signer_keys(cp.size)
    signed, signer = _open_with(note, cp.origin, signers, CHECKPOINT)
    if current != signers[signer]:
        raise AuditError(None, f"{KEY_PEM} (kid {key_id(current)}) is not the key that signed {CHECKPOINT} "
                               f"(kid {signer})")
    if origin is not None and signed.origin != origin:
        raise AuditError(None, f"{CHECKPOINT} is for origin {signed.origin!r}, the entries for {origin!r}")
    if signed.size > count:
        raise AuditError(count, f"missing: the export ends after {count} entries but the signed checkpoint "
                                f"covers {signed.size} (entries were deleted from the end, or truncated)")
    if signed.size < first or roots.get(signed.size) != signed.root:
        raise AuditError(None, f"the Merkle root of entries 0..{signed.size - 1} does not match the signed "
                               f"{CHECKPOINT}: the checkpoint belongs to another history, or the entries "
                               "were rewritten or forked from the history it signed")
    if count > signed.size:
        raise AuditError(signed.size, f"entries continue past the signed {CHECKPOINT} (tree size {signed.size}): "
                                      "the checkpoint is older than the entries (replayed) or rows were appended")
    _check_openssl_files(d, note, signed, signers[signer])
    for s, doc in proofs.items():
        _check_proof(d, s, doc, captured.get(s), signed)
    archived = _read_archived(d)
    report: dict[str, Any] = {
        "ok": True,
        "entries": count,
        "first": first,
        "origin": signed.origin,
        "tree_size": signed.size,
        "root": signed.root.hex(),
        "kid": signer,
        "kids": sorted(chain.kids),
        "proofs": len(proofs),
        "archived_in": archived["archive"] if archived and stream.dirs == 1 else None,
        "archive_manifest_sha256": archived["manifest_sha256"] if archived and stream.dirs == 1 else None,
        "_first": first if stream.dirs == 1 else 0,
        "findings": findings,
    }
    return report, stream


def _read_gateway_manifest(d: Path, pinned: tuple[str, bytes] | None
                           ) -> tuple[dict[str, Any] | None, list[str], tuple[str, bytes] | None]:
    """(summary of ``GATEWAY_MANIFEST`` for the report, its cosigned notes, the key to check them with).

    Absent (an export from before it existed, or ``--no-gateway``) is fine and said in the report."""
    path = d / GATEWAY_MANIFEST
    if not path.exists():
        return None, [], pinned
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuditError(None, f"{GATEWAY_MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("fetched"), bool):
        raise AuditError(None, f"{GATEWAY_MANIFEST} must be an object with a boolean 'fetched'")
    summary = {"fetched": doc["fetched"], "url": doc.get("url"), "reason": doc.get("reason")}
    rows = doc.get("checkpoints") or []
    if not doc["fetched"] or not rows:
        return summary, [], pinned
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("cosigned_checkpoint"), str)
                                             for r in rows):
        raise AuditError(None, f"{GATEWAY_MANIFEST}: checkpoints must be objects with a cosigned_checkpoint string")
    from shared.ledger.checkpoint import COSIGNATURE_TYPE, parse_vkey

    try:
        named = parse_vkey(str((doc.get("cosigner") or {}).get("vkey")), COSIGNATURE_TYPE)
    except ValueError as exc:
        raise AuditError(None, f"{GATEWAY_MANIFEST}: the cosigner's vkey is malformed: {exc}") from None
    if pinned is not None and named != pinned:
        raise AuditError(None, f"{GATEWAY_MANIFEST} names cosigner {named[0]!r} with another key than the pinned "
                               f"--cosigner-key ({pinned[0]!r}): these are not that gateway's cosignatures")
    summary["cosigner"] = named[0]
    return summary, [r["cosigned_checkpoint"] for r in rows], pinned or named


def _check_cosigned(note: str | bytes, cosigner: tuple[str, bytes] | None, what: str) -> None:
    from shared.ledger.checkpoint import verified_cosignatures

    if cosigner is None:
        raise AuditError(None, f"{what}: no cosigner key to check its cosignature with")
    name, public = cosigner
    try:
        stamps = verified_cosignatures(note, {name: public})
    except (NoteError, CheckpointError) as exc:
        raise AuditError(None, f"{what}: the cosignature of {name} does not verify: {exc}") from None
    if name not in stamps:
        raise AuditError(None, f"{what} carries no cosignature of {name}")


def _open_with(note: bytes | str, origin: str, keys: Mapping[str, bytes], what: str) -> tuple[Checkpoint, str]:
    """Open a signed checkpoint with whichever of ``keys`` signed it: (checkpoint, kid)."""
    error: Exception | None = None
    for kid, public in keys.items():
        try:
            return open_checkpoint(note, {origin: public})[0], kid
        except (NoteError, CheckpointError) as exc:
            error = exc
            if "does not verify" in str(exc):
                break
    reason = error or "no key of the ledger is current at its size"
    raise AuditError(None, f"{what}: {reason} (keys current at its size: {', '.join(sorted(keys)) or 'none'})")


def _check_openssl_files(d: Path, note: bytes, cp: Checkpoint, public: bytes) -> None:
    body, sig = d / CHECKPOINT_BODY, d / CHECKPOINT_SIG
    if body.exists() and body.read_bytes() != cp.text().encode("utf-8"):
        raise AuditError(None, f"{CHECKPOINT_BODY} differs from the text of {CHECKPOINT}")
    if sig.exists() and sig.read_bytes() != _signature_by(note.decode("utf-8"), cp.origin, public):
        raise AuditError(None, f"{CHECKPOINT_SIG} is not the signature in {CHECKPOINT}")


def _check_proof(d: Path, seq: int, doc: dict[str, Any], got: tuple[bytes, str, bytes, bytes] | None,
                 cp: Checkpoint) -> None:
    name = f"{PROOFS}/{seq}.json"
    if got is None:
        raise AuditError(seq, f"{name} is for an entry the export does not contain")
    leaf, ehash, signature, public = got
    if doc["tree_size"] != cp.size or doc["root"] != cp.root.hex():
        raise AuditError(seq, f"{name} is for tree size {doc['tree_size']} / root {doc['root']}, "
                              f"not the signed checkpoint's {cp.size} / {cp.root.hex()}")
    if doc["leaf_hash"] != leaf.hex():
        raise AuditError(seq, f"{name} has leaf hash {doc['leaf_hash']}, the entry's is {leaf.hex()}")
    if not verify_inclusion(leaf, seq, cp.size, [bytes.fromhex(p) for p in doc["proof"]], cp.root):
        raise AuditError(seq, f"{name}: the inclusion proof does not lead to the checkpoint's root")
    entry_file, sig_file = d / PROOFS / f"{seq}.entry", d / PROOFS / f"{seq}.sig"
    if entry_file.exists() and entry_hash(entry_file.read_bytes()) != ehash:
        raise AuditError(seq, f"{PROOFS}/{seq}.entry differs from the entry in {ENTRIES}")
    if sig_file.exists() and sig_file.read_bytes() != signature:
        raise AuditError(seq, f"{PROOFS}/{seq}.sig differs from the signature in {ENTRIES}")
    pem_file = d / PROOFS / f"{seq}.pem"
    if pem_file.exists() and _read_pem(pem_file, f"{PROOFS}/{seq}.pem") != public:
        raise AuditError(seq, f"{PROOFS}/{seq}.pem is not the key that signed the entry")


def _check_known(known: list[tuple[str | bytes, Checkpoint]], chain: _Chain, roots: dict[int, bytes],
                 count: int, origin: str, names: Mapping[int, str] | None = None) -> None:
    """Each checkpoint the auditor already holds must be a prefix of the exported history.

    ``names``: what to call the i-th one in a finding (default "known checkpoint i")."""
    matched = 0
    for i, (note, k) in sorted(enumerate(known), key=lambda item: item[1][1].size):
        name = (names or {}).get(i, f"known checkpoint {i}")
        _open_with(note, k.origin, chain.signer_keys(k.size) if k.size <= count else chain.signer_keys(count),
                   f"{name} (size {k.size})")
        if k.origin != origin:
            raise AuditError(None, f"{name} is for origin {k.origin!r}, the export for {origin!r}")
        if k.size > count:
            raise AuditError(count, f"the export holds {count} entries but a known checkpoint covers {k.size}: "
                                    "the ledger was rolled back (restored backup, snapshot) or truncated")
        if roots[k.size] != k.root:
            raise AuditError(matched, f"forked history: the entries do not match the known checkpoint of size "
                                      f"{k.size}; they match up to size {matched}, so the fork lies in seq "
                                      f"{matched}..{k.size - 1}")
        matched = k.size
