"""The local circuit breaker (seed 002, shared/runtime/stage.py): a stage whose store keeps failing
freezes instead of dropping work.

The fault is real, not mocked: the validate stage runs with a 1 MiB LMDB map that may not grow
(MRO_STAGE_MAP_SIZE_MB=1, MRO_STAGE_MAP_MAX_MB=1), so once records arrive its writes fail with
MapFullError: its disk is full. It must fail three times in a row, publish status `frozen` and an alarm on
`mro/<station>/alarm`, keep every record it has not processed (ingest holds them durably and
the devices have their `received` receipts), retry at once on `mro-edge resume validate`, and
once it runs with room again, record everything exactly once.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.edge import EdgeStack, database
from tests.pipeline import ROOT, wait_until

pytestmark = pytest.mark.timeout(300)

COUNT = 2000


def stalls(edge: EdgeStack) -> int:
    return edge.pipeline.log_tail("validate", 100_000).count('"state_transition": "STALLED"')


def test_validate_with_a_full_store_freezes_alarms_keeps_everything_and_recovers(tmp_path) -> None:
    tiny = {"validate": {"MRO_STAGE_MAP_SIZE_MB": "1", "MRO_STAGE_MAP_MAX_MB": "1"}}
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url, start_link=False, stage_env=tiny) as edge:
        edge.send(COUNT, wait=False)

        wait_until(lambda: any(s.get("state") == "frozen" for s in edge.status_of("validate")), 60, 0.1,
                   "validate to publish status `frozen`")
        alarms = [a for a in edge.alarms() if a.get("service") == "validate"]
        assert alarms and alarms[0]["alarm"] == "frozen", alarms
        assert "MapFull" in alarms[0]["detail"], alarms[0]
        assert stalls(edge) >= 3, "frozen only after three failures in a row"
        assert edge.pipeline.alive("validate"), "a frozen stage keeps running; it does not crash"

        # nothing is lost: every record is held (ingest committed it and said `received`)
        def all_held() -> bool:
            for device in edge.devices():
                device.resend_unreceipted()
            return all(sent.held for device in edge.devices() for sent in device.sent.values())

        wait_until(all_held, 60, 0.2, "a `received` receipt for every record")
        recorded_while_frozen = len(edge.ledger())
        assert recorded_while_frozen < COUNT

        # `mro-edge resume validate` asks for a retry now (the frozen stage otherwise waits 5 s);
        # the fault is still there, so it stays frozen
        before = stalls(edge)
        asked = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "mro_edge", "resume", "validate"], env=edge.pipeline.env,
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: stalls(edge) > before, 10, 0.05, "a retry right after `mro-edge resume`")
        assert time.monotonic() - asked < 4.5, "resume retried at once, not at the next 5 s tick"
        assert edge.status_of("validate")[-1]["state"] == "frozen"

        # the fault clears (the stage runs with room again): everything is recorded, once
        edge.pipeline.kill("validate")
        edge.pipeline.start("validate")
        edge.wait_recorded(timeout_s=120)
        ledger = edge.ledger()
        assert len(ledger) == COUNT and len({e.idem for e in ledger}) == COUNT
        assert edge.pipeline.dlq("validate") == [], "a store fault is not the records' fault: no DLQ"
        states = [s.get("state") for s in edge.status_of("validate")]
        walked = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
        assert walked[walked.index("frozen"):] == ["frozen", "down", "up"], walked
