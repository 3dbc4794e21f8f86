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

from tests.brokers import free_port
from tests.edge import EdgeStack, database
from tests.pipeline import ROOT, wait_until
from tests.runstack import RunProc, cli_env
from tests.runstack import cli as run_cli

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


def test_backup_of_mro_edge_run_with_its_own_gateway_and_a_restored_box_that_runs_on(tmp_path) -> None:
    """`mro-edge run` (embedded broker, reference gateway in SQLite under the data directory) with
    `mro-edge simulate` sending while the backup is taken; the restored box runs and verifies."""
    backup = tmp_path / "backup"
    for box in ("box1", "box2"):
        (tmp_path / box).mkdir()
    run = RunProc(tmp_path / "box1" / "data", f"mqtt://127.0.0.1:{free_port()}").start()
    try:
        first = run_cli("simulate", "--rate", "40", "--duration", "3", env=run.env, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        sending = subprocess.Popen([sys.executable, "-m", "mro_edge", "simulate", "--rate", "40", "--duration", "4"],
                                   env=run.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        taken = run_cli("backup", "--out", str(backup), env=run.env, timeout=300)
        assert sending.wait(120) == 0
        assert taken.returncode == 0, taken.stderr
    finally:
        run.stop()
    manifest = json.loads((backup / "manifest.json").read_text())
    assert "data/gateway/gateway.db" in {f["path"] for f in manifest["files"]}, "the SQLite gateway, copied live"
    assert manifest["ledger"]["size"] > 0

    data2 = tmp_path / "box2" / "data"
    env2 = cli_env(data2, f"mqtt://127.0.0.1:{free_port()}")
    unreachable = run_cli("restore", str(backup), env=env2)
    assert unreachable.returncode != 0 and "--no-gateway-check" in unreachable.stderr, unreachable.stderr
    restored = run_cli("restore", str(backup), "--no-gateway-check", env=env2)
    assert restored.returncode == 0, restored.stderr
    run2 = RunProc(data2, env2["MRO_MQTT_URL"]).start()
    try:
        more = run_cli("simulate", "--rate", "40", "--duration", "3", env=run2.env, timeout=120)
        assert more.returncode == 0, more.stdout + more.stderr
    finally:
        run2.stop()
    export = run_cli("audit", "export", "--out", str(tmp_path / "audit2"), env=run2.env)
    assert export.returncode == 0, export.stderr
    verified = run_cli("audit", "verify", str(tmp_path / "audit2"), "--json", env=run2.env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["entries"] > manifest["ledger"]["size"]
