"""One client connection: reads packets, applies them to the broker, writes the answers.

The read loop is also where backpressure lives: while a publish cannot be taken (its
intake commit is still owed, the spool is at its budget, or a connected subscriber's queue is
full), the loop does not read the socket, so TCP pushes back on the publisher. Writes are
coalesced: everything sent during one loop iteration leaves in one `write`.
"""

from __future__ import annotations

import asyncio
import time

from services.broker import packets as p
from services.broker.core import Broker, Session
from services.broker.credentials import SERVICE_USERS
from shared.runtime.logs import get_logger

log = get_logger()

READ_CHUNK = 1 << 16
WAIT_SLICE_S = 1.0
REASONS = {p.BAD_PROTOCOL: "unsupported protocol version", p.IDENTIFIER_REJECTED: "client id refused",
           p.BAD_CREDENTIALS: "bad user name or password", p.NOT_AUTHORIZED: "not authorised"}


class Connection:
    def __init__(self, broker: Broker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.session: Session | None = None
        self.will: p.Publish | None = None
        self.keepalive = 0
        self.opened = self.last_seen = time.monotonic()
        self.uncommitted = 0
        self.room = asyncio.Event()
        self.room.set()
        self.splitter = p.PacketSplitter(broker.limits.device_max_packet)
        self.refused_publishes = 0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False

    # ---- output ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._closed:
            self.writer.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        """Close the socket; the read loop then ends and reports the disconnect."""
        if not self._closed:
            self._flush()
            self._closed = True
            self.writer.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- input -------------------------------------------------------------------------

    async def serve(self) -> None:
        graceful = False
        try:
            while not self._closed:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                self.last_seen = time.monotonic()
                for kind, flags, body in self.splitter.feed(data):
                    if kind == p.DISCONNECT and self.session is not None:
                        graceful = True
                        self.will = None
                        return
                    await self._dispatch(kind, flags, body)
                    if self._closed:
                        return
        except p.ProtocolError as exc:
            log.info("protocol error; connection closed", client_id=self._client_id, error=str(exc),
                     state_transition="CLIENT_PROTOCOL_ERROR")
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()
            if self.session is not None:
                self.broker.disconnected(self, self.session, publish_will=not graceful)

    @property
    def _client_id(self) -> str | None:
        return self.session.client_id if self.session else None

    async def _dispatch(self, kind: int, flags: int, body: bytes) -> None:
        session = self.session
        if session is None:
            if kind != p.CONNECT:
                raise p.ProtocolError("first packet is not CONNECT")
            self._connect(p.decode_connect(body))
            return
        if kind == p.PUBLISH:
            await self._publish(session, p.decode_publish(flags, body))
        elif kind == p.PUBACK:
            session.acknowledged(p.decode_packet_id(body))
        elif kind == p.PUBREL:
            packet_id = p.decode_packet_id(body)
            session.awaiting_release.discard(packet_id)
            self.send(p.ack(p.PUBCOMP, packet_id))
        elif kind in (p.PUBREC, p.PUBCOMP):
            p.decode_packet_id(body)  # we never send QoS 2, so there is nothing to complete
        elif kind == p.SUBSCRIBE:
            self._subscribe(session, *p.decode_subscribe(flags, body))
        elif kind == p.UNSUBSCRIBE:
            packet_id, topic_filters = p.decode_unsubscribe(flags, body)
            self.broker.unsubscribe(session, topic_filters)
            self.send(p.ack(p.UNSUBACK, packet_id))
        elif kind == p.PINGREQ:
            self.send(p.PINGRESP_PACKET)
        else:
            raise p.ProtocolError(f"unexpected packet type {kind}")

    def _subscribe(self, session: Session, packet_id: int, filters: list[tuple[str, int]]) -> None:
        """SUBACK first, then what is retained for the granted filters (and, for ingest, the spool)."""
        codes = self.broker.subscribe(session, filters)
        self.send(p.suback(packet_id, codes))
        granted = [(f, c) for (f, _), c in zip(filters, codes, strict=True) if c != p.SUBACK_FAILURE]
        for delivery in self.broker.retained_for(session, granted):
            session.deliver(delivery)
        if session.intake:
            self.broker.pump_intake()

    def _connect(self, connect: p.Connect) -> None:
        code, session, present = self.broker.admit(self, connect)
        self.send(p.connack(present, code))
        if session is None:
            self.broker.counters.refused += 1
            log.info("connection refused", client_id=connect.client_id, user=connect.username,
                     reason=REASONS.get(code, str(code)), state_transition="CLIENT_REFUSED")
            self.close()
            return
        self.session = session
        self.keepalive = connect.keepalive
        if session.username in SERVICE_USERS:
            self.splitter.max_packet = self.broker.limits.service_max_packet
        if connect.will_topic is not None:
            self.will = p.Publish(connect.will_topic, connect.will_payload, connect.will_qos,
                                  connect.will_retain)
        self.broker.counters.connections += 1
        log.debug("client connected", client_id=session.client_id, user=session.username,
                  session_present=present, state_transition="CLIENT_CONNECTED")
        if present:
            session.resume(self)
        else:
            session.connection = self

    async def _publish(self, session: Session, publish: p.Publish) -> None:
        if publish.qos == 2 and publish.packet_id in session.awaiting_release:
            self.send(p.ack(p.PUBREC, publish.packet_id))
            return
        broker = self.broker
        if not broker.may_publish(session, publish.topic):
            if not self.refused_publishes:
                log.warning("publish refused by the ACL", client_id=session.client_id, user=session.username,
                            topic=publish.topic, state_transition="PUBLISH_REFUSED")
            self.refused_publishes += 1
            self._acknowledge(session, publish)  # as Mosquitto does: the client must not retry it
            return
        if broker.is_intake(publish.topic):
            await self._wait_for_intake_room()
            self.uncommitted += 1
            broker.spool_publish(self, publish)
            return
        full = broker.route(publish.topic, publish.payload, publish.qos, retain=publish.retain)
        self._acknowledge(session, publish)
        for target in full:
            while target is not session and target.full and target.connection is not None \
                    and not self._closed:
                await _wait(target.room)

    async def _wait_for_intake_room(self) -> None:
        broker = self.broker
        while not self._closed:
            if self.uncommitted >= broker.limits.max_uncommitted:
                self.room.clear()
                await _wait(self.room)
            elif broker.intake_blocked:
                broker.room_for_intake.clear()
                await _wait(broker.room_for_intake)
            else:
                return

    def committed(self, publish: p.Publish) -> None:
        """The spool commit holding `publish` returned: now it may be acknowledged."""
        self.uncommitted -= 1
        if self.session is not None:
            self._acknowledge(self.session, publish)
        if self.uncommitted < self.broker.limits.max_uncommitted:
            self.room.set()

    def _acknowledge(self, session: Session, publish: p.Publish) -> None:
        if publish.qos == 1:
            self.send(p.ack(p.PUBACK, publish.packet_id))
        elif publish.qos == 2:
            session.awaiting_release.add(publish.packet_id)
            self.send(p.ack(p.PUBREC, publish.packet_id))


async def _wait(event: asyncio.Event) -> None:
    """Wait for `event`, but wake at least every second so a closed connection stops waiting."""
    try:
        await asyncio.wait_for(event.wait(), WAIT_SLICE_S)
    except TimeoutError:
        pass
