"""The sign stage's handler against a real store, without MQTT: benchmarks, tests and tools.

``LocalSign`` builds what ``shared.runtime.stage.StageRuntime`` gives a stage (the store with the
runtime's tables, an outbox, topics, a logger) minus the broker link, so ``Sign.open`` and the
batch (``shared.runtime.delivery.run_batch``) run exactly as in the service: one LMDB write
transaction per batch.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from services.sign.stage import Sign
from shared.contract import record_from_body
from shared.ledger.canonical import canonical_json, sha256_hex
from shared.runtime.config import Config
from shared.runtime.delivery import run_batch
from shared.runtime.logs import get_logger
from shared.runtime.messages import DeviceRef, ValidatedRecord
from shared.runtime.outbox import Outbox
from shared.runtime.stage import RUNTIME_TABLES
from shared.runtime.store import Store
from shared.runtime.topics import Topics
from shared.runtime.work import LmdbUnitOfWork


def record_item(i: int, station: str = "HGR1", device: str = "TQW-01") -> ValidatedRecord:
    """A validated torque record as the validate stage hands it to sign (key = idempotency key)."""
    body = {
        "schema": "mro.record/1", "type": "torque_event", "event_id": str(uuid.UUID(int=i + 1, version=4)),
        "occurred_at": "2026-01-05T10:00:00Z", "station": station,
        "device": {"kind": "torque_wrench", "id": device}, "work_order_id": f"WO-2026-{i:06d}",
        "aircraft": {"registration": "N123AB", "serial_number": "4567", "type": "A320"}, "ata": "32-11",
        "technician": {"cert_no": "A1234567", "cert_kind": "FAA-AP"},
        "tool": {"serial_number": "TW-88812", "calibration_due": "2027-06-30"},
        "fastener_ref": "NAS1351-4-12", "torque_nm": "24.6", "torque_min_nm": "23", "torque_max_nm": "26",
        "result": "OK", "tightening_id": i,
    }
    key = sha256_hex(canonical_json(body))
    return ValidatedRecord(key, record_from_body(body), DeviceRef("torque_wrench", device))


class LocalSign:
    """``Sign`` on ``$data_dir/sign`` (a real LMDB store); ``append`` runs one batch transaction."""

    def __init__(self, config: Config | str | Path, *, map_size_mb: int = 1024) -> None:
        self.config = config if isinstance(config, Config) else Config(data_dir=str(config))
        self.stage = Sign()
        self.alarms: list[Exception] = []
        self.stage.refuse = lambda config, exc: self.alarms.append(exc)  # type: ignore[method-assign]
        self.published: list[tuple[str, bytes]] = []
        store = Store(self.config.stage_dir("sign"), RUNTIME_TABLES + Sign.tables, map_size_mb=map_size_mb)
        topics = Topics(self.config.station)
        self.runtime = SimpleNamespace(
            config=self.config, store=store, topics=topics, stage=self.stage, log=get_logger(stage="sign"),
            outbox=Outbox(store, lambda *a, **k: None, topic=topics.stage_input("uplink"), source="sign",
                          batch=250, redeliver_after_s=15, max_in_flight=1 << 30),
        )
        self.store = store
        self.opened = False

    def open(self, *, checkpointer: bool = False) -> LocalSign:
        """``Sign.open`` (start-up checks); the checkpoint thread only if asked (else ``checkpoint()``)."""
        self.stage.run_checkpointer = checkpointer
        self.stage.open(self.runtime)
        self.opened = True
        return self

    def append(self, items: list[ValidatedRecord]) -> list[Any]:
        with self.store.write() as txn:
            uow = LmdbUnitOfWork(self.stage, self.runtime.topics, self.store, txn, self.runtime.outbox)
            run_batch(self.stage, items, uow)
        self.published.extend((topic, payload) for topic, payload, _, _ in uow.messages())
        return uow.transitions

    def checkpoint(self, *, force: bool = True) -> bytes | None:
        """Sign a checkpoint of the committed tree now (as the checkpoint thread does)."""
        cp = self.stage.checkpointer
        if force:
            cp.last_at = -1e18
        return cp.tick(final=True)

    def close(self) -> None:
        if self.opened:
            self.stage.close()
            self.opened = False
        self.store.close()

    def __enter__(self) -> LocalSign:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
