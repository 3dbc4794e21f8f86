"""`mro-edge keys ...` and `mro-edge audit ...`: the ledger's keys and its audit exports.

keys generate       create the ledger key (refuses to overwrite one)
keys show           current key, pending rotation, retired keys, rotations in the ledger, last checkpoint
keys rotate         stage a new key; the sign service appends the signed rotation entry and switches
keys export-public  the current public key as PEM (what `mro-edge gateway register-edge` takes)
audit export        entries, signatures, checkpoint, public keys and proofs for an auditor
audit verify        check such a directory; exit 0 only if everything verifies, else name the first bad seq
                    (--archive DIR: with the archives that hold the entries the box no longer has)
ledger archive      move the oldest entries the gateway holds and cosigned to a verified archive
audit consistency   an RFC 9162 consistency proof between two checkpoints (mro_edge.commands_proofs)
audit prove         an RFC 9162 inclusion proof of one entry (mro_edge.commands_proofs)
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
    gateway = _gateway_bundle(config) if not args.no_gateway else {
        "fetched": False, "reason": "not asked (--no-gateway)", "checkpoints": []}
    if not gateway["fetched"]:
        print(f"note: the export bundles no gateway checkpoints: {gateway['reason']}", file=sys.stderr)
    try:
        summary = export_audit(config, args.out, args.seq or (), public_keys=trusted, gateway=gateway)
    except AuditError as exc:
        print(f"audit export FAILED: {exc}", file=sys.stderr)
        print("nothing was exported; the store is not changed or repaired", file=sys.stderr)
        return 1
    except (FileExistsError, ValueError, StoreError) as exc:
        raise _user_error(str(exc)) from None
    if summary["first"]:
        print(f"seq 0..{summary['first'] - 1} were archived to {summary['archive']}: the export holds seq "
              f"{summary['first']}..{summary['entries'] - 1} (archived.json says where it continues the archive)",
              file=sys.stderr)
    print(f"exported {summary['entries']} entries of {summary['origin']} to {summary['out']}: tree size "
          f"{summary['tree_size']}, root {summary['root']}, checkpoint {summary['checkpoint']} by key "
          f"{summary['kid']}; proofs for seqs {', '.join(map(str, summary['proofs'])) or '(none)'}; "
          f"{summary['gateway_checkpoints']} gateway cosigned checkpoints")
    print(f"verify: mro-edge audit verify {summary['out']} --trusted-key FIRST-KEY.pem | --gateway URL   "
          f"(by hand: {summary['out']}/README.txt)", file=sys.stderr)
    return 0


def _gateway_bundle(config: Config) -> dict[str, Any]:
    """The gateway's newest cosigned checkpoints of this box and its cosigner key, for ``gateway.json``;
    when the gateway cannot be asked, ``fetched`` is false and ``reason`` says why (the export goes on)."""
    from services.uplink.client import GatewayError, edge_token
    from shared.ledger.remote import GatewayAudit, GatewayAuditError
    from shared.runtime.clock import utc_now
    from shared.runtime.config import ConfigError

    url = config.link.gateway_url
    try:
        with GatewayAudit(url, edge_token(config), None, ca_file=config.link.ca_file, timeout_s=10.0,
                          allow_token_over_plain_http=config.link.allow_token_over_plain_http) as gw:
            name, _public, vkey = gw.cosigner()
            rows, more = gw.newest_checkpoints()
    except (GatewayAuditError, GatewayError, ConfigError, OSError) as exc:
        return {"fetched": False, "url": url, "reason": f"the gateway could not be asked: {exc}", "checkpoints": []}
    return {"fetched": True, "url": url, "fetched_at": utc_now(), "cosigner": {"name": name, "vkey": vkey},
            "older_left_out": more, "checkpoints": rows}


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
    live: dict[str, Any] = _live_gateway(args) if args.gateway else {}
    if args.gateway and trusted is None:
        trusted = list(live["keys"].values())
    try:
        from shared.ledger.archive import MANIFEST, check_manifest

        for archive in args.archive or ():
            if not Path(archive).is_dir():
                raise _user_error(f"--archive {archive} is not a directory (an archive of 'mro-edge ledger archive')")
            check_manifest(Path(archive))
        if (Path(args.dir) / MANIFEST).exists():
            check_manifest(Path(args.dir))
        report = verify_audit(args.dir, trusted_keys=trusted, known_checkpoints=known, archives=args.archive or (),
                              trusted_label="the gateway's key registry" if args.gateway and not args.trusted_key
                              else "--trusted-key",
                              cosigner_key=_pinned_cosigner(args), gateway_checkpoints=live.get("checkpoints", ()),
                              gateway_cosigner=live.get("cosigner"))
    except AuditError as exc:
        if args.json:
            print(json.dumps({"ok": False, "seq": exc.seq, "reason": exc.reason}))
        elif exc.seq is not None:
            print(f"FAILED at seq {exc.seq}: {exc.reason}")
        else:
            print(f"FAILED: {exc.reason}")
        return 1
    _print_verified(report, as_json=args.json)
    if report["findings"]:
        return 2  # verified, but the ledger's time is not in order
    return 0


def _print_verified(report: dict[str, Any], *, as_json: bool) -> None:
    """What `audit verify` says of a directory that verified: the summary on stdout, archives and
    findings beside it, and on stderr what the auditor must still do (anchor it, fetch checkpoints)."""
    if as_json:
        print(json.dumps(report))
    else:
        print(
            f"OK: {report['entries']} entries of {report['origin']}, hash chain and every signature verified "
            f"(keys {', '.join(report['kids']) or '-'}), Merkle root {report['root']} matches the checkpoint "
            f"signed by {report['kid']}, {report['proofs']} inclusion proofs, "
            f"{report['known_checkpoints']} known checkpoints and {report['gateway_checkpoints']} gateway "
            f"cosigned checkpoints consistent; anchored by {', '.join(report['anchored_by']) or 'nothing'}"
        )
        if report["archives"]:
            print(f"   including {report['archives']} archive(s): seq 0..{report['entries'] - 1} verified as one chain")
        elif report["first"]:
            print(f"   seq 0..{report['first'] - 1} are NOT in this directory: they were archived to "
                  f"{report['archived_in']} (MANIFEST.sha256 {report['archive_manifest_sha256']}); seq "
                  f"{report['first']}.. verified from there on. Pass --archive DIR to verify them together")
        for finding in report["findings"]:
            print(f"FINDING: {finding['message']}")
    manifest = report.get("gateway_manifest")
    if manifest is not None and not manifest["fetched"]:
        print(f"note: the export bundles no gateway checkpoints: {manifest.get('reason')}", file=sys.stderr)
    if "warning" in report:
        bar = "!" * 78
        print(f"{bar}\n{report['warning']}\n(the kid of seq 0's key: {report['kids'][0] if report['kids'] else '-'}; "
              f"compare it with the operator's key registry)\n{bar}", file=sys.stderr)


def _pinned_cosigner(args) -> tuple[str, bytes] | None:
    from shared.ledger.checkpoint import COSIGNATURE_TYPE, parse_vkey

    if not args.cosigner_key:
        return None
    try:
        return parse_vkey(args.cosigner_key.strip(), COSIGNATURE_TYPE)
    except ValueError as exc:
        raise _user_error(f"--cosigner-key: {exc} (give the vkey 'GET /v1/cosigner-key' shows)") from None


def _live_gateway(args) -> dict[str, Any]:
    """From ``--gateway``: the origin's registered keys, the gateway's cosigner (pinned or its own
    word) and its newest cosigned checkpoints up to the export's size."""
    from mro_edge.commands_proofs import TOKEN_ENV, export_origin_and_size, token_from
    from shared.ledger.remote import GatewayAudit, GatewayAuditError

    origin, size = export_origin_and_size(args.dir)
    try:
        with GatewayAudit(args.gateway, token_from(args), origin, ca_file=args.ca_file or "") as gw:
            keys = gw.registered_keys()
            name, public, _vkey = gw.cosigner()
            rows, _more = gw.newest_checkpoints(to_size=size)
    except GatewayAuditError as exc:
        raise _user_error(f"--gateway: {exc} (token: --token-file or ${TOKEN_ENV})") from None
    if not keys:
        raise _user_error(f"--gateway: the gateway has no key registered for {origin!r}")
    pinned = _pinned_cosigner(args)
    return {"keys": keys, "cosigner": pinned or (name, public),
            "checkpoints": [r["cosigned_checkpoint"] for r in rows]}


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
    aexp.add_argument("--no-gateway", action="store_true",
                      help="do not ask the gateway for its cosigned checkpoints (gateway.json says so)")
    aexp.set_defaults(func=cmd_audit_export)
    aver = asub.add_parser("verify", help="exit 0 only if everything verifies; else print the first bad seq "
                                                 "(2: verified, with findings, e.g. recorded_at going backwards)")
    aver.add_argument("dir")
    aver.add_argument("--trusted-key", action="append", metavar="PEM",
                      help="public key obtained out of band; the first entry must be signed by one of them")
    aver.add_argument("--known-checkpoint", action="append", metavar="FILE",
                      help="a signed checkpoint you already hold (older export, gateway receipt): the export "
                           "must extend it (catches rollback and forks)")
    aver.add_argument("--archive", action="append", metavar="DIR",
                      help="an archive of 'mro-edge ledger archive' holding earlier entries (repeat, oldest first): "
                           "verified first, and the directory must continue it")
    aver.add_argument("--gateway", metavar="URL",
                      help="anchor at the gateway: its key registry for the first entry's key, and its cosigned "
                           "checkpoints must be prefixes of the export (token: --token-file or $MRO_AUDIT_TOKEN)")
    aver.add_argument("--token-file", metavar="FILE", help="bearer token for --gateway (an auditor's token)")
    aver.add_argument("--ca-file", metavar="PEM", help="CA of the gateway's TLS certificate")
    aver.add_argument("--cosigner-key", metavar="VKEY",
                      help="the gateway's cosigner vkey you hold: the export's bundled cosignatures must verify "
                           "under it (and then anchor the export)")
    aver.add_argument("--json", action="store_true")
    aver.set_defaults(func=cmd_audit_verify)
    from mro_edge.commands_proofs import register_audit

    register_audit(asub)



# -- ledger archive ---------------------------------------------------------------------------------

ARCHIVE_RECORD_WAIT_S = 30.0


def add_ledger_archive(lsub) -> None:
    """`mro-edge ledger archive` (the `ledger` command group lives in mro_edge.cli)."""
    archive = lsub.add_parser(
        "archive", help="move the oldest entries the gateway holds and cosigned into a verified archive, "
                        "then delete them here (keeps checkpoints, the Merkle frontier and the chain's link)")
    archive.add_argument("--out", required=True, help="a new (or empty) directory for the archive")
    bound = archive.add_mutually_exclusive_group()
    bound.add_argument("--upto", type=int, metavar="N",
                       help="archive at most the first N entries (seq 0..N-1)")
    bound.add_argument("--older-than", type=float, metavar="DAYS",
                       help="archive only entries recorded more than DAYS days ago")
    archive.add_argument("--by", default=None, help="operator name for the ledger (default: the OS user)")
    archive.add_argument("--wait", type=float, default=ARCHIVE_RECORD_WAIT_S,
                         help="seconds to wait for the sign service to record the archival in the ledger")
    archive.set_defaults(func=cmd_ledger_archive)


def cmd_ledger_archive(config: Config, args) -> int:
    import time

    from services.validate.commands import operator_name
    from shared.ledger.archive import ArchiveRefused, archive_ledger
    from shared.ledger.audit import AuditError
    from shared.ledger.store import open_ledger
    from shared.runtime.logs import configure_logging, get_logger
    from shared.runtime.store import StoreError

    configure_logging("ledger-archive", config.station)  # the archival's JSON log lines, on stderr
    if args.upto is not None and args.upto < 1:
        raise _user_error("--upto N needs N >= 1 (the number of entries, seq 0..N-1)")
    if args.older_than is not None and args.older_than < 0:
        raise _user_error("--older-than DAYS needs DAYS >= 0")
    operator = (args.by or operator_name()).strip()[:64]
    if not operator:
        raise _user_error("--by needs a name")
    log = get_logger(correlation_id=None)
    try:
        summary = archive_ledger(config, args.out, operator=operator, upto=args.upto,
                                 older_than_days=args.older_than, log=log)
    except ArchiveRefused as exc:
        log.warning("ledger archive refused", reason=str(exc)[:300], state_transition="LEDGER_ARCHIVE_REFUSED")
        raise _user_error(f"nothing archived: {exc}") from None
    except AuditError as exc:
        log.error("ledger archive failed verification", reason=str(exc)[:300],
                  state_transition="LEDGER_ARCHIVE_REFUSED")
        print(f"ledger archive FAILED: the archive does not verify ({exc}); nothing was deleted and no archive "
              "was kept. Run 'mro-edge audit export --out DIR' to find the first bad seq.", file=sys.stderr)
        return 1
    except StoreError as exc:
        raise _user_error(str(exc)) from None
    print(f"archived seq {summary['first']}..{summary['n'] - 1} to {summary['archive']} (root {summary['root']}, "
          f"MANIFEST.sha256 {summary['manifest_sha256']}); deleted {summary['entries_deleted']} entries and "
          f"{summary['nodes_deleted']} Merkle nodes from the box")
    deadline = time.monotonic() + max(args.wait, 0.0)
    recorded = None
    while True:
        with open_ledger(config) as reader:
            base = reader.archived()
        recorded = base.recorded_seq if base is not None and base.n == summary["n"] else None
        if recorded is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if recorded is not None:
        print(f"the sign service recorded it as ledger entry seq {recorded} (ledger_archived)")
    else:
        print("the sign service records it as a ledger_archived entry as soon as it runs (it is not running, "
              "or did not answer yet): check with 'mro-edge keys show' / 'mro-edge audit export'", file=sys.stderr)
    print(f"keep the archive safe (two places); verify: mro-edge audit verify {summary['archive']}   "
          "(by hand: README.txt in it)", file=sys.stderr)
    return 0
