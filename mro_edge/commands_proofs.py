"""`mro-edge audit consistency` and `mro-edge audit prove`: RFC 9162 proofs, from the box or the gateway.

audit consistency   a consistency proof between two checkpoints, produced and checked: exit 0 only
                    when the older checkpoint's tree is a prefix of the newer one's
audit prove         an inclusion proof of one entry under a checkpoint, produced and checked

Where things come from: the checkpoints from the files given, else the gateway's cosigned
checkpoints (``--gateway``), else the box's own stored ones; the proof from the gateway
(``--gateway``), else the box's Merkle tree. With ``--gateway`` nothing of the box is needed: an
auditor at headquarters runs these with a read-only token (``mro-edge gateway register-auditor``).
The checkpoints' signatures are checked with the origin's keys (``--trusted-key``, the gateway's
registry, the box's key files), the gateway's cosignatures with ``--cosigner-key`` (else the key
the gateway itself names, which is said), and the proof with our own verifier.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.runtime.config import Config
from shared.runtime.store import StoreError

TOKEN_ENV = "MRO_AUDIT_TOKEN"


def _user_error(message: str) -> Exception:
    from mro_edge.cli import UserError

    return UserError(message)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def token_from(args) -> str:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise _user_error(f"--token-file: {exc}") from None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise _user_error(f"--gateway needs a bearer token: --token-file FILE or {TOKEN_ENV} (an auditor's token "
                          "from 'mro-edge gateway register-auditor NAME', or the edge's own)")
    return token


def export_origin_and_size(directory: str) -> tuple[str, int]:
    """The origin and tree size of an audit export's checkpoint (shape only; verify checks it)."""
    from shared.ledger.checkpoint import CheckpointError, NoteError, parse_checkpoint, split_note

    try:
        cp = parse_checkpoint(split_note((Path(directory) / "checkpoint").read_bytes())[0])
    except (OSError, NoteError, CheckpointError) as exc:
        raise _user_error(f"{directory}/checkpoint: {exc}") from None
    return cp.origin, cp.size


def _origin(config: Config, args) -> str:
    return args.origin or config.origin


@contextmanager
def _gateway(config: Config, args) -> Iterator[Any]:
    from shared.ledger.remote import GatewayAudit

    with GatewayAudit(args.gateway, token_from(args), _origin(config, args),
                      ca_file=args.ca_file or config.link.ca_file,
                      allow_token_over_plain_http=config.link.allow_token_over_plain_http) as gw:
        yield gw


def _trusted(args) -> dict[str, bytes]:
    from shared.ledger.keys import KeyFormatError, key_id, public_key_from_pem

    out: dict[str, bytes] = {}
    for p in args.trusted_key or ():
        try:
            public = public_key_from_pem(Path(p).read_text())
        except (OSError, KeyFormatError) as exc:
            raise _user_error(f"--trusted-key {p}: {exc}") from None
        out[key_id(public)] = public
    return out


def _box_keys(config: Config) -> dict[str, bytes]:
    from shared.ledger.keys import KeyFileError, LedgerKeyFiles

    try:
        return LedgerKeyFiles(config.data_path / "keys").public_keys()
    except KeyFileError:
        return {}


def _origin_keys(config: Config, args, gw) -> tuple[dict[str, bytes], str]:
    """The keys a checkpoint may be signed by, and where they came from (said in the report):
    ``--trusted-key`` (e.g. a rotated-in key from an export's keys/), and the gateway's registry
    with ``--gateway``, else the box's key files."""
    keys = _trusted(args)
    sources = ["--trusted-key"] if keys else []
    if gw is not None:
        keys |= gw.registered_keys()
        sources.append("the gateway's key registry")
    else:
        box = _box_keys(config)
        if box:
            keys |= box
            sources.append("the box's key files")
    return keys, " and ".join(sources) or "nowhere (no key known)"


def _cosigner(args, gw) -> tuple[tuple[str, bytes] | None, str | None]:
    """(name, key) of the gateway's cosigner: --cosigner-key pins it; else the gateway's own word."""
    from shared.ledger.checkpoint import COSIGNATURE_TYPE, parse_vkey

    if args.cosigner_key:
        try:
            name, public = parse_vkey(args.cosigner_key.strip(), COSIGNATURE_TYPE)
        except ValueError as exc:
            raise _user_error(f"--cosigner-key: {exc} (give the vkey 'GET /v1/cosigner-key' shows)") from None
        return (name, public), None
    if gw is None:
        return None, None
    name, public, vkey = gw.cosigner()
    return (name, public), (f"the cosigner key {vkey} was taken from the gateway itself; pin it with "
                            "--cosigner-key to check cosignatures against a key you hold")


def _read_note(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _user_error(f"cannot read checkpoint {path}: {exc}") from None


def _box_checkpoint(config: Config, size: int | None) -> bytes:
    """The box's stored checkpoint of exactly ``size`` entries (None: the newest)."""
    from shared.ledger.store import open_ledger
    from shared.runtime.store import StoreError

    try:
        store = open_ledger(config)
    except StoreError as exc:
        raise _user_error(f"cannot open the box's ledger ({exc}); on another machine use --gateway URL") from None
    try:
        with store.snapshot() as view:
            if size is None:
                newest = view.newest_checkpoint()
                if newest is None:
                    raise _user_error("the box has stored no checkpoint yet (the sign service signs one "
                                      "every few seconds while it runs)")
                return newest[1]
            note = view.checkpoint_at_most(size)
    finally:
        store.close()
    if note is None or _size_of(note) != size:
        nearest = f"; the nearest at or below is of size {_size_of(note)}" if note else ""
        raise _user_error(f"the box holds no checkpoint of size {size}{nearest}")
    return note


def _gateway_checkpoint(gw, size: int | None, *, below: int | None = None) -> bytes:
    """The gateway's cosigned checkpoint of exactly ``size`` entries; with None, its newest one (below
    ``below``, when given). One bounded request: never the whole list."""
    if size is not None:
        row = gw.checkpoint_at(size)
        if row is None:
            raise _user_error(f"the gateway cosigned no checkpoint of size {size} for this origin "
                              "(GET /v1/checkpoints lists them)")
    else:
        rows, _more = gw.newest_checkpoints(to_size=None if below is None else below - 1, limit=1)
        if not rows:
            raise _user_error("the gateway has cosigned no checkpoint of this origin yet" if below is None else
                              "the gateway holds only one cosigned checkpoint of this origin; nothing to prove yet")
        row = rows[-1]
    return str(row["cosigned_checkpoint"]).encode()


def _box_tree_proof(config: Config, kind: str, a: int, b: int) -> list[bytes]:
    from shared.ledger.merkle import MerkleCorruptError
    from shared.ledger.store import open_ledger

    store = open_ledger(config)
    try:
        with store.snapshot() as view:
            tree = view.tree()
            if tree is None:
                raise _user_error("the box's ledger has no Merkle tree table (start the sign service once)")
            try:
                return tree.consistency_proof(a, b) if kind == "consistency" else tree.inclusion_proof(a, b)
            except MerkleCorruptError as exc:
                base = view.archived()
                if base is not None:  # a proof that needs nodes the archival deleted, not damage
                    raise _user_error(f"this proof needs Merkle nodes of seq 0..{base.n - 1}, which were archived to "
                                      f"{base.archive} (mro-edge ledger archive): ask the gateway (--gateway URL) "
                                      "or verify with the archive (mro-edge audit verify --archive)") from None
                raise _user_error(f"the box's Merkle tree is damaged: {exc}") from None
            except ValueError as exc:
                raise _user_error(f"{exc} (the box's tree)") from None
    finally:
        store.close()


def _verified(args, report: dict[str, Any], summary: str) -> int:
    """The answer of a proof that verified: the report as JSON, or `OK: ` and the summary."""
    report["ok"] = True
    print(json.dumps(report) if args.json else f"OK: {summary}")
    return 0


def _fail(args, reason: str, report: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({**report, "ok": False, "reason": reason}))
    else:
        print(f"FAILED: {reason}", file=sys.stderr)
    return 1


def _note(report: dict[str, Any], args, text: str | None) -> None:
    if text:
        report.setdefault("warnings", []).append(text)
        if not args.json:
            print(f"note: {text}", file=sys.stderr)


def cmd_audit_consistency(config: Config, args) -> int:
    from shared.ledger.remote import GatewayAuditError, ProofError, check_checkpoint, check_consistency

    if args.checkpoints and len(args.checkpoints) != 2:
        raise _user_error("give two checkpoint files (older, newer), or none and --first/--second")
    report: dict[str, Any] = {"ok": False}
    try:
        with (_gateway(config, args) if args.gateway else _none()) as gw:
            keys, keys_from = _origin_keys(config, args, gw)
            cosigner, caveat = _cosigner(args, gw)
            report["keys_from"] = keys_from
            if args.checkpoints:
                notes = [_read_note(p) for p in args.checkpoints]
                source = "files"
            elif gw is not None:
                newest = _gateway_checkpoint(gw, args.second)
                first = _gateway_checkpoint(gw, args.first, below=_size_of(newest))
                notes, source = [first, newest], "the gateway's cosigned checkpoints"
            else:
                second = _box_checkpoint(config, args.second)
                first = (_box_checkpoint(config, args.first) if args.first is not None
                         else _box_checkpoint_at_most(config, _size_of(second) - 1))
                notes, source = [first, second], "the box's checkpoints"
            report["checkpoints_from"] = source
            need_cosign = cosigner if (gw is not None and source != "files") or args.cosigner_key else None
            old, new = (check_checkpoint(n, keys, cosigner=need_cosign, what=w)
                        for n, w in zip(notes, ("the older checkpoint", "the newer checkpoint"), strict=True))
            if need_cosign is not None:
                _note(report, args, caveat)
            for checked in (old, new):
                if gw is not None and checked.checkpoint.origin != gw.origin:
                    raise ProofError(f"a checkpoint is of origin {checked.checkpoint.origin!r}, the gateway is "
                                     f"asked about {gw.origin!r} (--origin)")
            a, b = old.checkpoint.size, new.checkpoint.size
            if a > b:
                old, new, a, b = new, old, b, a
            report.update(origin=new.checkpoint.origin, first=a, second=b, first_root=_b64(old.checkpoint.root),
                          second_root=_b64(new.checkpoint.root))
            if a == 0:
                raise ProofError("the older checkpoint is of the empty tree: every tree extends it, there is nothing "
                                 "to prove")
            if a == b:
                proof: list[bytes] = []
            elif gw is not None:
                proof = gw.consistency(a, b)
                report["proof_from"] = "the gateway"
            else:
                proof = _box_tree_proof(config, "consistency", a, b)
                report["proof_from"] = "the box's Merkle tree"
            report["proof"] = [_b64(p) for p in proof]
            check_consistency(old.checkpoint, new.checkpoint, proof)
    except (ProofError, GatewayAuditError) as exc:
        return _fail(args, str(exc), report)
    except StoreError as exc:
        raise _user_error(f"cannot read the box's ledger ({exc}); on another machine use --gateway URL") from None
    return _verified(args, report, f"the checkpoint of size {report['first']} is a prefix of the checkpoint of "
                     f"size {report['second']} ({report['origin']}): both signed by a key from {report['keys_from']}"
                     f"{', cosigned by the gateway' if need_cosign else ''}; consistency proof of {len(proof)} "
                     f"hashes ({report.get('proof_from', 'equal sizes: none needed')}) verified per RFC 9162 "
                     "2.1.4.2")


def _size_of(note: bytes) -> int:
    from shared.ledger.checkpoint import CheckpointError, NoteError, parse_checkpoint, split_note

    try:
        return parse_checkpoint(split_note(note)[0]).size
    except (NoteError, CheckpointError) as exc:
        raise _user_error(f"a checkpoint is malformed: {exc}") from None


def _box_checkpoint_at_most(config: Config, size: int) -> bytes:
    """Default older checkpoint on the box: the newest stored at or below ``size``."""
    from shared.ledger.store import open_ledger

    store = open_ledger(config)
    try:
        with store.snapshot() as view:
            note = view.checkpoint_at_most(size)
    finally:
        store.close()
    if note is None or size < 1:
        raise _user_error("the box holds no checkpoint older than the newest to start from; pass --first")
    return note


@contextmanager
def _none() -> Iterator[None]:
    yield None


def cmd_audit_prove(config: Config, args) -> int:
    from shared.ledger.merkle import leaf_hash
    from shared.ledger.remote import GatewayAuditError, ProofError, check_checkpoint, check_inclusion

    report: dict[str, Any] = {"ok": False, "index": args.seq}
    try:
        with (_gateway(config, args) if args.gateway else _none()) as gw:
            keys, keys_from = _origin_keys(config, args, gw)
            cosigner, caveat = _cosigner(args, gw)
            report["keys_from"] = keys_from
            if args.checkpoint:
                note, from_gateway = _read_note(args.checkpoint), False
            elif gw is not None:
                note, from_gateway = _gateway_checkpoint(gw, args.size), True
            else:
                note, from_gateway = _box_checkpoint(config, args.size), False
            need_cosign = cosigner if from_gateway or args.cosigner_key else None
            cp = check_checkpoint(note, keys, cosigner=need_cosign, what="the checkpoint").checkpoint
            if need_cosign is not None:
                _note(report, args, caveat)
            report.update(origin=cp.origin, tree_size=cp.size, root=_b64(cp.root))
            if gw is not None and cp.origin != gw.origin:
                raise ProofError(f"the checkpoint is of origin {cp.origin!r}, the gateway is asked about "
                                 f"{gw.origin!r} (--origin)")
            if not 0 <= args.seq < cp.size:
                raise ProofError(f"seq {args.seq} is not covered by the checkpoint of size {cp.size}")
            if args.entry:
                leaf = leaf_hash(Path(args.entry).read_bytes())
            else:
                leaf = None
            if gw is not None:
                served_leaf, proof, _body = gw.inclusion(args.seq, cp.size)
                report["proof_from"] = "the gateway"
            else:
                proof = _box_tree_proof(config, "inclusion", args.seq, cp.size)
                served_leaf = _box_leaf(config, args.seq)
                report["proof_from"] = "the box's Merkle tree"
            if leaf is not None and leaf != served_leaf:
                raise ProofError(f"the leaf hash of {args.entry} is {leaf.hex()}, the {report['proof_from']} "
                                 f"holds {served_leaf.hex()} at seq {args.seq}: it is not this record")
            report.update(leaf_hash=_b64(served_leaf), proof=[_b64(p) for p in proof],
                          entry_checked=bool(args.entry))
            check_inclusion(served_leaf, args.seq, cp, proof)
    except OSError as exc:
        raise _user_error(f"--entry: {exc}") from None
    except (ProofError, GatewayAuditError) as exc:
        return _fail(args, str(exc), report)
    except StoreError as exc:
        raise _user_error(f"cannot read the box's ledger ({exc}); on another machine use --gateway URL") from None
    what = f"the record in {args.entry}" if args.entry else f"the leaf hash {served_leaf.hex()}"
    return _verified(args, report, f"seq {args.seq} ({what}) is in the checkpoint of size {cp.size} ({cp.origin}), "
                     f"signed by a key from {keys_from}{', cosigned by the gateway' if need_cosign else ''}; "
                     f"inclusion proof of {len(proof)} hashes ({report['proof_from']}) verified per RFC 9162 "
                     "2.1.3.2")


def _box_leaf(config: Config, seq: int) -> bytes:
    from shared.ledger.store import open_ledger

    store = open_ledger(config)
    try:
        with store.snapshot() as view:
            tree = view.tree()
            if tree is None:
                raise _user_error("the box's ledger has no Merkle tree table")
            return tree.leaf(seq)
    finally:
        store.close()


def _gateway_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", metavar="URL", help="fetch checkpoints and the proof from this gateway (no box "
                                                     "needed); token from --token-file or $" + TOKEN_ENV)
    p.add_argument("--token-file", metavar="FILE", help="the bearer token (auditor's or the edge's)")
    p.add_argument("--origin", help="the ledger origin (default: this box's)")
    p.add_argument("--ca-file", metavar="PEM", help="CA of the gateway's TLS certificate (default: [link] ca_file)")
    p.add_argument("--trusted-key", action="append", metavar="PEM",
                   help="the origin's public key(s) obtained out of band (default: the gateway's registry, "
                        "else the box's key files)")
    p.add_argument("--cosigner-key", metavar="VKEY",
                   help="the gateway's cosigner vkey you hold (default: the one the gateway names)")
    p.add_argument("--json", action="store_true")


def register_audit(asub: argparse._SubParsersAction) -> None:
    """Add `consistency` and `prove` to `mro-edge audit`."""
    cons = asub.add_parser("consistency", help="produce and check an RFC 9162 consistency proof between two "
                                               "checkpoints; exit 1 if it fails")
    cons.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                      help="two signed checkpoint files (older, newer), e.g. cosigned receipts or exports' "
                           "'checkpoint' (default: --first/--second from the gateway or the box)")
    cons.add_argument("--first", type=int, metavar="M", help="size of the older checkpoint (default: the one "
                                                              "before the newest)")
    cons.add_argument("--second", type=int, metavar="N", help="size of the newer checkpoint (default: the newest)")
    _gateway_options(cons)
    cons.set_defaults(func=cmd_audit_consistency)

    prove = asub.add_parser("prove", help="produce and check an RFC 9162 inclusion proof of one entry; exit 1 "
                                          "if it fails")
    prove.add_argument("seq", type=int, help="the entry's seq (its leaf index)")
    prove.add_argument("--size", type=int, metavar="N", help="the checkpoint's tree size (default: the newest)")
    prove.add_argument("--checkpoint", metavar="FILE", help="a signed checkpoint file to prove against")
    prove.add_argument("--entry", metavar="FILE", help="the record's exact entry bytes: its leaf hash must be the "
                                                       "one proven")
    _gateway_options(prove)
    prove.set_defaults(func=cmd_audit_prove)
