"""`mro-edge ledger archive` on a running box: Mosquitto, ingest/validate/sign, the uplink and a
real gateway process (tests/edge.py). Refused while the gateway has cosigned nothing; with records
flowing it archives what the gateway acknowledged and cosigned, deletes it from the box, and the
pipeline goes on (sign appends, the uplink sends, the gateway takes the `ledger_archived` entry).
The archive verifies on its own (`audit verify`, sha256sum), the box's export verifies alone and
with the archive, and a backup of the pruned box restores and verifies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import pytest

from shared.ledger.archive import LEDGER_ARCHIVED
from shared.ledger.entry import parse_entry
from tests.edge import EdgeStack, database
from tests.pipeline import ROOT, wait_until

pytestmark = pytest.mark.timeout(600)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_archive_while_records_flow_then_verify_backup_and_restore(tmp_path) -> None:
    archive = tmp_path / "archive-2026"
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url, start_link=False) as edge:
        edge.send(150)
        refused = cli(edge.pipeline.env, "ledger", "archive", "--out", str(archive))
        assert refused.returncode != 0 and "has not cosigned" in refused.stderr, refused.stderr
        assert not archive.exists() and len(edge.ledger()) == 150

        edge.start_uplink()
        edge.start_heartbeat()
        status = edge.wait_uplink(lambda s: (s.get("cosigned_size") or 0) >= 100, timeout_s=90,
                                  what="the gateway to cosign a checkpoint")
        flowing = threading.Thread(target=edge.send, args=(150,), kwargs={"wait": False})
        flowing.start()
        done = cli({**edge.pipeline.env, "MRO_LOG_LEVEL": "INFO"}, "ledger", "archive", "--out", str(archive),
                   "--by", "alice")
        flowing.join()
        assert done.returncode == 0, done.stderr
        assert "ledger entry seq" in done.stdout, done.stdout + done.stderr
        info = json.loads((archive / "archive.json").read_text())
        n = info["n"]
        assert 0 < n <= 150 and n >= status["cosigned_size"] - 10, info
        logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        archived_line = [line for line in logged if line.get("state_transition") == "LEDGER_ARCHIVED"]
        assert len(archived_line) == 1 and archived_line[0]["operator"] == "alice", done.stderr
        assert archived_line[0]["n"] == n and archived_line[0]["service"] == "ledger-archive"

        edge.wait_recorded(timeout_s=180)
        local = edge.ledger()
        assert local[0].seq == n and [e.seq for e in local] == list(range(n, n + len(local))), "no gap"
        assert n + len(local) == 301, "300 records and the ledger_archived entry"
        marks = [parse_entry(e.entry) for e in local if b'"type":"ledger_archived"' in e.entry]
        assert len(marks) == 1 and marks[0].type == LEDGER_ARCHIVED and marks[0].body["archived_count"] == n
        assert marks[0].body["operator"] == "alice"
        wait_until(lambda: edge.gateway_count() == 301, 120, 0.5, "the uplink to push everything")
        central = edge.gateway_entries()
        assert [(e.seq, e.hash) for e in central[n:]] == [(e.seq, e.hash) for e in local]
        assert central[n - 1].hash == info["last_hash"]

        # the archive alone: mro-edge audit verify, and sha256sum as its README says
        alone = cli(edge.pipeline.env, "audit", "verify", str(archive))
        assert alone.returncode == 0 and f"OK: {n} entries" in alone.stdout, alone.stdout + alone.stderr
        if shutil.which("sha256sum"):
            summed = subprocess.run(["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=archive,
                                    capture_output=True, text=True, check=False)
            assert summed.returncode == 0, summed.stdout + summed.stderr

        # the box: its export starts at n; verified alone, and with the archive as one chain
        export = tmp_path / "export"
        exported = cli(edge.pipeline.env, "audit", "export", "--out", str(export), "--seq", str(n + 1))
        assert exported.returncode == 0, exported.stderr
        box_alone = cli(edge.pipeline.env, "audit", "verify", str(export))
        assert box_alone.returncode == 0, box_alone.stdout + box_alone.stderr
        assert f"seq 0..{n - 1} are NOT in this directory" in box_alone.stdout
        together = cli(edge.pipeline.env, "audit", "verify", str(export), "--archive", str(archive))
        assert together.returncode == 0 and "including 1 archive(s)" in together.stdout, together.stdout

        # a backup of the pruned box (the gateway holds exactly its ledger) restores and verifies
        backup = tmp_path / "backup"
        taken = cli(edge.pipeline.env, "backup", "--out", str(backup))
        assert taken.returncode == 0 and "verified" in taken.stdout, taken.stderr
        restored = cli(edge.pipeline.env, "restore", str(backup), "--data-dir", str(tmp_path / "box2" / "data"))
        assert restored.returncode == 0, restored.stderr
