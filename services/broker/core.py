"""The embedded broker's state: sessions, subscriptions, routing, and the durable intake path.

Guarantees (each pinned by tests/integration/test_broker_acl.py and test_intake_stock.py):

- A QoS 1/2 publish on `mro/<station>/in/...` is acknowledged (PUBACK/PUBREC) only after it
  sits in a synced LMDB commit of the intake spool. Publishes from every connection are
  grouped into one commit, so the cost of fsync is shared.
- The ingest service's persistent session (`mro-<station>-ingest-<tag>`, user `mro-ingest`) is fed from the spool, in
  order, at most `max_inflight` unacknowledged; an entry is deleted only when ingest PUBACKs
  it (after its own commit). Nothing in between lives only in memory.
- Any other persistent session keeps its unacknowledged QoS 1 messages until PUBACK and
  re-sends them with DUP on reconnect; nothing times out. Behind the in-flight window is a
  queue; a full queue of a connected session stops the publisher (its socket is not read)
  until the consumer catches up. Only a disconnected session's full queue drops its oldest
  message, counted in the broker status (the stages' outboxes re-send their own traffic).
- A connection is authenticated before any session is touched. A session belongs to the user
  that made it: another user cannot take it over or wipe it, and client ids starting with
  `mro-` are reserved for the services, each service's own ids for its own user alone
  (`BrokerCredentials.owns_client_id`). Every delivery, queued or live, passes the
  read ACL of the session's user.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb

from services.broker import packets as p
from services.broker.credentials import (
    BrokerCredentials,
    CredentialsError,
    service_client_id,
    service_user,
    topic_matches,
    valid_filter,
)
from services.broker.spool import Spool, SpoolEntry, SpoolFull
from shared.runtime.budget import Guard, is_disk_full
from shared.runtime.logs import get_logger
from shared.runtime.topics import Topics

if TYPE_CHECKING:
    from services.broker.connection import Connection

log = get_logger()


@dataclass(frozen=True, slots=True)
class Limits:
    max_inflight: int = 1000           # unacknowledged QoS 1 deliveries per session
    max_queued: int = 100_000          # queued behind them, per session
    max_queued_bytes: int = 64 << 20
    max_uncommitted: int = 1000        # intake publishes awaiting their commit, per connection
    max_uncommitted_total: int = 20_000
    max_spool_records: int = 2_000_000  # beyond this, device publishers wait (disk budget)
    commit_batch: int = 5000
    device_max_packet: int = 1 << 20
    service_max_packet: int = 256 << 20
    session_expiry_s: float = 30 * 86400
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Login:
    """Who a CONNECT authenticated as, under which client id."""

    username: str
    password: str
    client_id: str


@dataclass(slots=True)
class Delivery:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    spool_seq: int = 0


class Session:
    """What the broker keeps for one client id, connected or not."""

    __slots__ = ("client_id", "username", "password", "persistent", "intake", "subscriptions", "inflight",
                 "queue", "queued_bytes", "next_packet_id", "connection", "awaiting_release",
                 "disconnected_at", "dropped", "room", "broker")

    def __init__(self, broker: Broker, client_id: str, username: str, password: str,
                 persistent: bool) -> None:
        self.broker = broker
        self.client_id = client_id
        self.username = username
        self.password = password
        self.persistent = persistent
        self.intake = client_id == broker.intake_client and username == service_user("ingest")
        self.subscriptions: dict[str, int] = {}
        self.inflight: dict[int, Delivery] = {}
        self.queue: deque[Delivery] = deque()
        self.queued_bytes = 0
        self.next_packet_id = 1
        self.connection: Connection | None = None
        self.awaiting_release: set[int] = set()
        self.disconnected_at = 0.0
        self.dropped = 0
        self.room = asyncio.Event()
        self.room.set()

    @property
    def full(self) -> bool:
        limits = self.broker.limits
        return len(self.queue) >= limits.max_queued or self.queued_bytes >= limits.max_queued_bytes

    @property
    def wants_intake(self) -> bool:
        """The ingest session, once it subscribed at QoS >= 1 to the device `in` topics."""
        probe = self.broker.topics.device_in("k", "d")
        return self.intake and any(q and topic_matches(f, probe) for f, q in self.subscriptions.items())

    def deliver(self, delivery: Delivery) -> None:
        connection = self.connection
        if delivery.qos == 0:
            if connection is not None:
                connection.send(p.encode_publish(delivery.topic, delivery.payload, 0, retain=delivery.retain))
            return
        if connection is not None and not self.queue and len(self.inflight) < self.broker.limits.max_inflight:
            self._send(delivery, connection)
            return
        if self.full and connection is None:
            oldest = self.queue.popleft()
            self.queued_bytes -= len(oldest.payload)
            self.dropped += 1
            self.broker.dropped += 1
        self.queue.append(delivery)
        self.queued_bytes += len(delivery.payload)
        if self.full:
            self.room.clear()

    def _send(self, delivery: Delivery, connection: Connection) -> None:
        packet_id = self.next_packet_id
        while packet_id in self.inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        self.inflight[packet_id] = delivery
        connection.send(p.encode_publish(delivery.topic, delivery.payload, 1, retain=delivery.retain,
                                         packet_id=packet_id))

    def acknowledged(self, packet_id: int) -> None:
        delivery = self.inflight.pop(packet_id, None)
        if delivery is None:
            return
        if delivery.spool_seq:
            self.broker.spool_acknowledged(delivery.spool_seq)
        self.fill()

    def fill(self) -> None:
        """Move queued messages into the in-flight window, then (ingest) spool entries."""
        connection = self.connection
        if connection is None:
            return
        window = self.broker.limits.max_inflight
        while self.queue and len(self.inflight) < window:
            delivery = self.queue.popleft()
            self.queued_bytes -= len(delivery.payload)
            if self.broker.may_receive(self, delivery.topic):
                self._send(delivery, connection)
        if not self.full:
            self.room.set()
        if self.intake:
            self.broker.pump_intake()

    def resume(self, connection: Connection) -> None:
        """A reconnect to an existing session: unacknowledged messages again, marked DUP."""
        self.connection = connection
        for packet_id, delivery in self.inflight.items():
            connection.send(p.encode_publish(delivery.topic, delivery.payload, 1, retain=delivery.retain,
                                             dup=True, packet_id=packet_id))
        self.fill()


@dataclass(slots=True)
class PendingPublish:
    connection: Connection | None
    publish: p.Publish


@dataclass
class Counters:
    connections: int = 0
    refused: int = 0
    spool_commits: int = 0
    spool_records: int = 0
    commit_errors: int = 0
    last_commit_error: str = ""


class Broker:
    """All sessions and subscriptions of one station's broker, on one asyncio loop."""

    def __init__(self, credentials: BrokerCredentials, spool: Spool, topics: Topics,
                 limits: Limits | None = None) -> None:
        self.credentials = credentials
        self.spool = spool
        self.topics = topics
        self.limits = limits or Limits()
        self.intake_prefix = topics.root + "/in/"
        self.intake_client = self._intake_client()
        self.sessions: dict[str, Session] = {}
        self.exact: dict[str, dict[Session, int]] = {}
        self.wild: dict[str, dict[Session, int]] = {}
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.pending: deque[PendingPublish] = deque()
        self.to_delete: list[int] = []
        self.acked_seqs: set[int] = set()
        self.spool_cursor = 0
        self.dropped = 0
        self.counters = Counters()
        self.commit_wanted = asyncio.Event()
        self.storage_guard: Guard | None = None  # the storage budget, set by the server
        self.room_for_intake = asyncio.Event()
        self.room_for_intake.set()
        self._acl: dict[tuple[str, str, str, int], bool] = {}
        self._files = credentials.file_state()

    def _intake_client(self) -> str:
        """The ingest service's client id (derived from its password, as the service derives it)."""
        try:
            _, password = self.credentials.service_login("ingest")
        except (CredentialsError, OSError):
            return ""
        return service_client_id(self.topics.station, "ingest", password)

    # ---- access control (cached; the cache is dropped whenever the files change) ----------

    def _allowed(self, username: str, client_id: str, topic: str, access: int) -> bool:
        key = (username, client_id, topic, access)
        decision = self._acl.get(key)
        if decision is None:
            if len(self._acl) > 200_000:
                self._acl.clear()
            check = self.credentials.may_publish if access == 2 else self.credentials.may_receive
            decision = self._acl[key] = check(username, topic, client_id)
        return decision

    def may_receive(self, session: Session, topic: str) -> bool:
        return self._allowed(session.username, session.client_id, topic, 1)

    def may_publish(self, session: Session, topic: str) -> bool:
        return not topic.startswith("$") and self._allowed(session.username, session.client_id, topic, 2)

    def refresh_credentials(self) -> None:
        """After `devices add/remove`: drop cached decisions and every session whose login no
        longer holds (removed or re-registered devices), as Mosquitto does on SIGHUP."""
        state = self.credentials.file_state()
        if state == self._files:
            return
        self._files = state
        self._acl.clear()
        self.intake_client = self._intake_client()
        for session in list(self.sessions.values()):
            if not self.credentials.check(session.username, session.password):
                log.warning("session revoked", client_id=session.client_id, user=session.username,
                            state_transition="SESSION_REVOKED")
                if session.connection is not None:
                    session.connection.close()
                self.discard(session)

    # ---- connect / disconnect ------------------------------------------------------------

    def admit(self, connection: Connection, connect: p.Connect) -> tuple[int, Session | None, bool]:
        """(CONNACK code, session, session_present). Authenticates before touching any session."""
        code, login = self._authenticate(connection, connect)
        if login is None:
            return code, None, False
        if connect.will_topic is not None and not self._allowed(login.username, login.client_id,
                                                                connect.will_topic, 2):
            connect.will_topic = None  # Mosquitto 2.0: a will the ACL forbids is dropped, not refused
        existing = self.sessions.get(login.client_id)
        if existing is not None and existing.connection is not None:
            self._take_over(existing)
        if existing is not None and (connect.clean_session or not existing.persistent):
            self.discard(existing)
            existing = None
        if existing is not None:
            existing.password = login.password
            existing.persistent = not connect.clean_session
            return p.ACCEPTED, existing, True
        session = Session(self, login.client_id, login.username, login.password, not connect.clean_session)
        self.sessions[login.client_id] = session
        if session.intake:
            self.spool_cursor = 0  # a new ingest session gets every entry not yet acknowledged
        return p.ACCEPTED, session, False

    def _authenticate(self, connection: Connection, connect: p.Connect) -> tuple[int, Login | None]:
        """The CONNACK code, and the login when it is ACCEPTED (a clean session without a client id
        gets one made up). The reserved `mro-` ids and other users' sessions are refused here."""
        if connect.protocol_level not in (3, 4):
            return p.BAD_PROTOCOL, None
        username, password = connect.username, connect.password
        if not username or password is None or not self.credentials.check(username, password):
            return (p.BAD_CREDENTIALS if username else p.NOT_AUTHORIZED), None
        client_id = connect.client_id
        if not client_id:
            if not connect.clean_session:
                return p.IDENTIFIER_REJECTED, None
            client_id = f"auto-{id(connection):x}-{time.monotonic_ns()}"
        if not self.credentials.owns_client_id(username, client_id):
            return p.NOT_AUTHORIZED, None
        existing = self.sessions.get(client_id)
        if existing is not None and existing.username != username:
            return p.IDENTIFIER_REJECTED, None
        return p.ACCEPTED, Login(username, password, client_id)

    def _take_over(self, session: Session) -> None:
        """The same user connects again with this client id: the old connection goes, and its will
        is published now, so it cannot arrive after what the new connection publishes."""
        old = session.connection
        if old is None:
            return
        log.warning("session taken over", client_id=session.client_id, user=session.username,
                    state_transition="SESSION_TAKEN_OVER")
        if old.will is not None:
            self.publish_internal(old.will)
            old.will = None
        old.close()
        session.connection = None
        session.disconnected_at = time.monotonic()

    def disconnected(self, connection: Connection, session: Session, *, publish_will: bool) -> None:
        if publish_will and connection.will is not None:
            self.publish_internal(connection.will)
        if session.connection is not connection:
            return
        session.connection = None
        session.disconnected_at = time.monotonic()
        session.room.set()  # publishers waiting for it may go on: its queue now drops oldest
        if not session.persistent:
            self.discard(session)

    def discard(self, session: Session) -> None:
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        for topic_filter in list(session.subscriptions):
            self._unindex(session, topic_filter)
        session.subscriptions.clear()
        session.room.set()

    def expire_sessions(self) -> None:
        cutoff = time.monotonic() - self.limits.session_expiry_s
        for session in list(self.sessions.values()):
            if session.connection is None and session.disconnected_at < cutoff:
                log.info("session expired", client_id=session.client_id, state_transition="SESSION_EXPIRED")
                self.discard(session)

    # ---- subscriptions -------------------------------------------------------------------

    def subscribe(self, session: Session, filters: list[tuple[str, int]]) -> list[int]:
        codes = []
        for topic_filter, qos in filters:
            if not valid_filter(topic_filter) or not self.credentials.may_subscribe(
                    session.username, topic_filter, session.client_id):
                codes.append(p.SUBACK_FAILURE)
                continue
            granted = min(qos, 1)
            session.subscriptions[topic_filter] = granted
            index = self.wild if ("+" in topic_filter or "#" in topic_filter) else self.exact
            index.setdefault(topic_filter, {})[session] = granted
            codes.append(granted)
        return codes

    def retained_for(self, session: Session, filters: list[tuple[str, int]]) -> list[Delivery]:
        found = []
        for topic, (payload, qos) in self.retained.items():
            for topic_filter, granted in filters:
                if topic_filter in session.subscriptions and _matches(topic_filter, topic) \
                        and self.may_receive(session, topic):
                    found.append(Delivery(topic, payload, min(qos, granted), retain=True))
                    break
        return found

    def unsubscribe(self, session: Session, filters: list[str]) -> None:
        for topic_filter in filters:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self._unindex(session, topic_filter)

    def _unindex(self, session: Session, topic_filter: str) -> None:
        for index in (self.exact, self.wild):
            holders = index.get(topic_filter)
            if holders and holders.pop(session, None) is not None and not holders:
                del index[topic_filter]

    # ---- routing -------------------------------------------------------------------------

    def is_intake(self, topic: str) -> bool:
        return topic.startswith(self.intake_prefix)

    def route(self, topic: str, payload: bytes, qos: int, *, retain: bool = False,
              skip_intake: bool = False) -> list[Session]:
        """Deliver to every matching session (one copy each, at the highest matching QoS, capped by
        the publish QoS). Returns the connected sessions now over their queue bound."""
        if retain and not self.is_intake(topic):
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        targets: dict[Session, int] = dict(self.exact.get(topic, ()))
        for topic_filter, holders in self.wild.items():
            if _matches(topic_filter, topic):
                for session, granted in holders.items():
                    if granted > targets.get(session, -1):
                        targets[session] = granted
        full = []
        for session, granted in targets.items():
            if (skip_intake and session.intake) or not self.may_receive(session, topic):
                continue
            session.deliver(Delivery(topic, payload, min(qos, granted)))
            if session.full and session.connection is not None:
                full.append(session)
        return full

    def publish_internal(self, publish: p.Publish) -> None:
        """A will or the broker's own status: routed, or spooled if it is an intake topic."""
        if self.is_intake(publish.topic):
            self.pending.append(PendingPublish(None, publish))
            self.commit_wanted.set()
        else:
            self.route(publish.topic, publish.payload, publish.qos, retain=publish.retain)

    # ---- the durable intake path -----------------------------------------------------------

    @property
    def intake_blocked(self) -> bool:
        limits = self.limits
        return (len(self.pending) >= limits.max_uncommitted_total
                or self.spool.depth >= limits.max_spool_records)

    def spool_publish(self, connection: Connection, publish: p.Publish) -> None:
        self.pending.append(PendingPublish(connection, publish))
        self.commit_wanted.set()
        if self.intake_blocked:
            self.room_for_intake.clear()

    def spool_acknowledged(self, seq: int) -> None:
        self.acked_seqs.add(seq)
        self.to_delete.append(seq)
        if len(self.to_delete) >= 500:
            self.commit_wanted.set()

    def pump_intake(self) -> None:
        """Hand spool entries to the ingest session while its in-flight window has room."""
        session = self.sessions.get(self.intake_client)
        if session is None or session.connection is None or not session.wants_intake:
            return
        room = self.limits.max_inflight - len(session.inflight)
        while room > 0 and self.spool_cursor < self.spool.next_seq - 1:
            entries = self.spool.read_after(self.spool_cursor, room)
            if not entries:
                self.spool_cursor = self.spool.next_seq - 1
                return
            for item in entries:
                self.spool_cursor = item.seq
                if item.seq in self.acked_seqs:
                    continue
                session._send(Delivery(item.entry.topic, item.entry.payload, 1, spool_seq=item.seq),
                              session.connection)
                room -= 1

    async def run_committer(self) -> None:
        """Group commit: everything that arrived while the last commit ran goes into the next."""
        while True:
            await self.commit_wanted.wait()
            await asyncio.sleep(0)  # let every connection with data ready add to this group first
            self.commit_wanted.clear()
            if not self.pending and not self.to_delete:
                continue
            batch = [self.pending.popleft() for _ in range(min(len(self.pending), self.limits.commit_batch))]
            deletes, self.to_delete = self.to_delete, []
            entries = [SpoolEntry(item.publish.topic, item.publish.payload, time.time()) for item in batch]
            try:
                self.spool.commit(entries, deletes)
            except (lmdb.Error, SpoolFull) as exc:
                if self.storage_guard is not None and is_disk_full(exc):
                    self.storage_guard.disk_full(exc)  # refused until a measurement finds room
                self.pending.extendleft(reversed(batch))
                if deletes and self._delete_only(deletes):
                    deletes = []  # what ingest already holds is gone: room for the next try
                self.to_delete = deletes + self.to_delete
                self.counters.commit_errors += 1
                self.counters.last_commit_error = type(exc).__name__
                log.error("spool commit failed; publishers are not acknowledged", error=type(exc).__name__,
                          waiting=len(self.pending), state_transition="SPOOL_COMMIT_FAILED")
                self.room_for_intake.clear()
                await asyncio.sleep(1.0)
                self.commit_wanted.set()
                continue
            self.counters.spool_commits += 1
            self.counters.spool_records += len(batch)
            self.acked_seqs.difference_update(deletes)
            for item in batch:
                publish = item.publish
                if item.connection is not None:
                    item.connection.committed(publish)
                self.route(publish.topic, publish.payload, publish.qos, skip_intake=True)
            self.pump_intake()
            if not self.intake_blocked:
                self.room_for_intake.set()
            if self.pending:
                self.commit_wanted.set()

    def _delete_only(self, deletes: list[int]) -> bool:
        """On a full store, deleting what ingest has acknowledged may be exactly what frees the
        pages the next append needs."""
        try:
            self.spool.commit([], deletes)
        except lmdb.Error:
            return False
        self.acked_seqs.difference_update(deletes)
        return True

    def flush_deletes_soon(self) -> None:
        if self.to_delete:
            self.commit_wanted.set()

    def close(self) -> None:
        self.spool.close()

    def status(self) -> dict:
        return {
            "clients": sum(1 for s in self.sessions.values() if s.connection is not None),
            "sessions": len(self.sessions),
            "spool_depth": self.spool.depth,
            "awaiting_commit": len(self.pending),
            "queued": sum(len(s.queue) for s in self.sessions.values()),
            "dropped_offline": self.dropped,
            "spool_commits": self.counters.spool_commits,
            "spooled": self.counters.spool_records,
            "spool_commit_errors": self.counters.commit_errors,
            "spool_fault": "" if self.room_for_intake.is_set() else self.counters.last_commit_error,
            "refused_connects": self.counters.refused,
        }


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching; `#` and `+` at the first level do not match `$` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return topic_matches(topic_filter, topic)

