"""The storage budget's arithmetic (shared/runtime/budget.py): classes, refusal, thresholds, forecast."""

from __future__ import annotations

import errno
import os

import lmdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.mcc.metrics import exposition
from services.mcc.state import BoxState
from shared.runtime.budget import (
    MIB,
    Guard,
    Thresholds,
    Usage,
    bytes_by_class,
    forecast_s,
    is_disk_full,
    level,
    measure,
    refusal,
)
from shared.runtime.config import ConfigError, StorageConfig, load_config
from shared.runtime.store import Store, store_in_use, u64

STORAGE = StorageConfig(budget_bytes=100 * MIB, reserve_mb=10)


def usage(total_mb: float = 0, intake_mb: float = 0, free_mb: float = 1000, storage: StorageConfig = STORAGE) -> Usage:
    by_class = {"ledger": int((total_mb - intake_mb) * MIB), "intake": int(intake_mb * MIB), "logs": 0, "other": 0}
    budgets = {name: storage.class_budget(name) for name in ("ledger", "intake", "dlq", "logs")}
    return Usage(0.0, by_class, storage.budget_bytes, budgets, int(free_mb * MIB), 2000 * MIB)


def test_files_are_classed_by_the_store_directory_they_sit_in_and_count_their_allocated_blocks(tmp_path) -> None:
    for folder, size in (("sign", 3), ("uplink", 1), ("spool", 2), ("ingest", 1), ("validate", 1), ("logs", 1),
                         ("keys", 1)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "data.mdb").write_bytes(os.urandom(size * MIB))
    sparse = tmp_path / "sign" / "lock.mdb"
    with sparse.open("wb") as f:
        f.truncate(512 * MIB)  # a sparse file: its size is not what the disk holds
    (tmp_path / "edge.log").write_bytes(b"x" * 4096)
    found = bytes_by_class(tmp_path)
    assert found["ledger"] // MIB == 4 and found["intake"] // MIB == 4 and found["logs"] // MIB == 1
    assert MIB <= found["other"] < MIB + 64 * 1024
    assert bytes_by_class(tmp_path / "absent") == {"ledger": 0, "intake": 0, "logs": 0, "other": 0}


def test_a_drained_store_counts_only_the_pages_it_holds_data_in_not_its_high_water_file(tmp_path) -> None:
    """LMDB never shrinks its file: a spool drained after an outage must not count as full for good."""
    store = Store(tmp_path / "spool", ("intake",), map_size_mb=64)
    with store.write() as txn:
        for i in range(3000):
            txn.put(u64(i), os.urandom(1000), db=store.table("intake"))
    full = bytes_by_class(tmp_path, {"spool": store})["intake"]
    with store.write() as txn:
        for i in range(2900):
            txn.delete(u64(i), db=store.table("intake"))
    with store.write() as txn:  # LMDB reuses what a commit freed only after a later one
        txn.put(u64(5000), b"x", db=store.table("intake"))
    drained = bytes_by_class(tmp_path, {"spool": store})["intake"]
    assert (tmp_path / "spool" / "data.mdb").stat().st_blocks * 512 >= full  # the file did not shrink
    assert full > 3 * MIB and drained < full // 5, (full, drained)
    store.close()
    assert bytes_by_class(tmp_path)["intake"] == drained  # read from the file side, as another process does


def test_a_measurement_names_the_classes_over_their_share_and_the_filesystem_free_space(tmp_path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "data.mdb").write_bytes(os.urandom(MIB))
    tiny = StorageConfig(budget_bytes=2 * MIB, intake_share=0.25)
    found = measure(tmp_path, tiny)
    assert found.over() == ["intake"] and found.fs_free > 0 and found.fs_size >= found.fs_free
    assert "intake" in (refusal(found, StorageConfig(budget_bytes=2 * MIB, intake_share=0.25, reserve_mb=0)) or "")
    assert found.payload()["classes"]["intake"]["budget_bytes"] == MIB // 2


@pytest.mark.parametrize(("total", "intake", "free", "why"), [
    (50, 10, 1000, None),
    (100, 10, 1000, "budget"),
    (60, 25, 1000, "intake"),
    (10, 1, 9, "reserve_mb"),
    (10, 1, 0, "reserve_mb"),
])
def test_device_input_is_refused_at_the_budget_the_intake_share_or_a_nearly_full_filesystem(total, intake, free,
                                                                                             why) -> None:
    reason = refusal(usage(total, intake, free), STORAGE)
    assert (reason is None) if why is None else (why in (reason or "")), reason


def test_a_refusal_lasts_until_use_is_a_margin_below_the_limit() -> None:
    assert refusal(usage(99.5, 10), STORAGE) is None
    assert refusal(usage(99.5, 10), STORAGE, refusing=True) is not None
    assert refusal(usage(97.0, 10), STORAGE, refusing=True) is None


def test_thresholds_alarm_once_per_crossing_and_once_back_below() -> None:
    watch = Thresholds(STORAGE)
    seen = [watch.crossed(usage(mb)) for mb in (10, 79, 81, 85, 91, 95, 85, 50, 50, 82)]
    kinds = [(s[0], s[1].split(",")[-1][:40]) if s else None for s in seen]
    assert [k[0] if k else None for k in kinds] == [None, None, "storage_threshold", None, "storage_threshold",
                                                   None, "storage_threshold", "storage_ok", None,
                                                   "storage_threshold"]
    assert "over 90 %" in seen[4][1] and "back below 90 %" in seen[6][1]
    assert level(100.0, STORAGE) == 100 and level(79.9, STORAGE) == 0


def test_the_forecast_follows_the_growth_rate_and_says_nothing_when_flat() -> None:
    assert forecast_s([(0, 10 * MIB), (100, 20 * MIB)], 100 * MIB) == pytest.approx(800.0)
    assert forecast_s([(0, 10 * MIB), (100, 10 * MIB)], 100 * MIB) is None
    assert forecast_s([(0, 20 * MIB), (100, 10 * MIB)], 100 * MIB) is None
    assert forecast_s([(0, 10 * MIB)], 100 * MIB) is None
    assert forecast_s([(5, 10), (5, 20)], 100) is None
    assert forecast_s([(0, 10 * MIB), (100, 120 * MIB)], 100 * MIB) == 0.0


@given(start=st.integers(0, 10**9), rate=st.integers(2, 10**7), step=st.integers(1, 600), n=st.integers(2, 50),
       budget=st.integers(1, 10**13))
def test_on_steady_growth_the_forecast_lands_on_the_budget(start, rate, step, n, budget) -> None:
    samples = [(float(i * step), start + rate * i * step) for i in range(n)]
    found = forecast_s(samples, budget)
    last = samples[-1][1]
    if last >= budget:
        assert found == 0.0
    else:
        assert found is not None and last + found * rate == pytest.approx(budget, rel=1e-6)


def test_a_real_enospc_is_told_apart_from_other_faults() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(lmdb.DiskError("mdb_txn_commit: No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(lmdb.MapFullError("full"))


def test_the_guard_measures_when_due_and_refuses_at_once_after_enospc(tmp_path) -> None:
    now = [0.0]
    guard = Guard(tmp_path, StorageConfig(budget_bytes=100 * MIB, reserve_mb=0, check_interval_s=5), lambda: now[0])
    assert guard.check() is None and guard.usage is not None
    guard.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert "full" in (guard.check() or "")
    now[0] = 6.0
    assert guard.check() is None  # measured again: there is room


def test_a_budget_raised_while_refusing_is_read_again_without_a_restart(tmp_path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "blob").write_bytes(os.urandom(2 * MIB))
    now, raised = [0.0], [None]
    guard = Guard(tmp_path, StorageConfig(budget_bytes=MIB, reserve_mb=0), lambda: now[0], reload=lambda: raised[0])
    assert "budget" in (guard.check() or "")
    now[0] = 10.0
    assert "budget" in (guard.check() or "")  # an unreadable configuration keeps the budget it had
    raised[0] = StorageConfig(budget_bytes=100 * MIB, reserve_mb=0)
    now[0] = 20.0
    assert guard.check() is None and guard.storage.budget_bytes == 100 * MIB


def test_a_store_open_in_another_live_process_is_told_apart_from_a_left_over_one(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "spool").mkdir()
    lmdb.open(str(tmp_path / "spool")).close()
    assert not store_in_use(tmp_path / "spool") and not store_in_use(tmp_path / "absent")
    holder = subprocess.Popen([sys.executable, "-c", "import lmdb, sys, time; env = lmdb.open(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(30)", str(tmp_path / "spool")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        assert store_in_use(tmp_path / "spool")
    finally:
        holder.kill()
        holder.wait(10)
    assert not store_in_use(tmp_path / "spool")


def test_store_caps_and_the_dlq_budget_fit_within_their_class_share() -> None:
    config = load_config(env={"MRO_STORAGE_BUDGET_BYTES": str(1024 * MIB)})
    assert config.storage.budget_bytes == 1024 * MIB
    assert config.store_cap_mb("sign") == int(1024 * 0.55) and config.store_cap_mb("spool") == 256
    assert config.store_cap_mb("validate") == 256 and config.dlq_budget_bytes() == int(1024 * MIB * 0.05) // 3
    default = load_config(env={})
    assert default.store_cap_mb("validate") == default.stage.map_max_mb  # the old key still caps below the share
    with pytest.raises(ConfigError, match="shares"):
        load_config(env={"MRO_STORAGE_LEDGER_SHARE": "0.9"})
    with pytest.raises(ConfigError, match="warn_percent"):
        load_config(env={"MRO_STORAGE_WARN_PERCENT": "95"})


def test_the_mcc_shows_use_against_the_budget_with_a_forecast() -> None:
    box = BoxState("HGR1", ("ingest",))
    for minute, used in enumerate((10, 20, 30)):
        box.on_status("ingest", {"state": "up", "storage": {
            "at": 1000.0 + 60 * minute, "used_bytes": used * MIB, "budget_bytes": 100 * MIB, "refusing": "",
            "filesystem_free_bytes": 500 * MIB,
            "classes": {"ledger": {"used_bytes": used * MIB, "budget_bytes": 55 * MIB}}}}, 1000.0 + 60 * minute)
    shown = box.storage(1130.0)
    assert shown["percent"] == pytest.approx(30.0) and shown["fills_in_s"] == pytest.approx(420.0)
    assert shown["classes"] == {"ledger": {"used_bytes": 30.0 * MIB, "budget_bytes": 55.0 * MIB}}
    text = exposition(box, _NoLock(), lambda: 1130.0).decode()
    assert "mro_storage_budget_bytes 1.048576e+08" in text
    assert 'mro_storage_bytes{class="ledger"} 3.145728e+07' in text
    assert "mro_storage_fills_in_seconds 420.0" in text and "mro_storage_refusing 0.0" in text
    assert BoxState("HGR1", ("ingest",)).storage(0.0) == {}
    box.on_status("validate", {"state": "up", "dlq_bytes": 4096}, 1130.0)
    box.on_status("ingest", {"state": "up", "dlq_bytes": 1024, "storage": {
        "at": 1130.0, "used_bytes": 31 * MIB, "budget_bytes": 100 * MIB, "dlq_budget_bytes": 5 * MIB}}, 1130.0)
    assert box.storage(1130.0)["classes"]["dlq"] == {"used_bytes": 5120.0, "budget_bytes": 5.0 * MIB}
    box.on_status("ingest", {"state": "frozen", "storage": {"refusing": "the data directory uses 100 MiB"}}, 1140.0)
    assert box.service_view("ingest", 1140.0).why.startswith("device input refused for want of storage: the data")


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc) -> None:
        return None
