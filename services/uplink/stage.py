"""Uplink: keep the signed entries from the sign stage and push them to the central gateway.

Entries land in this stage's LMDB under the stage protocol (receipted to sign only once
stored). A pusher thread sends them in seq order, holding back at a gap until the missing
seq arrives, in batches, with backoff and a circuit breaker; the gateway's acknowledged seq
is stored durably before the acknowledged entries are dropped. The pusher runs beside the
stage loop, so a long drain never stops new entries from being taken in.

Once the gateway holds the entries a signed checkpoint of the ledger covers, the pusher posts
that checkpoint (`POST /v1/checkpoints`); the gateway checks it against what it holds and
cosigns it, and the cosigned note is kept in this stage's store (meta `cosigned_checkpoint`)
as the box's receipt. `cosigned_size` in the status says how far that receipt reaches.

The link state comes from the heartbeat (retained `status/connectivity`): while ISOLATED the
pusher makes no calls at all, and it starts knowing nothing (link UNKNOWN), so it makes none
either until the retained state has arrived and says the link is usable. Messages the broker
kept for our persistent session arrive before the retained one and are older, so they are
not trusted on their own; only if no retained state comes within RETAINED_WAIT_S of the
connection (none was ever published) is the newest of them taken. A state with a lower epoch
than one already seen is older and ignored.

`in_sync` in the status (what ends RECONCILING) is only claimed after the gateway itself has
told us its head since the link came back: a head remembered from before an outage proves
nothing. The status names the connectivity `link_epoch` it was computed under; the gateway's
head is forgotten before a new ISOLATED or RECONCILING epoch is taken, so a status with the
epoch of a RECONCILING is based on what the gateway said after it began.

The status is published by the stage runtime every `stage.status_interval_s`; the pusher adds
one at once (at most every STATUS_MIN_GAP_S) when something the heartbeat or an operator acts
on changes: the breaker's state, the link state or epoch, `in_sync` while RECONCILING.

The sign stage's store may not have its `ledger` table yet (the uplink started first): the
local head is then -1, the empty ledger, until it has.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import msgspec

from services.uplink.client import GapError, GatewayClient, GatewayError, GatewayUnavailable, Head, edge_token
from shared.runtime.breaker import CircuitBreaker, retrying
from shared.runtime.config import Config
from shared.ledger.entry import GENESIS_PREV, export_row
from shared.ledger.store import LEDGER_TABLE, checkpoint_at_most, decode_entry, iter_entries, open_ledger
from shared.runtime.stage import Stage, UnitOfWork
from shared.runtime.store import Store, StoreError, from_u64, u64
from shared.runtime.topics import Topics
from shared.runtime.messages import Item, json_encode, utc_now

ENTRIES = "entries"
ACKED = b"acked_seq"
COSIGNED = b"cosigned_checkpoint"
COSIGNED_SIZE = b"cosigned_size"
CHECKPOINT_EVERY_S = 2.0
ISOLATED, RECONCILING, UNKNOWN = "ISOLATED", "RECONCILING", "UNKNOWN"
USABLE = frozenset({"CONNECTED", "DEGRADED", RECONCILING})  # link states in which the pusher calls
RETAINED_WAIT_S = 2.0
STATUS_MIN_GAP_S = 0.2
MIN_BATCH = 50


class Uplink(Stage):
    name = "uplink"
    tables = (ENTRIES,)

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        return (topics.status("connectivity"),)

    def open(self, runtime) -> None:
        self.pusher = Pusher(runtime.config, runtime.store, runtime.log, publish_status=runtime.publish_status,
                             publish=runtime.link.publish, topics=runtime.topics)
        # handled in paho's thread, with the retain flag, instead of as a notice in a batch
        runtime.link.watch[runtime.topics.status("connectivity")] = self.pusher.on_connectivity
        runtime.link.on_connect_hooks.append(self.pusher.on_mqtt_connect)
        self.pusher.start()

    def close(self) -> None:
        self.pusher.stop()

    def handle(self, items: list[Item], uow: UnitOfWork) -> None:
        acked = self.pusher.acked
        for item in items:
            if uow.seen(item.key) is not None:
                continue
            row = item.data["row"]
            seq = row["seq"]
            uow.remember(item.key, u64(seq))
            if seq <= acked:
                continue  # the gateway already holds it (re-sent after our ack was stored)
            uow.put(ENTRIES, u64(seq), json_encode(row))
            uow.transition(item.data.get("event_id"), item.key, "UPLINK_QUEUED", seq=seq)
        self.pusher.wake.set()

    def status_extra(self) -> dict:
        return self.pusher.view()


@dataclass
class Sent:
    """A batch on its way: the seqs it covers and its rows."""

    first: int
    last: int
    rows: list[bytes]


class Pusher(threading.Thread):
    """Drains the uplink store to the gateway in seq order."""

    def __init__(self, config: Config, store: Store, log, *, publish_status=None, publish=None,
                 topics: Topics | None = None, client: GatewayClient | None = None):
        super().__init__(name="uplink-pusher", daemon=True)
        self.config = config
        self.store = store
        self.log = log
        self.topics = topics or Topics(config.station)
        self._publish_status_cb = publish_status or (lambda: None)
        self._publish = publish or (lambda *a, **k: None)
        self.breaker = CircuitBreaker(config.uplink.breaker_failures, config.uplink.breaker_reset_s)
        self.batch = max(1, config.uplink.batch)
        self.link_state = UNKNOWN  # until the heartbeat's retained state says otherwise
        self.link_epoch: int | None = None
        self._link_known = False
        self._link_pending: tuple[str, int | None] | None = None
        self._connected_at: float | None = None
        self.gateway_head: Head | None = None
        self.wake = threading.Event()
        self._halt = threading.Event()
        self._client = client
        self._ledger: Store | None = None
        self._head_checked = 0.0
        self._last_status = 0.0
        self._last_shown: tuple | None = None
        self._status_due = False
        self._status_waiting = False
        self._checkpoint_tried = 0.0
        self._refused_checkpoint = 0
        self.acked = self._load_acked()
        self.cosigned_size = self._load_cosigned_size()

    def _load_acked(self) -> int:
        with self.store.read() as txn:
            raw = txn.get(ACKED, db=self.store.table("meta"))
        return from_u64(raw) - 1 if raw else -1

    def _load_cosigned_size(self) -> int:
        with self.store.read() as txn:
            raw = txn.get(COSIGNED_SIZE, db=self.store.table("meta"))
        return from_u64(raw) if raw else 0

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout=self.config.uplink.request_timeout_s + 2)
        if self._client is not None:
            self._client.close()
        if self._ledger is not None:
            self._ledger.close()

    def client(self) -> GatewayClient:
        if self._client is None:
            self._client = GatewayClient(self.config.link.gateway_url, edge_token(self.config),
                                         self.config.uplink.request_timeout_s)
        return self._client

    # the heartbeat's view of the link
    def on_mqtt_connect(self) -> None:
        if self._connected_at is None:
            self._connected_at = time.monotonic()

    def on_connectivity(self, message) -> None:
        """A `status/connectivity` message (shared.runtime.mqtt.Inbound), in paho's thread."""
        try:
            status = msgspec.json.decode(message.payload)
        except msgspec.DecodeError:
            return
        state = status.get("state") if isinstance(status, dict) else None
        if not isinstance(state, str):
            return
        epoch = status.get("epoch")
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
        if self._link_known or message.retain:
            self._link_known = True
            self.set_link_state(state, epoch)
        elif self._link_pending is None or _not_older(epoch, self._link_pending[1]):
            self._link_pending = (state, epoch)  # kept for us while we were away: maybe stale

    def _adopt_pending_link_state(self) -> None:
        """No retained state came after the connection: the newest one published is current."""
        if self._link_known or self._connected_at is None or self._link_pending is None:
            return
        if time.monotonic() - self._connected_at < RETAINED_WAIT_S:
            return
        self._link_known = True
        self.log.info("no retained link state; taking the newest one published", state=self._link_pending[0])
        self.set_link_state(*self._link_pending)

    def set_link_state(self, state: str, epoch: int | None = None) -> None:
        if not _not_older(epoch, self.link_epoch):
            return  # an older state, delivered late
        previous = self.link_state
        new_epoch = epoch is not None and epoch != self.link_epoch
        if state == previous and not new_epoch:
            return
        if state in (ISOLATED, RECONCILING) and (state != previous or new_epoch):
            self.gateway_head = None  # unknown until the gateway says so again (before the epoch moves)
        if previous not in USABLE and state in USABLE:
            self._head_checked = 0.0  # ask the gateway for its head at once
            self.breaker.trial()  # the heartbeat just saw the gateway answer: try now, not after reset_s
        self.link_epoch = epoch if epoch is not None else self.link_epoch
        self.link_state = state
        if state != previous:
            self.log.info("link state seen", state_transition=f"LINK_{previous}->{state}", epoch=epoch)
        self._status_due = True  # published by the pusher thread
        self.wake.set()

    def link_usable(self) -> bool:
        return self.link_state in USABLE

    # what the heartbeat and `mro-edge status` see
    def local_head(self) -> Head:
        """The sign stage's chain head: what the gateway must hold for us to be in sync."""
        try:
            if self._ledger is None:
                self._ledger = open_ledger(self.config)
            # the table before the transaction: one first opened inside a transaction is not valid in it
            table = self._ledger.table(LEDGER_TABLE)
            with self._ledger.read() as txn:
                cursor = txn.cursor(db=table)
                if cursor.last():
                    entry = decode_entry(cursor.value())
                    return Head(entry.seq, entry.hash)
        except (StoreError, KeyError):
            pass  # no sign store, or no `ledger` table in it yet: the empty ledger
        return Head(-1, GENESIS_PREV)

    def view(self) -> dict:
        link, epoch = self.link_state, self.link_epoch  # before the gateway's head: see set_link_state
        queued = self.store.count(ENTRIES)
        local = self.local_head()
        gateway = self.gateway_head
        in_sync = queued == 0 and gateway is not None and gateway == local
        return {"backlog": max(local.seq - self.acked, 0), "queued": queued, "acked_seq": self.acked,
                "local_head": local.seq, "gateway_head": gateway.seq if gateway else None, "in_sync": in_sync,
                "breaker": self.breaker.state, "link": link, "link_epoch": epoch,
                "cosigned_size": self.cosigned_size}

    # the drain
    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self._step()
            except Exception as exc:  # never let the pusher thread die: the stage would look healthy
                self.log.exception("uplink pusher error; retrying", error=type(exc).__name__)
                self._halt.wait(1.0)

    def _idle(self, seconds: float) -> None:
        """Wait until woken or `seconds` passed; a status held back by the rate limit goes out
        as soon as the limit allows."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._status_waiting:
                remaining = min(remaining, max(0.0, self._last_status + STATUS_MIN_GAP_S - time.monotonic()))
            if self.wake.wait(remaining):
                break
            if self._status_waiting:
                self._publish_status()
        self.wake.clear()

    def _step(self) -> None:
        if not self._link_known:
            self._adopt_pending_link_state()
        if not self.link_usable() or not self.breaker.allow():
            self._publish_status()
            self._idle(0.5)
            return
        batch = self._next_batch()
        if batch is None:
            self._drop_stale()
            self._check_head()
            self._post_checkpoint()
            self._publish_status()
            self._idle(0.5)
            return
        self._publish_status()  # shows HALF_OPEN while the trial call is out
        self._push(batch)
        self._post_checkpoint()  # also during a long drain or steady traffic (at most every 2 s)
        self._publish_status()

    def _next_batch(self) -> Sent | None:
        """Contiguous entries from acked+1: a gap holds everything behind it back."""
        rows: list[bytes] = []
        first = expect = self.acked + 1
        with self.store.read() as txn:
            cursor = txn.cursor(db=self.store.table(ENTRIES))
            if cursor.set_range(u64(expect)):
                for key, value in cursor:
                    if from_u64(key) != expect or len(rows) >= self.batch:
                        break
                    rows.append(value)
                    expect += 1
        return Sent(first, expect - 1, rows) if rows else None

    def _push(self, batch: Sent) -> None:
        try:
            for attempt in retrying(self.config.uplink.retry_attempts, (GatewayUnavailable,)):
                with attempt:
                    if not self.link_usable() or self._halt.is_set():
                        return  # no calls while isolated (or not known yet); the batch stays where it is
                    head = self.client().push(batch.rows)
        except GapError as exc:
            self._resync(exc.expected_seq - 1)
        except GatewayError as exc:
            if exc.status == 413 and self.batch > MIN_BATCH:
                self.batch = max(MIN_BATCH, self.batch // 2)
                self.log.warning("gateway refused the batch size; sending smaller batches", batch=self.batch)
                return
            if exc.head is not None:
                self._acknowledge(exc.head)
            self._forget_token_if_refused(exc)
            self.breaker.failure()
            self._alarm(str(exc.detail.get("code", "gateway_refused")), str(exc))
            self._halt.wait(5.0)
        except GatewayUnavailable as exc:
            self.breaker.failure()
            self.log.warning("gateway unavailable", error=str(exc), breaker=self.breaker.state,
                             state_transition="UPLINK_RETRY")
        else:
            self.breaker.success()
            self._acknowledge(head)

    def _forget_token_if_refused(self, exc: GatewayError) -> None:
        """401: the token is missing or not (any more) registered. Read it again next time, so a
        token put in place by the operator works without a restart."""
        if exc.status == 401 and self._client is not None:
            self._client.close()
            self._client = None

    def _acknowledge(self, head: Head) -> None:
        """Store the gateway's acknowledged seq durably, then drop what it now holds."""
        self.gateway_head = head
        if head.seq <= self.acked:
            return
        first = self.acked + 1
        with self.store.write() as txn:
            txn.put(ACKED, u64(head.seq + 1), db=self.store.table("meta"))
            self._drop_upto(txn, head.seq)
        self.acked = head.seq
        self.log.info("batch acknowledged by the gateway", first_seq=first, last_seq=head.seq,
                      state_transition="UPLINKED->ACKNOWLEDGED")

    def _drop_upto(self, txn, seq: int) -> int:
        cursor = txn.cursor(db=self.store.table(ENTRIES))
        dropped = 0
        if cursor.first():
            while (key := cursor.key()) and from_u64(key) <= seq:
                if not cursor.delete():
                    break
                dropped += 1
        return dropped

    def _drop_stale(self) -> None:
        """Entries at or below the acknowledged seq (one that arrived while its ack was being
        stored) are already at the gateway: drop them so the queue can reach zero."""
        with self.store.read() as txn:
            cursor = txn.cursor(db=self.store.table(ENTRIES))
            stale = cursor.first() and from_u64(cursor.key()) <= self.acked
        if stale:
            with self.store.write() as txn:
                self._drop_upto(txn, self.acked)

    def _resync(self, gateway_seq: int) -> None:
        """The gateway's head is not where we thought: continue from what it actually holds."""
        self.log.warning("gateway head differs from acknowledged seq; resuming from the gateway's",
                         acked_seq=self.acked, gateway_seq=gateway_seq, state_transition="UPLINK_RESYNC")
        if gateway_seq < self.acked:
            self._alarm("gateway_behind", f"the gateway holds up to seq {gateway_seq} but had acknowledged "
                        f"{self.acked}; sending the missing entries again from the local ledger")
            self._refill(gateway_seq + 1, self.acked)
        else:
            self._acknowledge(Head(gateway_seq, ""))
            self.gateway_head = None

    def _refill(self, first: int, last: int) -> None:
        """Put entries the gateway lost (it was restored from an older backup) back into the queue,
        from the ledger itself, and move the acknowledged seq back to what the gateway holds."""
        if self._ledger is None:
            self.local_head()
        with self.store.write() as txn:
            if self._ledger is not None:
                for entry in iter_entries(self._ledger, first):
                    if entry.seq > last:
                        break
                    txn.put(u64(entry.seq), json_encode(export_row(entry)), db=self.store.table(ENTRIES))
            txn.put(ACKED, u64(first), db=self.store.table("meta"))
        self.acked = first - 1

    def _check_head(self) -> None:
        """Idle: ask the gateway for its head now and then (this is what proves we are in sync)."""
        if self.gateway_head is not None and time.monotonic() - self._head_checked < 2.0:
            return
        if self.gateway_head is None and time.monotonic() - self._head_checked < 0.2:
            return
        self._head_checked = time.monotonic()
        try:
            self.gateway_head = self.client().head()
            self.breaker.success()
        except GatewayUnavailable:
            self.breaker.failure()
        except GatewayError as exc:
            self._forget_token_if_refused(exc)
            self.breaker.failure()
            self._alarm(str(exc.detail.get("code", "gateway_refused")), str(exc))
            return
        if self.gateway_head is not None and self.gateway_head.seq > self.acked:
            self._acknowledge(self.gateway_head)  # it holds more than we knew (our ack was lost)
        elif self.gateway_head is not None and self.gateway_head.seq < self.acked:
            self._resync(self.gateway_head.seq)

    def _post_checkpoint(self) -> None:
        """Idle and in step with the gateway: have the newest checkpoint it can check cosigned."""
        now = time.monotonic()
        if self.gateway_head is None or self._ledger is None or now - self._checkpoint_tried < CHECKPOINT_EVERY_S:
            return
        self._checkpoint_tried = now
        try:  # the newest checkpoint whose entries the gateway already holds
            note = checkpoint_at_most(self._ledger, self.gateway_head.seq + 1)
        except (KeyError, StoreError):
            return
        size = _checkpoint_size(note) if note else None
        if size is None or size <= self.cosigned_size or size == self._refused_checkpoint:
            return
        try:
            answer = self.client().post_checkpoint(note)
        except GatewayUnavailable:
            self.breaker.failure()
            return
        except GatewayError as exc:
            code = str(exc.detail.get("code", "checkpoint_refused"))
            if code == "not_held":
                return
            self._refused_checkpoint = size
            if code == "stale_checkpoint":
                self.log.warning("the gateway holds a newer checkpoint", size=size,
                                 last_size=exc.detail.get("last_size"))
                return
            self._alarm(f"checkpoint_{code}", str(exc))
            return
        self.breaker.success()
        cosigned = answer.get("cosigned_checkpoint")
        if not isinstance(cosigned, str) or answer.get("size") != size:
            self._alarm("checkpoint_receipt", f"unexpected answer to checkpoint {size}: {str(answer)[:300]}")
            self._refused_checkpoint = size
            return
        with self.store.write() as txn:
            txn.put(COSIGNED, cosigned.encode("utf-8"), db=self.store.table("meta"))
            txn.put(COSIGNED_SIZE, u64(size), db=self.store.table("meta"))
        self.cosigned_size = size
        self.log.info("checkpoint cosigned by the gateway", size=size, cosigner=answer.get("cosigner"),
                      state_transition="CHECKPOINT_COSIGNED")

    def _shown(self) -> tuple:
        """What a status is published at once for: the breaker's state (every one shows,
        HALF_OPEN included), the link state and epoch, and `in_sync` while RECONCILING (it ends
        RECONCILING). Backlog figures wait for the periodic status."""
        view = self.view()
        return (self.breaker.state, view["link"], view["link_epoch"],
                view["in_sync"] if view["link"] == RECONCILING else None)

    def _publish_status(self, force: bool = False) -> None:
        """At once (at most every STATUS_MIN_GAP_S) when what `_shown` covers changed; the
        stage runtime publishes the rest every `stage.status_interval_s`."""
        shown = self._shown()
        if not (force or self._status_due or self._status_waiting or shown != self._last_shown):
            return
        now = time.monotonic()
        if now - self._last_status < STATUS_MIN_GAP_S:
            self._status_waiting = True  # `_idle` publishes it when the gap has passed
            return
        self._status_due = self._status_waiting = False
        self._last_status = now
        self._last_shown = shown
        self._publish_status_cb()

    def _alarm(self, kind: str, detail: str) -> None:
        self.log.error("uplink alarm", alarm=kind, detail=detail[:500], state_transition="ALARM")
        self._publish(self.topics.alarm, json_encode(
            {"service": "uplink", "alarm": kind, "detail": detail[:500], "at": utc_now()}))


def _not_older(epoch: int | None, than: int | None) -> bool:
    """Whether a link state with `epoch` may replace one with `than` (no epoch: no order)."""
    return epoch is None or than is None or epoch >= than


def _checkpoint_size(note: bytes) -> int | None:
    """The tree size of a C2SP checkpoint note (its second line), without checking it: the
    gateway checks it, against the entries it holds."""
    lines = note.split(b"\n", 2)
    return int(lines[1]) if len(lines) > 2 and lines[1].isdigit() else None
