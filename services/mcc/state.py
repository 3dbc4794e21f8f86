"""What maintenance control sees: a bounded model of the box built only from what it publishes.

Fed by the MQTT topics the MCC subscribes to (read-only): the retained `status/<service>` of
every stage and monitor, the heartbeat's `status/connectivity`, `dlq/<stage>`, `alarm` and
`receipt/<device>` (per-device last seen). Pure: every method takes the time it is told, so the
model is tested without a broker or a clock. Memory is bounded whatever the box sends: the link
timeline, the per-minute rate buckets, the DLQ list, the alarms and the device table are all
capped (the constants below), and every string kept is cut to a fixed length.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any

import msgspec

from shared.runtime.budget import forecast_s

LINK_HISTORY = 200  # link state changes kept
RATE_MINUTES = 180  # per-minute record counts kept (three hours)
DLQ_KEPT = 100  # newest DLQ reports kept
ALARMS_KEPT = 50  # newest alarms kept
DEVICES_KEPT = 1000  # devices whose last seen is kept; the longest silent one is dropped first
DRAIN_WINDOW_S = 120.0  # the uplink's drain rate is measured over this window
STALE_AFTER_S = 30.0  # a service whose status is older than this (while not down) is `silent`
TEXT_MAX = 200  # longest string kept from any message
ERRORS_KEPT = 5  # (rule, path) pairs kept per DLQ report
LINK_STATES = ("CONNECTED", "DEGRADED", "ISOLATED", "RECONCILING")
STORAGE_SAMPLES = 360  # (time, bytes used) measurements kept for the fill forecast
STORAGE_WINDOW_S = 3600.0  # the forecast follows the growth rate of the last hour
STORAGE_CLASSES = ("ledger", "intake", "logs", "other")


def _text(value: Any, limit: int = TEXT_MAX) -> str:
    return str(value)[:limit] if value is not None else ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_utc(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 UTC time as the services write it; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class ServiceView(msgspec.Struct):
    name: str
    state: str  # up, down, frozen, contested, silent (no status lately), unknown (never seen)
    why: str
    seen_at: float | None
    status: dict[str, Any]


class LinkChange(msgspec.Struct):
    state: str
    at: float
    epoch: int | None


class DlqEntry(msgspec.Struct):
    stage: str
    device: str
    at: float
    errors: list[tuple[str, str]]  # (rule, path): never the received value, which is device text


class AlarmView(msgspec.Struct):
    service: str
    alarm: str
    detail: str
    at: float


class Snapshot(msgspec.Struct):
    """The page's view (`/api/state`, the event stream)."""

    station: str
    now: float
    services: list[ServiceView]
    link: LinkChange | None
    link_history: list[LinkChange]
    uplink: dict[str, Any]
    rate_per_minute: list[tuple[float, int]]
    dlq: list[DlqEntry]
    dlq_total: int
    alarms: list[AlarmView]
    devices: list[tuple[str, float]]
    storage: dict[str, Any]


def _why(state: str, status: dict[str, Any]) -> str:
    if state == "up":
        return f"running (pid {status.get('pid')})"
    if state == "down":
        return "stopped, or lost the broker (its last will said so)"
    storage = status.get("storage")
    if state == "frozen" and isinstance(storage, dict) and storage.get("refusing"):
        return (f"device input refused for want of storage: {_text(storage.get('refusing'))}; it resumes by "
                "itself once there is room (README, 'Storage budget and a full disk')")
    if state == "frozen":
        return "its store keeps failing: intake is held; fix the fault, then `mro-edge resume`"
    if state == "contested":
        return "another client keeps taking its MQTT session (two copies running?)"
    return _text(state)


class RateBuckets:
    """Records counted per minute, the newest RATE_MINUTES minutes."""

    def __init__(self, minutes: int = RATE_MINUTES) -> None:
        self.buckets: deque[list[float]] = deque(maxlen=minutes)  # [minute start, count]

    def add(self, at: float, count: int) -> None:
        if count <= 0:
            return
        minute = at - at % 60
        if self.buckets and self.buckets[-1][0] == minute:
            self.buckets[-1][1] += count
        elif not self.buckets or minute > self.buckets[-1][0]:
            self.buckets.append([minute, count])
        # a count for a minute older than the newest bucket (clock step back) is not shown

    def series(self, now: float) -> list[tuple[float, int]]:
        """One point per minute of the window ending now, zero where nothing was counted."""
        end = now - now % 60
        start = end - 60 * ((self.buckets.maxlen or RATE_MINUTES) - 1)
        counts = {b[0]: int(b[1]) for b in self.buckets}
        return [(m, counts.get(m, 0)) for m in range(int(start), int(end) + 1, 60)]


class BoxState:
    """The model: `on_*` take one message each, `snapshot` and `figures` read it."""

    def __init__(self, station: str, services: tuple[str, ...]) -> None:
        self.station = station
        self.expected = services
        self.statuses: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}
        self.connectivity: dict[str, Any] = {}
        self.link_history: deque[LinkChange] = deque(maxlen=LINK_HISTORY)
        self.rate = RateBuckets()
        self._intake_total: int | None = None
        self.dlq: deque[DlqEntry] = deque(maxlen=DLQ_KEPT)
        self.dlq_counts: dict[str, int] = {}  # per stage, since the MCC started
        self.alarms: deque[AlarmView] = deque(maxlen=ALARMS_KEPT)
        self.alarm_counts: dict[str, int] = {}
        self.devices: dict[str, float] = {}
        self._acked: deque[tuple[float, int]] = deque(maxlen=256)
        self._storage_used: deque[tuple[float, int]] = deque(maxlen=STORAGE_SAMPLES)

    # inputs
    def on_status(self, service: str, status: dict[str, Any], at: float) -> None:
        if service == "connectivity":
            self.on_connectivity(status, at)
            return
        if service not in self.expected and len(self.statuses) >= 2 * len(self.expected) + 8:
            return  # an unknown name (a stray publisher) cannot grow the table
        self.statuses[service] = status
        self.seen[service] = at
        if service == "ingest":
            total = status.get("processed")
            if isinstance(total, int):
                if self._intake_total is not None and total >= self._intake_total:
                    self.rate.add(at, total - self._intake_total)
                self._intake_total = total
        if service == "ingest":
            self._storage_sample(status)
        if service == "uplink" and isinstance(status.get("acked_seq"), int):
            self._acked.append((at, status["acked_seq"]))

    def _storage_sample(self, status: dict[str, Any]) -> None:
        """One measurement of the data directory (ingest measures it, `shared.runtime.budget`)."""
        storage = status.get("storage")
        if not isinstance(storage, dict):
            return
        at, used = _number(storage.get("at")), storage.get("used_bytes")
        if at is None or not isinstance(used, int) or isinstance(used, bool):
            return
        if not self._storage_used or at > self._storage_used[-1][0]:
            self._storage_used.append((at, used))

    def storage(self, now: float) -> dict[str, Any]:
        """Disk use against the budget, per class, and when it fills at the last hour's growth rate
        (`fills_in_s` None: not filling); {} until ingest reports a measurement."""
        storage = self.statuses.get("ingest", {}).get("storage")
        if not isinstance(storage, dict) or _number(storage.get("budget_bytes")) is None:
            return {}
        budget = _number(storage.get("budget_bytes")) or 0.0
        used = _number(storage.get("used_bytes")) or 0.0
        raw = storage.get("classes")
        classes = raw if isinstance(raw, dict) else {}
        recent = [(t, b) for t, b in self._storage_used if now - t <= STORAGE_WINDOW_S]
        return {
            "used_bytes": used, "budget_bytes": budget, "percent": 100.0 * used / budget if budget else None,
            "filesystem_free_bytes": _number(storage.get("filesystem_free_bytes")),
            "refusing": _text(storage.get("refusing")),
            "classes": {name: {"used_bytes": _number(c.get("used_bytes")),
                               "budget_bytes": _number(c.get("budget_bytes"))}
                        for name in STORAGE_CLASSES if isinstance(c := classes.get(name), dict)}
            | self._dlq_class(storage),
            "fills_in_s": forecast_s(recent, int(budget)),
        }

    def _dlq_class(self, storage: dict[str, Any]) -> dict[str, Any]:
        """The DLQ class: the stages' DLQ tables (inside their stores, counted there too), as each
        stage reports them; absent until ingest reports the class's budget."""
        budget = _number(storage.get("dlq_budget_bytes"))
        if budget is None:
            return {}
        used = [n for name in self.statuses if (n := self.number(name, "dlq_bytes")) is not None]
        return {"dlq": {"used_bytes": sum(used) if used else None, "budget_bytes": budget}}

    def on_connectivity(self, status: dict[str, Any], at: float) -> None:
        state = status.get("state")
        if state not in LINK_STATES:
            return
        self.connectivity = status
        epoch = status.get("epoch") if isinstance(status.get("epoch"), int) else None
        last = self.link_history[-1] if self.link_history else None
        if last is None or last.state != state or last.epoch != epoch:
            since = parse_utc(status.get("since")) or at
            self.link_history.append(LinkChange(state, since, epoch))

    def on_dlq(self, stage: str, report: dict[str, Any], at: float) -> None:
        raw = report.get("errors")
        errors: list[Any] = raw if isinstance(raw, list) else []
        pairs = [(_text(e.get("rule"), 64), _text(e.get("path"), 128)) for e in errors[:ERRORS_KEPT]
                 if isinstance(e, dict)]
        stage = _text(stage, 32)
        self.dlq.append(DlqEntry(stage, _text(report.get("device_id"), 64), at, pairs))
        if stage in self.dlq_counts or len(self.dlq_counts) < 32:
            self.dlq_counts[stage] = self.dlq_counts.get(stage, 0) + 1

    def on_alarm(self, alarm: dict[str, Any], at: float) -> None:
        kind = _text(alarm.get("alarm"), 64)
        self.alarms.append(AlarmView(_text(alarm.get("service"), 32), kind, _text(alarm.get("detail"), 500),
                                     parse_utc(alarm.get("at")) or at))
        if kind in self.alarm_counts or len(self.alarm_counts) < 64:
            self.alarm_counts[kind] = self.alarm_counts.get(kind, 0) + 1

    def on_receipt(self, device: str, at: float) -> None:
        self.devices.pop(device, None)
        self.devices[device] = at  # insertion order is last-seen order
        if len(self.devices) > DEVICES_KEPT:
            del self.devices[next(iter(self.devices))]

    # reading
    def supervised(self, name: str) -> str:
        """What `mro-edge run`'s supervisor says of the service, when it is not simply up."""
        children = self.statuses.get("supervisor", {}).get("children")
        child = children.get(name) if isinstance(children, dict) else None
        if not isinstance(child, dict):
            return ""
        restarts, hung = child.get("restarts") or 0, child.get("hung") or 0
        if child.get("state") == "up" and not restarts and not hung:
            return ""
        return (f"; supervisor: {_text(child.get('state'), 16)}, {restarts} restart(s), "
                f"{hung} hang(s), last exit {child.get('last_exit')}")

    def service_view(self, name: str, now: float) -> ServiceView:
        status = self.statuses.get(name)
        if status is None:
            return ServiceView(name, "unknown", "no status seen yet: not started, or never reached the broker"
                               + self.supervised(name), None, {})
        state = _text(status.get("state"), 16)
        seen = self.seen[name]
        if state != "down" and now - seen > STALE_AFTER_S:
            return ServiceView(name, "silent", f"no status for {int(now - seen)} s: hung, or the broker "
                               "connection is broken" + self.supervised(name), seen, status)
        return ServiceView(name, state, _why(state, status) + self.supervised(name), seen, status)

    def oldest_unsent_s(self, now: float) -> float | None:
        at = parse_utc(self.statuses.get("uplink", {}).get("oldest_unsent_at"))
        return max(0.0, now - at) if at is not None else None

    def drain_rate(self, now: float) -> float | None:
        """Entries per second the gateway acknowledged over the last DRAIN_WINDOW_S."""
        window = [(t, seq) for t, seq in self._acked if now - t <= DRAIN_WINDOW_S]
        if len(window) < 2 or window[-1][0] <= window[0][0]:
            return None
        return max(0, window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])

    def uplink(self, now: float) -> dict[str, Any]:
        status = self.statuses.get("uplink", {})
        view = {k: status.get(k) for k in ("backlog", "queued", "acked_seq", "local_head", "breaker",
                                            "in_sync", "cosigned_size")}
        view.update(oldest_unsent_s=self.oldest_unsent_s(now), drain_per_s=self.drain_rate(now))
        return view

    def services(self, now: float) -> list[ServiceView]:
        names = list(self.expected) + sorted(n for n in self.statuses if n not in self.expected)
        return [self.service_view(n, now) for n in names]

    def snapshot(self, now: float) -> Snapshot:
        link = self.link_history[-1] if self.link_history else None
        return Snapshot(
            station=self.station, now=now, services=self.services(now), link=link,
            link_history=list(self.link_history), uplink=self.uplink(now),
            rate_per_minute=self.rate.series(now), dlq=list(reversed(self.dlq)),
            dlq_total=sum(self.dlq_counts.values()), alarms=list(reversed(self.alarms)),
            devices=sorted(self.devices.items(), key=lambda d: -d[1]), storage=self.storage(now),
        )

    def link_seconds(self, now: float) -> float | None:
        """How long the link has been in its current state."""
        return max(0.0, now - self.link_history[-1].at) if self.link_history else None

    def number(self, service: str, field: str) -> float | None:
        return _number(self.statuses.get(service, {}).get(field))
