"""The disk-full policy at the intake stage: refuse new device input loudly, drop nothing stored.

`IntakeGate` asks the storage `budget.Guard` (every `[storage] check_interval_s`, and at once
after a real ENOSPC) whether device input is refused. While it is, the stage's status is
`frozen` with the reason, one `storage_full` alarm is raised (and `storage_resumed` when room
returns, by itself: nothing to run), and each device publish is handled by the broker's kind:

- behind the embedded broker (its intake spool in this data directory is open), a publish that
  reaches ingest was PUBACKed after a synced commit of the spool: it is **held** (not
  acknowledged, so it stays in the spool) until room returns; the broker itself stops sending
  PUBACKs for new publishes (services/broker/spool.py), which is the device's refusal;
- behind Mosquitto, whose PUBACK promised nothing durable, the publish is **refused**: the
  device gets a `rejected` receipt with rule `storage_full` (path, rule, expected, received,
  like every rule), nothing is stored (not even a DLQ row: the disk is what is short), and the
  device must send the record again later.

Crossing `[storage] warn_percent` / `alarm_percent` raises a `storage_threshold` alarm once per
crossing (`budget.Thresholds`). Pipeline messages (receipts, notices) are never refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shared.contract.decode import peek_event_id
from shared.contract.errors import FieldError
from shared.runtime.budget import Guard, Thresholds, Usage, reload_storage
from shared.runtime.clock import utc_now
from shared.runtime.config import Config
from shared.runtime.messages import DeviceReceipt, json_encode
from shared.runtime.store import Store, store_in_use

STORAGE_FULL = "storage_full"


def refused_receipt(payload: bytes, config: Config) -> bytes:
    """The `rejected` receipt of a device publish refused for want of storage (rule storage_full)."""
    error = FieldError("$", STORAGE_FULL, "room in the box's storage budget: send this record again later",
                       f"{len(payload)} bytes, not stored")
    event_id = peek_event_id(payload, max_bytes=config.limits.max_message_bytes, max_depth=config.limits.max_depth)
    return json_encode(DeviceReceipt("rejected", utc_now(), event_id, errors=[error]))


class IntakeGate:
    def __init__(self, config: Config, alarm: Callable[[str, str], None],
                 on_change: Callable[[], None], log, own: Mapping[str, Store] | None = None) -> None:
        """`own`: the stores this process has open, by directory name (ingest's)."""
        self.config = config
        self.guard = Guard(config.data_path, config.storage, reload=reload_storage, open_stores=dict(own or {}))
        self.thresholds = Thresholds(config.storage)
        self._alarm = alarm
        self._on_change = on_change
        self.log = log
        self.refusing: str | None = None
        self.refused = 0  # device publishes refused since the process started
        self._seen: Usage | None = None

    @property
    def holds(self) -> bool:
        """Behind the embedded broker (its intake spool, in this data directory, is open in a live
        process): hold, never refuse. A spool left over from an earlier embedded broker, with
        Mosquitto running now, does not count."""
        return store_in_use(Path(self.config.data_path) / "spool")

    def turn(self) -> str | None:
        """Measure if due; alarm on a threshold crossing and on entering or leaving refusal."""
        reason = self.guard.check()
        usage = self.guard.usage
        if usage is not None and usage is not self._seen:
            self._seen = usage
            crossed = self.thresholds.crossed(usage)
            if crossed:
                self._alarm(*crossed)
        if reason is not None and self.refusing is None:
            self.refusing = reason
            how = ("held in the broker's spool, and the broker sends no PUBACK for new ones" if self.holds
                   else "answered with a `rejected` receipt, rule storage_full: devices must send them again")
            self.log.error("storage full: device input refused", reason=reason, state_transition="STORAGE_FULL")
            self._alarm(STORAGE_FULL, f"{reason}. New device input is {how}; nothing stored is dropped, and "
                        "intake resumes by itself once there is room (README, 'Storage budget and a full disk')")
            self._on_change()
        elif reason is None and self.refusing is not None:
            self.refusing = None
            self.log.info("storage has room again: device input accepted", state_transition="STORAGE_RESUMED")
            self._alarm("storage_resumed", "there is room in the storage budget again: device input is accepted")
            self._on_change()
        elif reason is not None:
            self.refusing = reason
        return self.refusing

    def disk_full(self, exc: BaseException) -> None:
        self.guard.disk_full(exc)
        self.turn()

    def status(self) -> dict[str, Any]:
        usage = self.guard.usage
        found: dict[str, Any] = {"refusing": self.refusing or "", "refused": self.refused}
        if usage is not None:
            found.update(usage.payload(), at=usage.at)
        return {"storage": found}
