"""What `mro-edge backup` copies and in which order (mro_edge/commands_backup.py): the order is what
makes a set of per-store snapshots safe to restore, the modes what keeps secrets secret."""

from __future__ import annotations

from pathlib import Path

from mro_edge.commands_backup import _mode_for, _skipped, _store_dirs


def test_stores_are_copied_upstream_first_and_the_uplink_before_the_ledger(tmp_path: Path) -> None:
    for name in ("sign", "uplink", "validate", "heartbeat", "spool", "ingest", "extra"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.mdb").write_bytes(b"")
    (tmp_path / "keys").mkdir()
    order = [p.name for p in _store_dirs(tmp_path)]
    assert order == ["spool", "ingest", "validate", "extra", "heartbeat", "uplink", "sign"]


def test_secrets_are_0600_public_files_keep_at_most_0644(tmp_path: Path) -> None:
    key = tmp_path / "ledger.key"
    key.write_text("x")
    key.chmod(0o640)
    assert _mode_for(Path("keys/ledger.key"), key) == 0o600
    assert _mode_for(Path("broker/passwd"), key) == 0o600
    public = tmp_path / "checkpoint.latest"
    public.write_text("x")
    public.chmod(0o664)
    assert _mode_for(Path("keys/checkpoint.latest"), public) == 0o644
    token = tmp_path / "token"
    token.write_text("x")
    token.chmod(0o600)
    assert _mode_for(Path("uplink/token"), token) == 0o600


def test_lock_files_logs_and_run_state_are_not_copied() -> None:
    for name in ("lock.mdb", "service.lock", "run.lock", ".lock", "run.json", "logs", "sign.log", "mosquitto.pid",
                 "gateway.db-wal"):
        assert _skipped(Path(name)), name
    for name in ("data.mdb", "ledger.key", "passwd", "acl", "token", "checkpoint.latest", "gateway.db"):
        assert not _skipped(Path(name)), name
