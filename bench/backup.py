"""Backup time per 100,000 ledger entries (issue 12), beside plain copies of the same bytes.

``python -m bench --only backup`` (part of ``make bench``), or ``python -m bench.backup
[--quick] [--entries N]``.

A data directory with a ledger of N entries is built through the sign stage's real handler
(``tests.support.sign.LocalSign``, batches of 1,000, one checkpoint at the end, as the ledger
bench does). Then, in this order:

- ``mro-edge backup --out DIR``, the real command in its own process: the compacting copy of
  every store, the manifest (sizes, SHA-256 of every file), and the verification through the
  audit (chain, every signature, Merkle root against the checkpoint). Its output gives no split,
  so its parts are measured on their own: the interpreter start (``mro-edge --help``) and
  ``verify_backup`` run again on the backup just written; copy + manifest = the rest.
- references on the same ledger file, a few seconds apart: LMDB's compacting copy alone
  (``env.copy(compact=True)``, what ``mdb_copy -c`` does), a plain file copy of ``data.mdb``
  and a SHA-256 of it.

Every time is also given per 100,000 entries (scaled linearly from N).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb

from mro_edge.commands_backup import verify_backup
from shared.runtime.config import Config
from shared.runtime.logs import configure_logging
from tests.support.sign import LocalSign, record_item

ROOT = Path(__file__).resolve().parent.parent
BATCH = 1000
PER = 100_000


def build_ledger(data: Path, n: int) -> float:
    """A sign store of n entries under `data` (seconds taken)."""
    sign = LocalSign(Config(data_dir=str(data)), map_size_mb=max(1024, n // 100)).open()
    start = time.perf_counter()
    try:
        for i in range(0, n, BATCH):
            sign.append([record_item(j) for j in range(i, min(n, i + BATCH))])
        sign.checkpoint()
    finally:
        sign.close()
    return time.perf_counter() - start


def _cli(data: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, MRO_DATA_DIR=str(data), MRO_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mro_edge", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    return time.perf_counter() - start, done


def _sha256_s(path: Path) -> float:
    start = time.perf_counter()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return time.perf_counter() - start


def _lmdb_copy_s(store: Path, out: Path) -> float:
    out.mkdir()
    env = lmdb.open(str(store), readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        start = time.perf_counter()
        env.copy(str(out), compact=True)
        return time.perf_counter() - start
    finally:
        env.close()


def _file_copy_s(source: Path, dest: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(source, dest)
    with dest.open("rb+") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def run_backup_bench(quick: bool = False, entries: int | None = None) -> dict[str, Any]:
    n = entries or (20_000 if quick else 100_000)
    configure_logging("bench-backup", "-", "WARNING")  # the sign handler's info lines are not figures
    scale = PER / n
    with tempfile.TemporaryDirectory(prefix="mro-bench-backup-") as tmp:
        base = Path(tmp)
        data, out = base / "data", base / "backup"
        print(f"building a ledger of {n:,} entries ...", file=sys.stderr, flush=True)
        built_s = build_ledger(data, n)
        ledger_file = data / "sign" / "data.mdb"
        ledger_mb = ledger_file.stat().st_size / 1e6
        startup_s, _ = _cli(data, "--help")
        total_s, done = _cli(data, "backup", "--out", str(out))
        if done.returncode != 0:
            raise RuntimeError(f"mro-edge backup failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        start = time.perf_counter()
        checked = verify_backup(out)
        verify_s = time.perf_counter() - start
        if checked["manifest"]["ledger"]["size"] != n:
            raise RuntimeError(f"the backup holds {checked['manifest']['ledger']['size']} entries, not {n}")
        backup_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
        lmdb_copy_s = _lmdb_copy_s(data / "sign", base / "lmdb-copy")
        file_copy_s = _file_copy_s(ledger_file, base / "copy.mdb")
        sha_s = _sha256_s(ledger_file)
    copy_s = max(0.0, total_s - startup_s - verify_s)
    figures = {
        "entries": n, "ledger_build_s": round(built_s, 1), "ledger_mb": round(ledger_mb, 1),
        "backup_mb": round(backup_mb, 1),
        "backup_command_s": round(total_s, 2), "process_start_s": round(startup_s, 2),
        "verify_s": round(verify_s, 2), "copy_and_manifest_s": round(copy_s, 2),
        "reference": {"lmdb_compact_copy_s": round(lmdb_copy_s, 2), "file_copy_fsync_s": round(file_copy_s, 2),
                      "sha256_s": round(sha_s, 2)},
        "per_100k": {
            "backup_command_s": round(total_s * scale, 1), "verify_s": round(verify_s * scale, 1),
            "copy_and_manifest_s": round(copy_s * scale, 1),
            "lmdb_compact_copy_s": round(lmdb_copy_s * scale, 1), "file_copy_fsync_s": round(file_copy_s * scale, 1),
            "sha256_s": round(sha_s * scale, 1),
        },
    }
    print(table(figures), flush=True)
    return figures


def table(f: dict[str, Any]) -> str:
    p, r = f["per_100k"], f["reference"]

    def row(label: str, seconds: float, per: float | None) -> str:
        return f"{label:<44} {seconds:>8} s {'' if per is None else f'{per} s':>14}"

    return "\n".join([
        f"backup of a {f['entries']:,}-entry ledger ({f['ledger_mb']} MB data.mdb; built in {f['ledger_build_s']} s; "
        f"backup {f['backup_mb']} MB):",
        f"{'':<44} {'measured':>10} {'per 100,000':>14}",
        row("mro-edge backup --out DIR (whole command)", f["backup_command_s"], p["backup_command_s"]),
        row("  of which verification (verify_backup)", f["verify_s"], p["verify_s"]),
        row("  of which copy + manifest", f["copy_and_manifest_s"], p["copy_and_manifest_s"]),
        row("  of which process start (mro-edge --help)", f["process_start_s"], None),
        "reference, same ledger file, same run:",
        row("  LMDB compacting copy (mdb_copy -c)", r["lmdb_compact_copy_s"], p["lmdb_compact_copy_s"]),
        row("  plain file copy + fsync", r["file_copy_fsync_s"], p["file_copy_fsync_s"]),
        row("  SHA-256 of data.mdb", r["sha256_s"], p["sha256_s"]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--entries", type=int, default=None, help="ledger entries (default 100000, quick 20000)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_backup_bench(quick=args.quick, entries=args.entries)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
