"""`mro-edge backup` and `mro-edge restore` (mro_edge/commands_backup.py) on real services: Mosquitto,
the pipeline processes, LMDB, a real gateway.

A backup taken while records flow verifies; a non-empty --out is refused; a backup with one byte
changed (in the ledger store, in the private key) is refused by restore; restored onto a fresh
data directory the box starts, the ledger verifies (`mro-edge audit export` + `audit verify`)
and new records continue the chain from the restored head with no gap and no duplicate. Once
the gateway holds more than the backup, restoring it is refused (it would fork the ledger).
"""

from __future__ import annotations

import json
import random
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.edge import EdgeStack, database
from tests.pipeline import ROOT, wait_until

pytestmark = pytest.mark.timeout(900)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def stores_in(data: Path) -> list[Path]:
    return list(data.glob("*/data.mdb")) if data.exists() else []


def test_backup_while_running_restore_onto_a_fresh_box_and_the_chain_goes_on(tmp_path) -> None:
    backup = tmp_path / "backup"
    restored_box = tmp_path / "box2"
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url, start_link=False) as edge:
        edge.send(800)
        flowing = threading.Thread(target=edge.send, args=(800,), kwargs={"wait": False})
        flowing.start()
        taken = cli(edge.pipeline.env, "backup", "--out", str(backup))
        flowing.join()
        assert taken.returncode == 0, taken.stderr
        assert "verified" in taken.stdout
        edge.wait_recorded(timeout_s=180)
        total = len(edge.ledger())
        assert total == 1600

        manifest = json.loads((backup / "manifest.json").read_text())
        ledger = manifest["ledger"]
        assert 800 <= ledger["size"] <= 1600 and ledger["head_seq"] == ledger["size"] - 1
        assert manifest["stores"]["sign"]["ledger"] == ledger["size"]
        assert {"ingest", "validate", "sign"} <= set(manifest["stores"])
        listed = {f["path"]: f for f in manifest["files"]}
        assert {"data/sign/data.mdb", "data/keys/ledger.key", "data/broker/passwd", "data/uplink/token",
                "config/edge.toml"} <= set(listed)
        assert all(len(f["sha256"]) == 64 for f in listed.values())
        assert mode(backup / "data" / "keys" / "ledger.key") == 0o600
        assert mode(backup / "data" / "broker" / "passwd") == 0o600
        assert mode(backup / "data" / "keys") == 0o700

        again = cli(edge.pipeline.env, "backup", "--out", str(backup))
        assert again.returncode != 0 and "not empty" in again.stderr, again.stderr

        # one changed byte anywhere is refused, before anything is written
        for n, rel in enumerate(("data/sign/data.mdb", "data/keys/ledger.key")):
            tampered = tmp_path / f"tampered{n}"
            shutil.copytree(backup, tampered)
            flip_byte(tampered / rel)
            target = tmp_path / f"fresh{n}"
            refused = cli(edge.pipeline.env, "restore", str(tampered), "--data-dir", str(target))
            assert refused.returncode != 0 and rel in refused.stderr and "differs" in refused.stderr, refused.stderr
            assert not stores_in(target)

        # the gateway holds nothing yet: the restore goes ahead
        done = cli(edge.pipeline.env, "restore", str(backup), "--data-dir", str(restored_box / "data"))
        assert done.returncode == 0, done.stderr
        assert "next:" in done.stdout
        assert mode(restored_box / "data" / "keys" / "ledger.key") == 0o600
        assert mode(restored_box / "data" / "keys") == 0o700
        twice = cli(edge.pipeline.env, "restore", str(backup), "--data-dir", str(restored_box / "data"))
        assert twice.returncode != 0 and "already holds" in twice.stderr, twice.stderr

        # once the gateway holds more than the backup, restoring it would fork the ledger: refused
        edge.start_uplink()
        edge.start_heartbeat()
        wait_until(lambda: edge.gateway_count() == total, 120, 0.5, "the uplink to push the ledger")
        older = cli(edge.pipeline.env, "restore", str(backup), "--data-dir", str(tmp_path / "fresh-old"))
        assert older.returncode != 0 and "older than what was sent" in older.stderr, older.stderr
        assert not stores_in(tmp_path / "fresh-old")
        original = {e.seq: e.hash for e in edge.ledger()}

    with database("sqlite", restored_box) as url2, EdgeStack(restored_box, url2, start_link=False) as box:
        box._rng = random.Random(7)  # records the first box never sent (its seed would repeat them)
        box.send(300, timeout_s=180)
        ledger2 = box.ledger()
        assert [e.seq for e in ledger2] == list(range(len(ledger2))), "no gap"
        assert len({e.idem for e in ledger2}) == len(ledger2), "no duplicate"
        assert len(ledger2) >= ledger["size"] + 300
        assert all(original[e.seq] == e.hash for e in ledger2[: ledger["size"]]), "the restored head is kept"
        box.pipeline.stop()
        export = cli(box.pipeline.env, "audit", "export", "--out", str(restored_box / "audit"))
        assert export.returncode == 0, export.stderr
        verified = cli(box.pipeline.env, "audit", "verify", str(restored_box / "audit"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
