"""Prometheus exposition of the box's figures, read from the MCC's model (`state.BoxState`).

One collector exposes every process's figures: the stages publish cumulative counters and
their commit latency histogram in their retained status (`shared.runtime.status`), so no stage
opens a port. Names follow Prometheus conventions: `mro_` prefix, `_total` counters, base units
(`_seconds`, entries, records). No device id or free text is ever a label: the label values
are service, stage, state and alarm kind names, all from a small fixed set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.mcc.state import LINK_STATES, BoxState, _number

SERVICE_STATES = ("up", "down", "frozen", "contested", "silent", "unknown")
BREAKER_STATES = ("CLOSED", "OPEN", "HALF_OPEN")
RECORDS = (("in", "records a stage took in"), ("out", "records a stage accepted or recorded and passed on"),
           ("rejected", "records a stage rejected to its DLQ"),
           ("duplicate", "records a stage already had a fate for"))


class BoxCollector(Collector):
    def __init__(self, state: BoxState, lock, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.lock = lock
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            yield from self._collect(self.clock())

    def _collect(self, now: float) -> Iterator[Metric]:
        box = self.state
        services = box.services(now)
        state = GaugeMetricFamily("mro_service_state", "1 for the state each box service is in", labels=["service",
                                                                                                        "state"])
        age = GaugeMetricFamily("mro_service_status_age_seconds", "seconds since the service's last status",
                                labels=["service"])
        for view in services:
            for name in SERVICE_STATES:
                state.add_metric([view.name, name], 1.0 if view.state == name else 0.0)
            if view.seen_at is not None:
                age.add_metric([view.name], max(0.0, now - view.seen_at))
        yield state
        yield age

        stages = [v for v in services if "records" in v.status]
        for field, text in RECORDS:
            family = CounterMetricFamily(f"mro_stage_records_{field}", f"{text} (since its process started)",
                                         labels=["stage"])
            for view in stages:
                family.add_metric([view.name], float(view.status["records"].get(field, 0)))
            yield family
        commit = HistogramMetricFamily("mro_stage_batch_commit_seconds", "latency of a stage's batch commit "
                                       "(one synced LMDB write transaction)", labels=["stage"])
        for view in stages:
            histogram = view.status.get("commit_seconds") or {}
            buckets = [(_le(bound), float(count)) for bound, count in histogram.get("buckets", [])]
            buckets.append(("+Inf", float(histogram.get("count", 0))))
            commit.add_metric([view.name], buckets, float(histogram.get("sum", 0.0)))
        yield commit
        for name, field, text in (
            ("mro_stage_queue_depth_records", "queue_depth", "records waiting in a stage (inbox and outbox)"),
            ("mro_stage_outbox_oldest_unreceipted_seconds", "outbox_oldest_s",
             "age of the oldest record a stage published downstream that is not receipted yet"),
            ("mro_stage_dlq_rows", "dlq_rows", "error reports kept in a stage's DLQ table"),
            ("mro_stage_dlq_bytes", "dlq_bytes", "bytes of a stage's DLQ table"),
        ):
            gauge = GaugeMetricFamily(name, text, labels=["stage"])
            for view in stages:
                value = box.number(view.name, field)
                if value is not None:
                    gauge.add_metric([view.name], value)
            yield gauge

        yield from self._stores(stages)
        yield from self._retention(stages)
        yield from self._storage(now)
        unassigned = box.number("ingest", "unassigned_reads")
        if unassigned is not None:
            yield GaugeMetricFamily("mro_ingest_unassigned_reads", "raw device reads no work session took yet "
                                    "(`mro-edge reads list`)", value=unassigned)

        dlq = CounterMetricFamily("mro_dlq_reports", "DLQ reports the MCC saw published (since it started)",
                                  labels=["stage"])
        for stage, count in sorted(box.dlq_counts.items()):
            dlq.add_metric([stage], float(count))
        yield dlq
        alarms = CounterMetricFamily("mro_alarms", "alarms the MCC saw published (since it started)",
                                     labels=["alarm"])
        for kind, count in sorted(box.alarm_counts.items()):
            alarms.add_metric([kind], float(count))
        yield alarms

        yield from self._uplink(now)
        yield from self._link(now)
        yield from self._clock()

    def _clock(self) -> Iterator[Metric]:
        """The box's clock as validate (else sign) reports it; nothing while neither has."""
        for service in ("validate", "sign"):
            clock = self.state.statuses.get(service, {}).get("clock")
            if isinstance(clock, dict):
                break
        else:
            return
        if isinstance(clock.get("synchronised"), bool):
            yield GaugeMetricFamily("mro_clock_synchronised", "1 when the kernel calls the box's clock "
                                    "synchronised (NTP), 0 when not", value=1.0 if clock["synchronised"] else 0.0)
        error = _number(clock.get("max_error_ms"))
        if error is not None:
            yield GaugeMetricFamily("mro_clock_max_error_seconds", "the kernel's bound on the clock's error",
                                    value=error / 1000)

    def _stores(self, stages: list) -> Iterator[Metric]:
        """A stage's LMDB store against its budget, once stages report `store` {used_mb, map_mb,
        max_mb} (the storage budget work); nothing is exposed for a stage that does not."""
        for field, text in (("used", "bytes a stage's LMDB store uses"),
                            ("map", "bytes of a stage's LMDB map (address space)"),
                            ("max", "bytes a stage's LMDB store may grow to (its budget)")):
            gauge = GaugeMetricFamily(f"mro_stage_store_{field}_bytes", text, labels=["stage"])
            for view in stages:
                store = view.status.get("store")
                value = store.get(f"{field}_mb") if isinstance(store, dict) else None
                if isinstance(value, int | float) and not isinstance(value, bool):
                    gauge.add_metric([view.name], float(value) * 1024 * 1024)
            yield gauge

    def _retention(self, stages: list) -> Iterator[Metric]:
        """What each stage's retention pruned (`retention` in its status: totals of its process's
        life, as the records counters) and the seq below which it may prune."""
        pruned = CounterMetricFamily("mro_stage_retention_pruned", "rows a stage's retention pruned from its "
                                     "store (since its process started)", labels=["stage", "table"])
        below = GaugeMetricFamily("mro_stage_retention_prunable_below_seq", "records below this ledger seq are "
                                  "acknowledged and cosigned by the gateway, as the stage last heard",
                                  labels=["stage"])
        for view in stages:
            figures = view.status.get("retention")
            if not isinstance(figures, dict):
                continue
            for table in ("seen", "dlq"):
                value = figures.get(f"{table}_pruned")
                if isinstance(value, int) and not isinstance(value, bool):
                    pruned.add_metric([view.name, table], float(value))
            value = figures.get("prunable_below")
            if isinstance(value, int) and not isinstance(value, bool):
                below.add_metric([view.name], float(value))
        yield pruned
        yield below

    def _storage(self, now: float) -> Iterator[Metric]:
        """The data directory against its budget, per class, as ingest measured it (`shared.runtime.budget`)."""
        storage = self.state.storage(now)
        if not storage:
            return
        used = GaugeMetricFamily("mro_storage_bytes", "bytes in use in the data directory per storage class "
                                 "(dlq: the stages' DLQ tables, also inside ledger and intake)", labels=["class"])
        budget = GaugeMetricFamily("mro_storage_class_budget_bytes", "bytes a storage class may use (its share "
                                   "of the budget)", labels=["class"])
        for name, figures in storage["classes"].items():
            if figures["used_bytes"] is not None:
                used.add_metric([name], figures["used_bytes"])
            if figures["budget_bytes"] is not None:
                budget.add_metric([name], figures["budget_bytes"])
        yield used
        yield budget
        yield GaugeMetricFamily("mro_storage_used_bytes", "bytes on disk in the whole data directory",
                                value=storage["used_bytes"])
        yield GaugeMetricFamily("mro_storage_budget_bytes", "the data directory's storage budget "
                                "([storage] budget_bytes)", value=storage["budget_bytes"])
        if storage["filesystem_free_bytes"] is not None:
            yield GaugeMetricFamily("mro_storage_filesystem_free_bytes", "free bytes on the data directory's "
                                    "filesystem", value=storage["filesystem_free_bytes"])
        yield GaugeMetricFamily("mro_storage_refusing", "1 while new device input is refused for want of "
                                "storage", value=1.0 if storage["refusing"] else 0.0)
        if storage["fills_in_s"] is not None:
            yield GaugeMetricFamily("mro_storage_fills_in_seconds", "when the budget is reached at the last "
                                    "hour's growth rate (absent: not filling)", value=storage["fills_in_s"])

    def _uplink(self, now: float) -> Iterator[Metric]:
        box = self.state
        for name, field, text in (
            ("mro_uplink_backlog_entries", "backlog", "ledger entries the gateway does not hold yet"),
            ("mro_uplink_acked_seq", "acked_seq", "highest ledger seq the gateway acknowledged"),
            ("mro_uplink_cosigned_size", "cosigned_size", "tree size of the newest checkpoint the gateway cosigned"),
        ):
            value = box.number("uplink", field)
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        oldest = box.oldest_unsent_s(now)
        if "uplink" in box.statuses:
            yield GaugeMetricFamily("mro_uplink_oldest_unsent_seconds", "age of the oldest ledger entry the "
                                    "gateway does not hold yet (0: it holds every entry)", value=oldest or 0.0)
        rate = box.drain_rate(now)
        if rate is not None:
            yield GaugeMetricFamily("mro_uplink_drain_entries_per_second", "entries the gateway acknowledged "
                                    "per second, over the last two minutes", value=rate)
        breaker = box.statuses.get("uplink", {}).get("breaker")
        if breaker is not None:
            family = GaugeMetricFamily("mro_uplink_breaker_state", "1 for the state the uplink's circuit "
                                       "breaker is in", labels=["state"])
            for name in BREAKER_STATES:
                family.add_metric([name], 1.0 if breaker == name else 0.0)
            yield family

    def _link(self, now: float) -> Iterator[Metric]:
        box = self.state
        if not box.link_history:
            return
        current = box.link_history[-1].state
        family = GaugeMetricFamily("mro_link_state", "1 for the link state the heartbeat reports", labels=["state"])
        for name in LINK_STATES:
            family.add_metric([name], 1.0 if current == name else 0.0)
        yield family
        yield GaugeMetricFamily("mro_link_state_seconds", "seconds the link has been in its current state",
                                value=box.link_seconds(now) or 0.0)
        probe = box.connectivity.get("last_probe_ms")
        if isinstance(probe, int | float):
            yield GaugeMetricFamily("mro_link_probe_seconds", "duration of the heartbeat's last gateway probe",
                                    value=probe / 1000)


def _le(bound: float) -> str:
    return repr(float(bound))


def exposition(state: BoxState, lock, now: Callable[[], float] = time.time) -> bytes:
    """The text exposition format of every figure, for `/metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoxCollector(state, lock, now))
    return generate_latest(registry)
