"""The embedded MQTT broker (amqtt 0.12.1) with the same access control as Mosquitto.

What amqtt 0.12.1 does, read from its source and tried against a running broker (the access
control and session items are pinned by tests/integration/test_broker_acl.py). The stage
runtime must not rely on the broker for durability (DESIGN.md section 1):

- Config: `Broker(config_dict)`; plugins are a dict `{"dotted.Class": {options}}` whose options
  fill the plugin's `Config` dataclass. Giving `plugins` replaces the defaults (anonymous auth,
  $SYS every 20 s, EventLogger and PacketLogger on every packet), so only ours run.
- Everything is in memory: sessions, subscriptions, retained messages and the queues of
  offline sessions are gone after a restart (a persistent client reconnects with
  session_present=0 and must subscribe again). amqtt.contrib.persistence can store them in
  SQLite but needs SQLAlchemy and writes on every event; not used.
- Persistent sessions (clean_session=False, fixed client id): QoS1/2 messages for a
  disconnected session are queued (unbounded asyncio.Queue) and sent on reconnect. Stock
  amqtt sends all of them at once with the RETAIN flag set; `AclBroker` below sends them in
  order, at most MAX_INFLIGHT unacknowledged, with RETAIN clear, as Mosquitto does.
- QoS1 out: every delivery is its own task waiting for PUBACK; after 5 s (hard-coded) the
  message is dropped from the session, no redelivery. Messages in flight when the client
  disconnects are dropped too. There is no in-flight limit for live traffic.
- QoS: a message goes out at the subscription's QoS, not min(publish, subscription), once
  per matching subscription (a client with overlapping filters gets duplicates; Mosquitto
  sends one copy).
- Incoming QoS1 is PUBACKed as soon as it is queued in memory.
- Retained messages: kept per topic in memory; stock amqtt also sends every retained message
  that matches ANY client's subscription to each connecting client, bypassing the ACL;
  `AclBroker` sends only what matches the client's own subscriptions and its read ACL
  (a persistent session gets them again at QoS0 on reconnect; Mosquitto only on SUBSCRIBE).
- Will messages: sent on abnormal disconnect; will_retain honoured; the ACL is applied at
  CONNECT (plugins.py). Keep-alive is not enforced: a silent, half-open client stays
  "connected" until TCP gives up (Mosquitto drops it after 1.5 x keep-alive). A killed
  process is noticed at once because its kernel closes the socket.
- Publishing to a topic that starts with `$` disconnects the client (Mosquitto ignores it).
- Max message size: none enforced (up to MQTT's 256 MB); the ingest stage enforces
  limits.max_message_bytes.
- Throughput: plugin calls are tasks per message and per subscriber; amqtt logs a line at
  INFO for every refused delivery, so its loggers are set to WARNING here. Measured with the
  ACL plugins: ~4,000 QoS1 messages/s of 1 KB from one device to one subscriber (Mosquitto:
  ~10,000, where the paho test client is the limit).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError
from amqtt.session import Session

from services.broker.plugins import credentials_for
from shared.config import Config
from shared.credentials import BrokerCredentials

log = logging.getLogger(__name__)

MAX_INFLIGHT = 1000
SESSION_EXPIRY_S = 30 * 86400
REVOKE_POLL_S = 1.0


class PortInUseError(RuntimeError):
    """The MQTT port is already bound, almost always by a Mosquitto that is already running."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"MQTT port {host}:{port} is taken (probably Mosquitto). Either set another port with "
            "MRO_MQTT_URL=mqtt://127.0.0.1:1884 or pass --no-broker to use the broker already there."
        )
        self.host, self.port = host, port


class _SnapshotDict(dict):
    """amqtt iterates its subscription table across `await`s (`_run_broadcast`), so a client
    subscribing meanwhile raised "dictionary changed size during iteration" and the message being
    broadcast was dropped. Iterating over a snapshot makes that impossible."""

    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):
        return list(super().items())

    def keys(self):
        return list(super().keys())

    def values(self):
        return list(super().values())


class AclBroker(Broker):
    """amqtt's Broker with two delivery paths fixed so that they respect the ACL and match Mosquitto,
    and its subscription table made safe to change while a message is broadcast."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotDict(self._subscriptions)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(held.client_id == session.client_id for held, _ in holders):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and await self._topic_filtering(
                session, topic=topic, action=Action.RECEIVE
            ):
                sends.append(
                    asyncio.ensure_future(
                        handler.mqtt_publish(topic, retained.data, min(qos, retained.qos or qos), retain=True)
                    )
                )
        if sends:
            await asyncio.wait(sends)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        window = asyncio.Semaphore(MAX_INFLIGHT)

        async def deliver(topic: str, data: bytes | bytearray, qos: int | None) -> None:
            try:
                await handler.mqtt_publish(topic, data, qos, retain=False)
            except (TimeoutError, OSError, AMQTTError) as exc:
                log.warning("queued message for %s on %s not delivered: %s", session.client_id, topic, exc)
            finally:
                window.release()

        sends = []
        while not session.retained_messages.empty():
            message = session.retained_messages.get_nowait()
            await window.acquire()
            sends.append(asyncio.ensure_future(deliver(message.topic, message.data, message.qos)))
        if sends:
            await asyncio.wait(sends)


def broker_config(config: Config) -> dict[str, Any]:
    """The amqtt config dict for this station: one TCP listener, our two plugins only."""
    options = {"broker_dir": str(config.data_path / "broker"), "station": config.station}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{config.mqtt.host}:{config.mqtt.port}"}},
        "session_expiry_interval": SESSION_EXPIRY_S,
        "plugins": {
            "services.broker.plugins.PasswordFileAuthPlugin": options,
            "services.broker.plugins.AclFileTopicPlugin": options,
        },
    }


async def _revoke_stale_sessions(broker: Broker, credentials: BrokerCredentials) -> None:
    """On a change of the files, disconnect clients whose password no longer matches
    (removed or rotated devices), as Mosquitto does when it re-reads them on SIGHUP."""
    seen = credentials.file_state()
    while True:
        await asyncio.sleep(REVOKE_POLL_S)
        state = credentials.file_state()
        if state == seen:
            continue
        seen = state
        for session, handler in list(broker.sessions.values()):
            if session.transitions.state != "connected":
                continue
            if not credentials.check(session.username or "", session.password or ""):
                log.warning("disconnecting %r (user %r): credentials revoked", session.client_id, session.username)
                await handler.handle_connection_closed()


def _check_port_free(host: str, port: int) -> None:
    """Fail with PortInUseError before amqtt logs a traceback for the same condition."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # amqtt reports an unresolvable host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(host, port) from None
                raise


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run the broker until `stop` is set."""
    credentials = credentials_for(config.data_path / "broker", config.station)
    credentials.ensure_service_user()
    _check_port_free(config.mqtt.host, config.mqtt.port)
    broker = AclBroker(broker_config(config))
    try:
        await broker.start()
    except BrokerError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            raise PortInUseError(config.mqtt.host, config.mqtt.port) from None
        raise
    log.info("amqtt broker listening on %s:%s", config.mqtt.host, config.mqtt.port)
    revoker = asyncio.create_task(_revoke_stale_sessions(broker, credentials))
    try:
        await stop.wait()
    finally:
        revoker.cancel()
        await asyncio.gather(revoker, return_exceptions=True)
        await broker.shutdown()
        log.info("amqtt broker stopped")


def run_broker(config: Config) -> None:
    """Blocking: serve MQTT on config.mqtt.url until SIGTERM or SIGINT."""
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop)

    asyncio.run(main())
