"""The drain: queued entries go to the gateway in seq order, and what it holds is acknowledged.

A gap holds everything behind it back until the missing seq arrives. Batches go with backoff
and a circuit breaker; the gateway's head is stored durably (as the acknowledged count) before
the acknowledged entries are dropped. A gateway holding less than it had acknowledged (restored
from an older backup) raises an alarm and gets the missing entries again from the ledger.

`gateway_head` is only what the gateway itself said since it was last out of reach: it is what
`in_sync` is computed from, so it is forgotten whenever the gateway may have changed (a failed
call, a new link state): a gateway restored from a backup while it was away comes back with
less than it had acknowledged, and a head remembered from before would claim `in_sync`.
When the acknowledged seq moves back, `on_rewind` runs before the alarm is raised, so the
status that follows an alarm never shows the seq the gateway no longer holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.uplink.client import GapError, GatewayError, GatewaySession, GatewayUnavailable, Head
from services.uplink.ledger import LedgerView
from services.uplink.store import UplinkStore
from shared.runtime.breaker import CircuitBreaker, retrying
from shared.runtime.config import Config

MIN_BATCH = 50
HEAD_CHECK_S = 2.0  # idle: how often the gateway is asked for its head
HEAD_RETRY_S = 0.2  # how soon again while its head is unknown

Alarm = Callable[[str, str], None]


@dataclass
class Sent:
    """A batch on its way: the seqs it covers and its rows."""

    first: int
    last: int
    rows: list[bytes]


class Drain:
    """Pushes the uplink store to the gateway; `acked` is the highest seq the gateway holds."""

    def __init__(self, config: Config, store: UplinkStore, ledger: LedgerView, gateway: GatewaySession,
                 breaker: CircuitBreaker, log, alarm: Alarm, *, link_usable: Callable[[], bool],
                 halt: threading.Event, on_rewind: Callable[[], None]):
        self.config = config
        self.store = store
        self.ledger = ledger
        self.gateway = gateway
        self.breaker = breaker
        self.log = log
        self.alarm = alarm
        self.link_usable = link_usable
        self.halt = halt
        self.on_rewind = on_rewind
        self.batch = max(1, config.uplink.batch)
        self.acked = store.acknowledged_count() - 1
        self.gateway_head: Head | None = None
        self._head_checked = 0.0

    def ask_head_now(self) -> None:
        self._head_checked = 0.0

    def next_batch(self) -> Sent | None:
        """Contiguous entries from acked+1: a gap holds everything behind it back."""
        first = self.acked + 1
        rows = self.store.contiguous_rows(first, self.batch)
        return Sent(first, first + len(rows) - 1, rows) if rows else None

    def push(self, batch: Sent) -> None:
        try:
            for attempt in retrying(self.config.uplink.retry_attempts, (GatewayUnavailable,)):
                with attempt:
                    if not self.link_usable() or self.halt.is_set():
                        return  # no calls while isolated (or not known yet); the batch stays where it is
                    head = self.gateway.client().push(batch.rows)
        except GapError as exc:
            self.resync(exc.expected_seq - 1)
        except GatewayError as exc:
            if exc.status == 413 and self.batch > MIN_BATCH:
                self.batch = max(MIN_BATCH, self.batch // 2)
                self.log.warning("gateway refused the batch size; sending smaller batches", batch=self.batch)
                return
            if exc.head is not None:
                self.acknowledge(exc.head)
            self._refused(exc)
            self.halt.wait(5.0)
        except GatewayUnavailable as exc:
            self._unreachable()
            self.log.warning("gateway unavailable", error=str(exc), breaker=self.breaker.state,
                             state_transition="UPLINK_RETRY")
        else:
            self.breaker.success()
            self.acknowledge(head)

    def _unreachable(self) -> None:
        self.gateway_head = None  # it may come back with another head (restored from a backup)
        self.breaker.failure()

    def _refused(self, exc: GatewayError) -> None:
        self.gateway.refused(exc)
        self.breaker.failure()
        self.alarm(str(exc.detail.get("code", "gateway_refused")), str(exc))

    def acknowledge(self, head: Head) -> None:
        """Store the gateway's head durably, then drop what it now holds."""
        self.gateway_head = head
        if head.seq <= self.acked:
            return
        first = self.acked + 1
        self.store.acknowledge(head.seq + 1)
        self.acked = head.seq
        self.log.info("batch acknowledged by the gateway", first_seq=first, last_seq=head.seq,
                      state_transition="UPLINKED->ACKNOWLEDGED")

    def drop_stale(self) -> None:
        """Entries at or below the acknowledged seq (one that arrived while its ack was being
        stored) are already at the gateway: drop them so the queue can reach zero."""
        self.store.drop_acknowledged(self.acked + 1)

    def resync(self, gateway_seq: int) -> None:
        """The gateway's head is not where we thought: continue from what it actually holds."""
        self.log.warning("gateway head differs from acknowledged seq; resuming from the gateway's",
                         acked_seq=self.acked, gateway_seq=gateway_seq, state_transition="UPLINK_RESYNC")
        if gateway_seq < self.acked:
            lost = self.acked
            self.refill(gateway_seq + 1, lost)
            self.on_rewind()
            self.alarm("gateway_behind", f"the gateway holds up to seq {gateway_seq} but had acknowledged "
                       f"{lost}; sending the missing entries again from the local ledger")
        else:
            self.acknowledge(Head(gateway_seq, ""))
            self.gateway_head = None

    def refill(self, first: int, last: int) -> None:
        """Put entries the gateway lost (it was restored from an older backup) back into the queue,
        from the ledger itself, and move the acknowledged seq back to what the gateway holds."""
        self.store.requeue(self.ledger.export_rows(first, last), first)
        self.acked = first - 1

    def check_head(self) -> None:
        """Idle: ask the gateway for its head now and then (this is what proves we are in sync)."""
        since = time.monotonic() - self._head_checked
        if since < (HEAD_CHECK_S if self.gateway_head is not None else HEAD_RETRY_S):
            return
        self._head_checked = time.monotonic()
        try:
            self.gateway_head = self.gateway.client().head()
            self.breaker.success()
        except GatewayUnavailable:
            self._unreachable()
        except GatewayError as exc:
            self._refused(exc)
            return
        if self.gateway_head is not None and self.gateway_head.seq > self.acked:
            self.acknowledge(self.gateway_head)  # it holds more than we knew (our ack was lost)
        elif self.gateway_head is not None and self.gateway_head.seq < self.acked:
            self.resync(self.gateway_head.seq)

