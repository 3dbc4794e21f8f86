"""Dry-run input: the newest device records of the signed ledger, read through LedgerReader."""

from __future__ import annotations

import pytest

from bench.compliance import synthetic_bodies, write_ledger
from services.validate.drift import ledger_bodies
from shared.runtime.config import load_config


def schema_change(number: int) -> dict:
    return {"type": "schema_change", "event_id": f"change-{number}", "action": "activate",
            "version": f"mro.record/{number}"}


@pytest.fixture
def config(tmp_path):
    return load_config(env={"MRO_DATA_DIR": str(tmp_path / "data"), "MRO_STATION": "HGR1"})


def test_no_ledger_yet_gives_no_bodies(config):
    assert list(ledger_bodies(config, 10)) == []


@pytest.mark.parametrize("limit", [1, 5, 24, 30, 100])
def test_newest_records_first_schema_changes_skipped_and_not_counted(config, limit):
    records = synthetic_bodies(30)
    stored = []
    for index, body in enumerate(records):
        stored.append(body)
        if index % 4 == 3:
            stored.append(schema_change(index))
    stored.append(schema_change(99))
    write_ledger(config.data_path, stored)
    assert list(ledger_bodies(config, limit)) == list(reversed(records))[:limit]
