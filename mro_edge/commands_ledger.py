"""`mro-edge keys ...` and `mro-edge audit ...`: the ledger's keys and its audit exports.

keys generate       create the ledger key (refuses to overwrite one)
keys show           current key, pending rotation, retired keys, rotations in the ledger, last checkpoint
keys rotate         stage a new key; the sign service appends the signed rotation entry and switches
keys export-public  the current public key as PEM (what `mro-edge gateway register-edge` takes)
audit export        entries, signatures, checkpoint, public keys and proofs for an auditor
audit verify        check such a directory; exit 0 only if everything verifies, else name the first bad seq
                    (exit 2: it verifies, with findings such as recorded_at going backwards)
"""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path
from typing import Any

from shared.runtime.config import Config


def _user_error(message: str) -> Exception:
    from mro_edge.cli import UserError

    return UserError(message)


def _key_files(config: Config):
    from shared.ledger.keys import LedgerKeyFiles

    return LedgerKeyFiles(config.data_path / "keys")


def _current(config: Config):
    from shared.ledger.keys import KeyFileError

    files = _key_files(config)
    if not files.current_path.exists():
        raise _user_error(
            f"no ledger key in {files.dir}: run 'mro-edge keys generate', or start the sign service "
            "once (mro-edge run), or check MRO_DATA_DIR"
        )
    try:
        return files.current(create=False)
    except KeyFileError as exc:
        raise _user_error(str(exc)) from None


# -- keys -------------------------------------------------------------------------------------------

def provision_hop_keys(config: Config) -> str:
    """The stages' hop keys (`shared.runtime.hopauth`), made if absent; a line saying what exists."""
    from shared.runtime.hopauth import HopKeyError, HopKeys, ensure_hop_keys

    try:
        made = ensure_hop_keys(config.data_path)
    except HopKeyError as exc:
        raise _user_error(str(exc)) from None
    new = f", new: {', '.join(made)}" if made else ""
    return f"hop keys ready in {HopKeys.of(config.data_path).dir}{new}"


def cmd_keys_hop_init(config: Config, args) -> int:
    config.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    print(provision_hop_keys(config))
    return 0


def cmd_keys_generate(config: Config, args) -> int:
    from shared.ledger.keys import KeyFileError

    try:
        key = _key_files(config).generate()
    except KeyFileError as exc:
        raise _user_error(str(exc)) from None
    print(f"ledger key {key.kid} created in {_key_files(config).current_path} (mode 0600)")
    print("register it at the gateway: mro-edge keys export-public > ledger-key.pem; "
          "mro-edge gateway register-edge ORIGIN ledger-key.pem", file=sys.stderr)
    return 0


def _rotations(config: Config) -> list[dict[str, Any]]:
    """Every key_rotation entry in the ledger (a byte filter first, so a long ledger scans quickly)."""
    from shared.ledger.entry import KEY_ROTATION, parse_entry, parse_rotation
    from shared.ledger.store import iter_entries, open_ledger
    from shared.runtime.store import StoreError

    try:
        store = open_ledger(config)
    except StoreError:
        return []
    marker = f'"type":"{KEY_ROTATION}"'.encode()
    out = []
    try:
        for e in iter_entries(store):
            if marker in e.entry:
                parsed = parse_entry(e.entry)
                if parsed.type == KEY_ROTATION:
                    r = parse_rotation(parsed)
                    out.append({"seq": r.seq, "old_kid": r.old_kid, "new_kid": r.new_kid,
                                "effective_seq": r.effective_seq, "recorded_at": parsed.recorded_at})
    finally:
        store.close()
    return out


def cmd_keys_show(config: Config, args) -> int:
    from shared.ledger.checkpoint import CheckpointError, NoteError, parse_checkpoint, split_note
    from shared.ledger.store import latest_checkpoint_path, read_latest_checkpoint

    files = _key_files(config)
    key = _current(config)
    st = files.current_path.stat()
    pending = files.pending()
    checkpoint = None
    note = read_latest_checkpoint(latest_checkpoint_path(config))
    if note is not None:
        try:
            cp = parse_checkpoint(split_note(note)[0])
            checkpoint = {"origin": cp.origin, "size": cp.size, "root": cp.root.hex()}
        except (NoteError, CheckpointError) as exc:
            checkpoint = {"error": str(exc)}
    info = {
        "kid": key.kid,
        "file": str(files.current_path),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "public_key_pem": key.public_pem(),
        "pending_rotation": pending.kid if pending else None,
        "retired": [k.kid for k in files.retired()],
        "rotations": _rotations(config),
        "latest_checkpoint": checkpoint,
        "origin": config.origin,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"ledger key   {key.kid}  {files.current_path} (mode {info['mode']})")
    if pending:
        print(f"pending      {pending.kid}  {files.next_path}: the sign service switches at its next record")
    for kid in info["retired"]:
        print(f"retired      {kid}")
    for r in info["rotations"]:
        print(f"rotation     seq {r['seq']}: {r['old_kid']} -> {r['new_kid']} from seq {r['effective_seq']} "
              f"({r['recorded_at']})")
    if checkpoint and "size" in checkpoint:
        print(f"checkpoint   {checkpoint['origin']} size {checkpoint['size']} root {checkpoint['root']}")
    sys.stdout.write(key.public_pem())
    return 0


def cmd_keys_rotate(config: Config, args) -> int:
    from shared.ledger.keys import KeyFileError

    old = _current(config)
    try:
        new = _key_files(config).stage_rotation()
    except KeyFileError as exc:
        raise _user_error(str(exc)) from None
    print(f"rotation staged: {old.kid} -> {new.kid} ({_key_files(config).next_path}, mode 0600)")
    print(
        "the sign service appends a key_rotation entry signed by the old key with its next record and signs "
        "everything after it with the new key; the gateway accepts the new key from that entry on. "
        "'mro-edge keys show' shows it pending until then.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_export_public(config: Config, args) -> int:
    if args.next:
        pending = _key_files(config).pending()
        if pending is None:
            raise _user_error("no rotation is pending (mro-edge keys rotate stages one)")
        sys.stdout.write(pending.public_pem())
        return 0
    sys.stdout.write(_current(config).public_pem())
    return 0


# -- audit ------------------------------------------------------------------------------------------

def cmd_audit_export(config: Config, args) -> int:
    from shared.ledger.audit import AuditError, export_audit
    from shared.ledger.keys import KeyFormatError, key_id, public_key_from_pem
    from shared.runtime.store import StoreError

    trusted = None
    if args.trusted_key:
        try:
            publics = [public_key_from_pem(Path(p).read_text()) for p in args.trusted_key]
        except (OSError, KeyFormatError) as exc:
            raise _user_error(f"--trusted-key: {exc}") from None
        trusted = {key_id(p): p for p in publics}
    try:
        summary = export_audit(config, args.out, args.seq or (), public_keys=trusted)
    except AuditError as exc:
        print(f"audit export FAILED: {exc}", file=sys.stderr)
        print("nothing was exported; the store is not changed or repaired", file=sys.stderr)
        return 1
    except (FileExistsError, ValueError, StoreError) as exc:
        raise _user_error(str(exc)) from None
    print(f"exported {summary['entries']} entries of {summary['origin']} to {summary['out']}: tree size "
          f"{summary['tree_size']}, root {summary['root']}, checkpoint {summary['checkpoint']} by key "
          f"{summary['kid']}; proofs for seqs {', '.join(map(str, summary['proofs'])) or '(none)'}")
    print(f"verify: mro-edge audit verify {summary['out']}   (by hand: {summary['out']}/README.txt)",
          file=sys.stderr)
    return 0


def cmd_audit_verify(config: Config, args) -> int:
    from shared.ledger.audit import AuditError, verify_audit
    from shared.ledger.keys import KeyFormatError, public_key_from_pem

    if not Path(args.dir).is_dir():
        raise _user_error(f"{args.dir} is not a directory (an export of 'mro-edge audit export')")
    try:
        trusted = (
            [public_key_from_pem(Path(p).read_text()) for p in args.trusted_key] if args.trusted_key else None
        )
        known = [Path(p).read_bytes() for p in args.known_checkpoint or ()]
    except (OSError, KeyFormatError) as exc:
        raise _user_error(str(exc)) from None
    try:
        report = verify_audit(args.dir, trusted_keys=trusted, known_checkpoints=known)
    except AuditError as exc:
        if args.json:
            print(json.dumps({"ok": False, "seq": exc.seq, "reason": exc.reason}))
        elif exc.seq is not None:
            print(f"FAILED at seq {exc.seq}: {exc.reason}")
        else:
            print(f"FAILED: {exc.reason}")
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"OK: {report['entries']} entries of {report['origin']}, hash chain and every signature verified "
            f"(keys {', '.join(report['kids']) or '-'}), Merkle root {report['root']} matches the checkpoint "
            f"signed by {report['kid']}, {report['proofs']} inclusion proofs, "
            f"{report['known_checkpoints']} known checkpoints consistent"
        )
        for finding in report["findings"]:
            print(f"FINDING: {finding['message']}")
        if trusted is None:
            print("the keys were taken from the export itself: confirm the kid of seq 0's key out of band, "
                  "or pass --trusted-key", file=sys.stderr)
    return 2 if report["findings"] else 0  # verified, but the ledger's time is not in order


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="the ledger signing key: generate, show, rotate, export-public")
    ksub = keys.add_subparsers(dest="action", required=True)
    ksub.add_parser("generate", help="create the ledger key (never overwrites one)").set_defaults(
        func=cmd_keys_generate)
    show = ksub.add_parser("show", help="current and pending key, retired keys, rotations, last checkpoint")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_keys_show)
    ksub.add_parser(
        "rotate", help="stage a new key; the sign service appends the signed rotation and switches"
    ).set_defaults(func=cmd_keys_rotate)
    ksub.add_parser(
        "hop-init", help="each stage's hop key (authenticates its pipeline messages); never replaces one"
    ).set_defaults(func=cmd_keys_hop_init)
    export = ksub.add_parser("export-public", help="public key as PEM (SubjectPublicKeyInfo)")
    export.add_argument("--next", action="store_true", help="the key of the pending rotation instead")
    export.set_defaults(func=cmd_keys_export_public)

    audit = subparsers.add_parser("audit", help="audit exports: everything an auditor needs, and its check")
    asub = audit.add_subparsers(dest="action", required=True)
    aexp = asub.add_parser(
        "export", help="entries, signatures, checkpoint, keys and proofs into a new directory"
    )
    aexp.add_argument("--out", required=True, help="a new (or empty) directory")
    aexp.add_argument("--seq", type=int, nargs="+", action="extend", metavar="N",
                      help="also write per-record files and an inclusion proof for these seqs")
    aexp.add_argument("--trusted-key", action="append", metavar="PEM",
                      help="the key(s) the first entry must be signed by (default: the box's own keys)")
    aexp.set_defaults(func=cmd_audit_export)
    aver = asub.add_parser("verify", help="exit 0 only if everything verifies; else print the first bad seq "
                                                 "(2: verified, with findings, e.g. recorded_at going backwards)")
    aver.add_argument("dir")
    aver.add_argument("--trusted-key", action="append", metavar="PEM",
                      help="public key obtained out of band; the first entry must be signed by one of them")
    aver.add_argument("--known-checkpoint", action="append", metavar="FILE",
                      help="a signed checkpoint you already hold (older export, gateway receipt): the export "
                           "must extend it (catches rollback and forks)")
    aver.add_argument("--json", action="store_true")
    aver.set_defaults(func=cmd_audit_verify)

