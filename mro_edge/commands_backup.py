"""`mro-edge backup` and `mro-edge restore`: a verified hot copy of one box, and putting it on a fresh one.

backup --out DIR             while the box runs: every LMDB store (compacted copy from one read
                             transaction each), keys, broker credentials, uplink token, the
                             configuration in use; a manifest (sizes, SHA-256, entry counts, ledger
                             head and root); then the copy is verified as `restore` would
restore DIR [--data-dir D]   verify DIR again, refuse a data directory that holds stores, copy
                             everything into place with its modes, say what comes next

Layout of DIR: ``manifest.json``, ``data/`` (the data directory: ``data/<store>/data.mdb``,
``data/keys/``, ``data/broker/``, ``data/uplink/token``, ...), ``config/edge.toml`` and
``config/registries/``.

The stores are copied one after the other, so the copy is consistent per store, and the order
makes the set safe to restore: upstream stages before downstream ones (a store copied later
holds at least what an earlier one had handed on; what an upstream copy still owes is
redelivered and deduplicated), ``keys/checkpoint.latest`` before the ledger, the uplink
(acknowledged count) before the ledger, so the restored sign service's guard
(services/sign/guard.py) finds the ledger at or ahead of both.

A restore of an OLDER backup gives a ledger behind what the gateway holds. The box's own
witnesses (checkpoint.latest, acknowledged count) come from the same backup and cannot tell, so
`restore` asks the gateway for its head and refuses when the gateway holds entries the backup
lacks (`--no-gateway-check` skips this, for a box whose gateway is unreachable, knowingly; the
README says what an older backup restored that way leads to).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec

from shared.runtime.config import DEFAULT_CONFIG, Config

FORMAT = "mro-edge-backup/1"
MANIFEST = "manifest.json"
DATA = "data"
CONFIG = "config"
# never copied: lock files, logs and what a running box writes about itself
SKIP_NAMES = {"lock.mdb", ".lock", "run.json", "logs"}
SKIP_SUFFIXES = (".lock", ".log", ".pid", "-wal", "-shm", ".partial")
# store copy order (see the module docstring); stores not named here go between
FIRST = ("spool", "ingest", "validate")
LAST = ("uplink", "sign")
# every file in these is a secret (but public keys and certificates): 0600, directory 0700
PRIVATE = {"keys", "broker", "secrets", "hopkeys", "tls"}


class BackupError(Exception):
    """The backup cannot be taken, or does not verify; the message says what and what to do."""


def _user_error(message: str) -> Exception:
    from mro_edge.cli import UserError

    return UserError(message)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _skipped(path: Path) -> bool:
    return path.name in SKIP_NAMES or path.name.endswith(SKIP_SUFFIXES) or path.name.startswith("mosquitto")


def _store_dirs(data: Path) -> list[Path]:
    """Every LMDB environment directly under the data directory, in copy order."""
    found = sorted(p.parent for p in data.glob("*/data.mdb"))
    rank = {name: i for i, name in enumerate(FIRST)} | {name: 100 + i for i, name in enumerate(LAST)}
    return sorted(found, key=lambda p: (rank.get(p.name, 50), p.name))


def _config_file() -> Path:
    return Path(os.environ.get("MRO_CONFIG") or DEFAULT_CONFIG)


def _registries_dir(config: Config) -> Path:
    return Path(config.compliance.registries_dir) if config.compliance.registries_dir \
        else DEFAULT_CONFIG.parent / "registries"


# -- backup ----------------------------------------------------------------------------------------

def take_backup(config: Config, out: Path) -> dict[str, Any]:
    """Copy the running box into the empty directory `out`, write the manifest, verify it."""
    from shared.runtime.store import Store, StoreError, table_counts

    data = config.data_path
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupError(f"{out} exists and is not empty: give --out a new or empty directory "
                          "(a backup never overwrites another)")
    if out.resolve().is_relative_to(data.resolve()):
        raise BackupError(f"{out} is inside the data directory {data.resolve()}: write the backup elsewhere "
                          "(another disk, ideally)")
    if not (data / "sign" / "data.mdb").exists():
        raise BackupError(f"no ledger under {data.resolve()}: is MRO_DATA_DIR the box's data directory?")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = out / DATA
    target.mkdir(mode=0o700)
    stores = _store_dirs(data)
    store_names = {p.name for p in stores}
    # the files first (keys/checkpoint.latest before the ledger), then the stores in order
    for path in sorted(data.rglob("*")):
        rel = path.relative_to(data)
        if any(_skipped(Path(part)) for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        if rel.parts[0] in store_names and path.name == "data.mdb":
            continue
        if path.suffix == ".db" and _is_sqlite(path):
            _copy_sqlite(path, target / rel)
        else:
            _copy_file(path, target / rel, _mode_for(rel, path))
    counts: dict[str, dict[str, int]] = {}
    for path in stores:
        try:
            source = Store(path, (), readonly=True)
        except StoreError as exc:
            raise BackupError(str(exc)) from None
        try:
            source.copy_to(target / path.name)
        finally:
            source.close()
    config_out = out / CONFIG
    config_out.mkdir(mode=0o700)
    if _config_file().exists():
        _copy_file(_config_file(), config_out / "edge.toml", 0o644)
    if _registries_dir(config).is_dir():
        shutil.copytree(_registries_dir(config), config_out / "registries")
    for path in stores:
        counts[path.name] = table_counts(target / path.name)
    manifest = {
        "format": FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mro_edge_version": metadata.version("mro-edge"),
        "station": config.station,
        "source_data_dir": str(data.resolve()),
        "stores": counts,
        "ledger": _ledger_summary(target, config),
        "files": _file_list(out),
    }
    (out / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
    os.chmod(out / MANIFEST, 0o600)
    verify_backup(out)
    return manifest


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _copy_sqlite(source: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database (the local reference gateway's) by its backup API."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    os.chmod(dest, 0o600)


def _mode_for(rel: Path, path: Path) -> int:
    """Secrets (everything under keys/ and broker/ but public keys and checkpoints) 0600; other
    files keep their owner/read bits, never more than 0644."""
    public = path.name.endswith((".pem", ".pub")) or path.name.startswith("checkpoint")
    if rel.parts[0] in PRIVATE and not public:
        return 0o600
    return stat.S_IMODE(path.stat().st_mode) & 0o644 or 0o600


def _copy_file(source: Path, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dest.parent, 0o700)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(source.read_bytes())
    os.chmod(dest, mode)


def _file_list(root: Path) -> list[dict[str, Any]]:
    return [{"path": str(p.relative_to(root)), "size": p.stat().st_size, "sha256": _sha256(p),
             "mode": f"{stat.S_IMODE(p.stat().st_mode):04o}"}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]


def _ledger_summary(data: Path, config: Config) -> dict[str, Any]:
    """Size, head and stored Merkle root of the ledger copy (read from a scratch copy: opening
    an LMDB environment writes its lock file, and the backup stays as written)."""
    from shared.ledger.store import LedgerReader

    with tempfile.TemporaryDirectory(prefix="mro-backup-") as scratch:
        shutil.copy2(data / "sign" / "data.mdb", Path(scratch) / "data.mdb")
        with LedgerReader(Path(scratch)) as reader, reader.snapshot() as view:
            head = view.head()
            tree = view.tree()
            newest = view.newest_checkpoint()
            return {"size": view.size(), "head_seq": head.seq if head else -1,
                    "head_hash": head.hash if head else None,
                    "root": tree.root().hex() if tree is not None and tree.size() else None,
                    "checkpoint_size": newest[0] if newest else None}


# -- verification ----------------------------------------------------------------------------------

def read_manifest(backup: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((backup / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{backup} has no {MANIFEST}: not an mro-edge backup (or an unfinished one)") from None
    except ValueError as exc:
        raise BackupError(f"{backup / MANIFEST} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{backup / MANIFEST} is not a {FORMAT} manifest")
    return manifest


def verify_backup(backup: Path) -> dict[str, Any]:
    """Every listed file is there with its size and SHA-256 and nothing else was added; every store
    opens and holds the manifest's entry counts; the ledger passes the audit (chain, signatures,
    Merkle root against the stored checkpoints and keys/checkpoint.latest)."""
    from shared.ledger.audit import AuditError, export_audit, verify_audit
    from shared.runtime.config import load_config
    from shared.runtime.store import table_counts

    manifest = read_manifest(backup)
    listed = {f["path"]: f for f in manifest["files"]}
    for rel, expected in listed.items():
        path = backup / rel
        if not path.is_file():
            raise BackupError(f"{rel} is missing from the backup {backup}")
        if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            raise BackupError(f"{rel} in {backup} differs from the manifest (size or SHA-256): the backup "
                              "is damaged or was changed; use another backup")
    extra = [str(p.relative_to(backup)) for p in backup.rglob("*")
             if p.is_file() and p.name != MANIFEST and str(p.relative_to(backup)) not in listed]
    if extra:
        raise BackupError(f"{backup} holds files the manifest does not list: {', '.join(sorted(extra)[:5])}")
    with tempfile.TemporaryDirectory(prefix="mro-verify-") as scratch:
        data = Path(scratch) / DATA
        shutil.copytree(backup / DATA, data)
        for name, counts in manifest["stores"].items():
            found = table_counts(data / name)
            if found != counts:
                raise BackupError(f"store {name} in {backup} holds {found}, the manifest says {counts}")
        config = msgspec.structs.replace(load_config(env={}), station=manifest["station"], data_dir=str(data))
        try:
            summary = export_audit(config, Path(scratch) / "audit")
            report = verify_audit(Path(scratch) / "audit")
        except (AuditError, FileExistsError, ValueError) as exc:
            raise BackupError(f"the ledger in {backup} does not verify: {exc}") from None
    ledger = manifest["ledger"]
    if summary["entries"] != ledger["size"] or (ledger["root"] and summary["root"] != ledger["root"]):
        raise BackupError(f"the ledger in {backup} holds {summary['entries']} entries with root {summary['root']}, "
                          f"the manifest says {ledger['size']} with root {ledger['root']}")
    return {"manifest": manifest, "audit": report}


# -- restore ---------------------------------------------------------------------------------------

def _holds_state(data: Path, backup_data: Path) -> list[str]:
    """What in `data` a restore would overwrite: stores, and any file the backup holds too."""
    if not data.exists():
        return []
    found = {str(p.parent.relative_to(data)) for p in data.glob("*/data.mdb")}
    found |= {str(p.relative_to(backup_data)) for p in backup_data.rglob("*")
              if p.is_file() and (data / p.relative_to(backup_data)).exists()}
    return sorted(found)


def _gateway_head(config: Config, data: Path) -> int | None:
    """The seq the gateway holds up to (-1: none), asked with the backup's token; None if unreachable."""
    from services.uplink.client import GatewayClient, GatewayError, GatewayUnavailable

    token_file = data / "uplink" / "token"
    token = config.link.token or (token_file.read_text().strip() if token_file.exists() else "")
    client = GatewayClient(config.link, token, timeout_s=config.uplink.request_timeout_s)
    try:
        return client.head().seq
    except (GatewayUnavailable, GatewayError):
        return None
    finally:
        client.close()


def restore_backup(config: Config, backup: Path, data: Path, *, check_gateway: bool = True) -> dict[str, Any]:
    """Verify `backup`, refuse a data directory with stores, refuse a backup older than what the
    gateway holds, then copy `data/` into place with its modes."""
    checked = verify_backup(backup)
    manifest = checked["manifest"]
    held = _holds_state(data, backup / DATA)
    if held:
        raise BackupError(
            f"{data} already holds {', '.join(held)}: restore onto a fresh box or an empty --data-dir; to "
            f"replace this box's state, stop mro-edge and move {data} aside first (nothing was changed)")
    ledger = manifest["ledger"]
    gateway = None
    if check_gateway:
        gateway = _gateway_head(config, backup / DATA)
        if gateway is None:
            raise BackupError(
                f"cannot ask the gateway at {config.link.gateway_url} for its head, so cannot tell whether this "
                "backup is older than what it already holds (a restored older ledger would fork from it): "
                "make the gateway reachable (MRO_LINK_GATEWAY_URL), or pass --no-gateway-check if you know "
                "it holds nothing past this backup")
        if gateway > ledger["head_seq"]:
            raise BackupError(
                f"the gateway holds the ledger up to seq {gateway} but this backup only up to seq "
                f"{ledger['head_seq']}: it is older than what was sent, and the box would sign a different "
                "history from there. Restore a newer backup (nothing was changed)")
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    modes = {f["path"]: int(f["mode"], 8) for f in manifest["files"]}
    for source in sorted((backup / DATA).rglob("*")):
        if not source.is_file():
            continue
        rel = source.relative_to(backup)
        dest = data / source.relative_to(backup / DATA)
        _copy_file(source, dest, modes.get(str(rel), 0o600))
    return {"manifest": manifest, "gateway_head": gateway, "data_dir": str(data.resolve())}


# -- the commands ----------------------------------------------------------------------------------

def cmd_backup(config: Config, args) -> int:
    import lmdb

    out = Path(args.out)
    try:
        manifest = take_backup(config, out)
    except (OSError, lmdb.Error) as exc:
        raise _user_error(f"the backup into {out} failed ({exc}): it is incomplete; remove it, make room "
                          "or fix the permission, and run backup again") from None
    except BackupError as exc:
        if (out / MANIFEST).exists():
            raise _user_error(f"the backup in {out} does NOT verify; do not keep it: {exc}") from None
        raise _user_error(str(exc)) from None
    ledger = manifest["ledger"]
    print(f"backup of {manifest['station']} written to {out} and verified")
    print(f"  stores: {', '.join(f'{n} ({sum(c.values())} rows)' for n, c in manifest['stores'].items())}")
    print(f"  ledger: {ledger['size']} entries, head seq {ledger['head_seq']}, root {ledger['root']}")
    print(f"  files: {len(manifest['files'])}, manifest {out / MANIFEST}")
    print("  it holds private keys and broker credentials: keep it as safe as the box itself")
    return 0


def cmd_restore(config: Config, args) -> int:
    backup = Path(args.dir)
    data = Path(args.data_dir) if args.data_dir else config.data_path
    if args.data_dir:
        config = msgspec.structs.replace(config, data_dir=str(data))
    try:
        result = restore_backup(config, backup, data, check_gateway=not args.no_gateway_check)
    except BackupError as exc:
        raise _user_error(str(exc)) from None
    except OSError as exc:
        raise _user_error(f"the restore into {data} failed ({exc}): it is incomplete; move {data} aside, "
                          "make room or fix the permission, and run restore again") from None
    manifest = result["manifest"]
    ledger = manifest["ledger"]
    print(f"restored the backup of {manifest['station']} taken {manifest['created_at']} into {result['data_dir']}")
    print(f"  stores: {', '.join(manifest['stores'])}; ledger {ledger['size']} entries, head seq {ledger['head_seq']}")
    if result["gateway_head"] is not None:
        print(f"  the gateway holds up to seq {result['gateway_head']}: the uplink resumes from there")
    else:
        print("  WARNING: the gateway was not asked (--no-gateway-check). If it holds more than seq "
              f"{ledger['head_seq']}, this backup is older than what was sent: do not start the box, restore "
              "a newer backup (README: Backup, restore, store growth)")
    print("next:")
    print(f"  1. use the configuration of the backup ({backup / CONFIG / 'edge.toml'}, registries beside it):")
    print(f"     MRO_CONFIG={backup / CONFIG / 'edge.toml'}, with data_dir = {result['data_dir']}")
    print("  2. start the box (mro-edge run): sign checks the ledger against keys/checkpoint.latest and the")
    print("     uplink's acknowledged count before it appends; the chain continues from the restored head")
    print("  3. records devices sent after the backup was taken and never saw `recorded` for are sent again")
    print("     by the devices; check `mro-edge status` and `mro-edge audit export` / `audit verify`")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    backup = subparsers.add_parser("backup", help="a verified hot copy of every store, the keys and the configuration")
    backup.add_argument("--out", required=True, help="a new (or empty) directory")
    backup.set_defaults(func=cmd_backup)
    restore = subparsers.add_parser("restore", help="verify a backup and put it in place on a fresh box")
    restore.add_argument("dir", help="a directory written by mro-edge backup")
    restore.add_argument("--data-dir", help="where to restore (default: the configured data_dir); must hold no stores")
    restore.add_argument("--no-gateway-check", action="store_true",
                         help="do not ask the gateway whether it holds more than the backup (it is unreachable)")
    restore.set_defaults(func=cmd_restore)
