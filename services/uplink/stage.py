"""Uplink: keep the signed entries from the sign stage and push them to the central gateway.

Entries land in this stage's LMDB under the stage protocol (receipted to sign only once
stored). A pusher thread sends them in seq order, holding back at a gap until the missing
seq arrives, in batches, with backoff and a circuit breaker; the gateway's acknowledged seq
is stored durably before the acknowledged entries are dropped. The pusher runs beside the
stage loop, so a long drain never stops new entries from being taken in.
"""

from __future__ import annotations

import threading
import time

import msgspec

from services.uplink.client import GapError, GatewayClient, GatewayError, GatewayUnavailable, Head, edge_token
from shared.breaker import CircuitBreaker, retrying
from shared.ledger import GENESIS_PREV
from shared.ledger_store import decode_entry, open_ledger
from shared.stage import Stage, UnitOfWork
from shared.store import StoreError, from_u64, u64
from shared.topics import Topics
from shared.wire import Item, json_encode, utc_now

ENTRIES = "entries"
ACKED = b"acked_seq"


class Uplink(Stage):
    name = "uplink"
    tables = (ENTRIES,)

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        return (topics.status("connectivity"),)

    def open(self, runtime) -> None:
        self.pusher = Pusher(runtime)
        self.pusher.start()

    def close(self) -> None:
        self.pusher.stop()

    def handle(self, items: list[Item], uow: UnitOfWork) -> None:
        for item in items:
            if uow.seen(item.key) is not None:
                continue
            row = item.data["row"]
            uow.put(ENTRIES, u64(row["seq"]), json_encode(row))
            uow.remember(item.key, u64(row["seq"]))
            uow.transition(item.data.get("event_id"), item.key, "QUEUED_FOR_UPLINK", seq=row["seq"])
        self.pusher.wake.set()

    def handle_notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        try:
            self.pusher.link_state = msgspec.json.decode(payload).get("state", "CONNECTED")
        except (msgspec.DecodeError, AttributeError):
            return
        self.pusher.wake.set()

    def status_extra(self) -> dict:
        return self.pusher.view()


class Pusher(threading.Thread):
    """Drains the uplink store to the gateway in seq order."""

    def __init__(self, runtime):
        super().__init__(name="uplink-pusher", daemon=True)
        self.rt = runtime
        self.config = runtime.config
        self.store = runtime.store
        self.log = runtime.log
        self.breaker = CircuitBreaker(self.config.uplink.breaker_failures, self.config.uplink.breaker_reset_s)
        self.link_state = "CONNECTED"
        self.gateway_head: Head | None = None
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._client: GatewayClient | None = None
        self._ledger = None
        self._head_checked = 0.0
        self._last_status = 0.0
        self.acked = self._load_acked()

    def _load_acked(self) -> int:
        with self.store.read() as txn:
            raw = txn.get(ACKED, db=self.store.table("meta"))
        return from_u64(raw) - 1 if raw else -1

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self.join(timeout=self.config.uplink.request_timeout_s + 2)

    def client(self) -> GatewayClient:
        if self._client is None:
            self._client = GatewayClient(self.config.link.gateway_url, edge_token(self.config),
                                         self.config.uplink.request_timeout_s)
        return self._client

    # what the heartbeat and `mro-edge status` see
    def local_head(self) -> Head:
        """The sign stage's chain head: what the gateway must hold for us to be in sync."""
        try:
            if self._ledger is None:
                self._ledger = open_ledger(self.config)
            with self._ledger.read() as txn:
                cursor = txn.cursor(db=self._ledger.table("ledger"))
                if cursor.last():
                    entry = decode_entry(cursor.value())
                    return Head(entry.seq, entry.hash)
        except StoreError:
            pass
        return Head(-1, GENESIS_PREV)

    def view(self) -> dict:
        backlog = self.store.count(ENTRIES)
        local = self.local_head()
        gateway = self.gateway_head
        in_sync = backlog == 0 and gateway is not None and gateway == local
        return {"backlog": backlog, "acked_seq": self.acked, "local_head": local.seq,
                "gateway_head": gateway.seq if gateway else None, "in_sync": in_sync,
                "breaker": self.breaker.state, "link": self.link_state}

    # the drain
    def run(self) -> None:
        while not self._stop.is_set():
            if self.link_state == "ISOLATED" or not self.breaker.allow():
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            rows, last_seq = self._next_batch()
            if not rows:
                self._check_head()
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                for attempt in retrying(self.config.uplink.retry_attempts, (GatewayUnavailable,)):
                    with attempt:
                        head = self.client().push(rows)
            except GapError as exc:
                self._resync(exc.expected_seq - 1)
            except GatewayError as exc:
                if exc.head is not None:
                    self._acknowledge(exc.head, first_seq=self.acked + 1)
                self.breaker.failure()
                self._alarm(exc.detail.get("code", "gateway_refused"), str(exc))
                self._stop.wait(5.0)
            except GatewayUnavailable as exc:
                self.breaker.failure()
                self.log.warning("gateway unavailable", error=str(exc), breaker=self.breaker.state,
                                 state_transition="UPLINK_RETRY")
            else:
                self.breaker.success()
                self._acknowledge(head, first_seq=self.acked + 1)
            self._publish_status()

    def _next_batch(self) -> tuple[list[bytes], int]:
        """Contiguous entries from acked+1: a gap holds everything behind it back."""
        rows: list[bytes] = []
        expect = self.acked + 1
        with self.store.read() as txn:
            cursor = txn.cursor(db=self.store.table(ENTRIES))
            if cursor.set_range(u64(expect)):
                for key, value in cursor:
                    if from_u64(key) != expect or len(rows) >= self.config.uplink.batch:
                        break
                    rows.append(value)
                    expect += 1
        return rows, expect - 1

    def _acknowledge(self, head: Head, first_seq: int) -> None:
        """Store the gateway's acknowledged seq durably, then drop what it now holds."""
        self.gateway_head = head
        if head.seq <= self.acked:
            return
        with self.store.write() as txn:
            txn.put(ACKED, u64(head.seq + 1), db=self.store.table("meta"))
            cursor = txn.cursor(db=self.store.table(ENTRIES))
            while cursor.first() and from_u64(cursor.key()) <= head.seq:
                cursor.delete()
        self.acked = head.seq
        self.log.info("batch acknowledged by the gateway", first_seq=first_seq, last_seq=head.seq,
                      state_transition="UPLINKED->ACKNOWLEDGED")

    def _resync(self, gateway_seq: int) -> None:
        """The gateway's head is not where we thought: continue from what it actually holds."""
        self.log.warning("gateway head differs from acknowledged seq; resuming from the gateway's",
                         acked_seq=self.acked, gateway_seq=gateway_seq, state_transition="UPLINK_RESYNC")
        if gateway_seq < self.acked:
            self._alarm("gateway_behind", f"gateway holds up to seq {gateway_seq} but acknowledged {self.acked}")
            self.acked = gateway_seq
        else:
            self._acknowledge(Head(gateway_seq, ""), first_seq=self.acked + 1)

    def _check_head(self) -> None:
        if time.monotonic() - self._head_checked < 2.0:
            return
        self._head_checked = time.monotonic()
        try:
            self.gateway_head = self.client().head()
            self.breaker.success()
        except GatewayUnavailable:
            self.breaker.failure()
        except GatewayError as exc:
            self._alarm("gateway_refused", str(exc))
        self._publish_status()

    def _publish_status(self) -> None:
        if time.monotonic() - self._last_status >= 0.5:
            self._last_status = time.monotonic()
            self.rt.publish_status()

    def _alarm(self, kind: str, detail: str) -> None:
        self.log.error("uplink alarm", alarm=kind, detail=detail, state_transition="ALARM")
        self.rt.link.publish(self.rt.topics.alarm, json_encode(
            {"service": "uplink", "alarm": kind, "detail": detail, "at": utc_now()}))
