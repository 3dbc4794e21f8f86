"""LMDB maps that grow at run time (shared/runtime/store.py), in real services on a real broker.

Every stage starts with a 1 MiB map and takes thousands of records end to end without freezing;
the uplink (another process, reading the ledger through `open_ledger`) keeps pushing what sign
appended after sign grew its map. At a tiny cap the stage freezes with an alarm; raising the cap
in its edge.toml and `mro-edge resume` lets it go on without a restart, nothing lost or twice.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.runtime.config import DEFAULT_CONFIG
from tests.edge import EdgeStack, database
from tests.pipeline import ROOT, wait_until

pytestmark = pytest.mark.timeout(600)

COUNT = 3000


def frozen(edge: EdgeStack, stage: str) -> bool:
    return any(s.get("state") == "frozen" for s in edge.status_of(stage))


def test_every_stage_grows_from_a_1_mib_map_and_the_uplink_keeps_reading_the_grown_ledger(tmp_path) -> None:
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url, MRO_STAGE_MAP_SIZE_MB="1") as edge:
        edge.send(COUNT, timeout_s=240)
        ledger = edge.ledger()
        assert len(ledger) == COUNT and len({e.idem for e in ledger}) == COUNT
        assert [e.seq for e in ledger] == list(range(COUNT))
        for stage in ("ingest", "validate", "sign"):
            assert not frozen(edge, stage), f"{stage} froze"
            assert (edge.data_dir / stage / "data.mdb").stat().st_size > 1 << 20, f"{stage}'s map grew"
            wait_until(lambda s=stage: edge.status_of(s)[-1].get("store", {}).get("map_mb", 0) > 1, 30, 0.2,
                       f"{stage}'s status to show its grown map")
        # the ledger's cap is its class's share of the storage budget (below ledger_map_max_mb)
        config = edge.config
        assert edge.status_of("sign")[-1]["store"]["max_mb"] == config.storage.class_budget("ledger") >> 20
        assert config.store_cap_mb("sign") < config.stage.ledger_map_max_mb
        assert edge.status_of("validate")[-1]["store"]["max_mb"] == 4096
        wait_until(lambda: edge.gateway_count() == COUNT, 120, 0.5, "the uplink to push the whole ledger")
        edge.assert_gateway_has_ledger(COUNT)


def capped_config(path: Path, cap_mb: int) -> None:
    """The shipped edge.toml with every store starting at 1 MiB and capped at `cap_mb`."""
    text = DEFAULT_CONFIG.read_text()
    text = text.replace("map_size_mb = 64", "map_size_mb = 1").replace("map_max_mb = 4096", f"map_max_mb = {cap_mb}")
    assert f"map_max_mb = {cap_mb}" in text
    path.write_text(text)


def test_at_its_cap_a_stage_freezes_and_goes_on_once_the_cap_is_raised_without_a_restart(tmp_path) -> None:
    toml = tmp_path / "validate.toml"
    capped_config(toml, 2)
    count = 2000
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url, start_link=False,
                                                        stage_env={"validate": {"MRO_CONFIG": str(toml)}}) as edge:
        edge.send(count, wait=False)
        # bounded by the machine, not the product: a loaded CI worker took over 90 s to bring 2,000 records there
        wait_until(lambda: frozen(edge, "validate"), 240, 0.1, "validate to freeze at its 2 MiB cap")
        alarms = [a for a in edge.alarms() if a.get("service") == "validate" and a.get("alarm") == "frozen"]
        assert alarms and "MapFullAtCap" in alarms[0]["detail"], alarms
        assert "cap of 2 MiB" in alarms[0]["detail"]
        pid = edge.pipeline.procs["validate"].pid
        assert len(edge.ledger()) < count

        capped_config(toml, 64)
        result = subprocess.run([sys.executable, "-m", "mro_edge", "resume", "validate"], env=edge.pipeline.env,
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        asked = time.monotonic()
        edge.wait_recorded(timeout_s=180)
        assert edge.pipeline.procs["validate"].pid == pid and edge.pipeline.alive("validate"), "no restart"
        ledger = edge.ledger()
        assert len(ledger) == count and len({e.idem for e in ledger}) == count
        assert [e.seq for e in ledger] == list(range(count))
        assert edge.pipeline.dlq("validate") == []
        states = [s.get("state") for s in edge.status_of("validate") if s.get("state") in ("frozen", "up", "down")]
        walked = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
        assert walked[walked.index("frozen"):] == ["frozen", "up"], walked  # never down: no restart
        assert time.monotonic() - asked < 180
