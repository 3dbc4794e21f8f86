"""The reference gateway's Prometheus figures (`GET /metrics`): per origin (one per edge box),
the chain head it holds, how far behind that head is, and the size of the newest checkpoint
it cosigned. Read in one query from the database, so they are right after a restart too.
Beside them, how many audit answers (proofs, checkpoint pages, key listings) this process gave
since it started, by kind: a counter, reset by a restart like any Prometheus counter.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

FIGURES = list[tuple[str, int, str | None, int]]  # services.gateway.storage.Tx.origin_figures


class OriginCollector(Collector):
    def __init__(self, figures: FIGURES, now: float, served: dict[str, int] | None = None) -> None:
        self.figures = figures
        self.now = now
        self.served = served or {}

    def collect(self) -> Iterator[Metric]:
        head = GaugeMetricFamily("mro_gateway_head_seq", "seq of the newest ledger entry the gateway holds "
                                 "(-1: none yet)", labels=["origin"])
        lag = GaugeMetricFamily("mro_gateway_lag_seconds", "seconds since the newest entry the gateway holds "
                                "was recorded at the edge box", labels=["origin"])
        cosigned = GaugeMetricFamily("mro_gateway_cosigned_size", "tree size of the newest checkpoint the "
                                     "gateway cosigned (0: none)", labels=["origin"])
        for origin, seq, recorded_at, size in self.figures:
            head.add_metric([origin], float(seq))
            cosigned.add_metric([origin], float(size))
            if recorded_at:
                at = datetime.fromisoformat(recorded_at.replace("Z", "+00:00")).timestamp()
                lag.add_metric([origin], max(0.0, self.now - at))
        yield head
        yield lag
        yield cosigned
        audit = CounterMetricFamily("mro_gateway_audit_answers", "audit answers given since the gateway started "
                                    "(inclusion, consistency, checkpoints, keys)", labels=["kind"])
        for kind in ("inclusion", "consistency", "checkpoints", "keys"):
            audit.add_metric([kind], float(self.served.get(kind, 0)))
        yield audit


def exposition(figures: FIGURES, now: float, served: dict[str, int] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OriginCollector(figures, now, served))
    return generate_latest(registry)
