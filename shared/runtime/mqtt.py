"""paho-mqtt client set up the way every stage needs it.

Fixed client id + persistent session (clean_session=False) so the broker keeps QoS1 messages
for us while we are away; manual acks so a message is acked only after our LMDB commit.
Subscriptions are renewed on every connect because a broker restarted without persistence
(the embedded broker keeps sessions in memory) forgets them.

Every callback paho runs for us (on_connect and its hooks, on_message, the `direct` and `watch`
handlers, on_disconnect) runs inside a guard: an exception there would otherwise end paho's
network thread while the process lives on, deaf (no messages, no acks, no reconnects). The
guard logs one structured error (`state_transition` FATAL, the callback, the exception type and
where it was raised) and ends the process with FATAL_EXIT, so the supervisor restarts it; what
was committed is durable and what was not is redelivered, as after kill -9.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from services.broker.credentials import topic_matches
from shared.runtime import clock
from shared.runtime.config import Config, MqttConfig
from shared.runtime.logs import get_logger
from shared.runtime.tls import TlsProblem, client_context, explain

FATAL_EXIT = 70  # EX_SOFTWARE: not REFUSED_EXIT (3), so the supervisor restarts the service
CONTESTED_DROPS = 3  # this many unrequested disconnects ...
CONTESTED_WINDOW_S = 30.0  # ... within this window mean someone else holds our client id


class BrokerUnavailable(Exception):
    """The broker could not be reached in time; the message says where we looked."""


def use_tls(client: paho.Client, mqtt: MqttConfig) -> None:
    """mqtts://: the project's client context (broker certificate and host name verified,
    optional client certificate); nothing for plain mqtt://. Raises TlsProblem."""
    context = client_context(mqtt)
    if context is not None:
        client.tls_set_context(context)


def diagnose(mqtt: MqttConfig, timeout: float = 3.0) -> str:
    """Why a client cannot talk to the broker at mqtt.url, checked with one bare connection:
    the TLS handshake explained, or that nothing answered; empty when the handshake is fine."""
    try:
        context = client_context(mqtt)
        sock = socket.create_connection((mqtt.host, mqtt.port), timeout=timeout)
    except TlsProblem as exc:
        return str(exc)
    except OSError as exc:
        return f"nothing answered at {mqtt.url} ({exc.strerror or exc})"
    with sock:
        if context is None:
            return ""
        try:
            with context.wrap_socket(sock, server_hostname=mqtt.host) as tls:
                # TLS 1.3 refuses a client certificate after the handshake: read for that answer
                tls.settimeout(0.5)
                try:
                    if not tls.recv(1):
                        return explain(ConnectionResetError("closed right after the handshake"), mqtt)
                except TimeoutError:
                    pass
        except OSError as exc:
            return explain(exc, mqtt)
    return ""


@dataclass(slots=True)
class Inbound:
    """One message handed from paho's network thread to the stage's worker."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int
    received_at: float = field(default_factory=lambda: clock.current().time())  # the box's clock seam
    retain: bool = False  # sent because it was retained (on subscribe), not published just now


def service_credentials(config: Config, service: str) -> tuple[str, str]:
    """The broker login of one of the box's services (`operator` for the CLI): the configured
    one (mqtt.username with mqtt.password_file or mqtt.password), else the service's own file
    under `$MRO_DATA_DIR/secrets/` (made with every service user when missing)."""
    if config.mqtt.username:
        if config.mqtt.password_file:
            try:
                with open(config.mqtt.password_file, encoding="utf-8") as f:
                    password = f.readline().strip()
            except OSError as exc:
                raise BrokerUnavailable(f"cannot read MRO_MQTT_PASSWORD_FILE {config.mqtt.password_file}: "
                                        f"{exc.strerror}") from None
            return config.mqtt.username, password
        return config.mqtt.username, config.mqtt.password
    from services.broker.credentials import BrokerCredentials

    return BrokerCredentials(config.data_path / "broker", config.station).service_login(service)


def client_id_for(config: Config, client: str, credentials: tuple[str, str]) -> str:
    """The fixed client id of a service's connection, `mro-<station>-<client>-<tag>`: stable
    (its persistent session survives restarts). Both brokers keep it for the service's own user
    (`broker/clientids`); the tag keeps it unguessable on a Mosquitto run without that check."""
    from services.broker.credentials import service_client_id

    return service_client_id(config.station, client, credentials[1])


def set_nodelay(client: paho.Client) -> None:
    """paho leaves Nagle on: a PUBACK followed by a small publish then waits for the peer's
    delayed ACK (~40 ms per hop). Records are small and latency matters, so turn it off."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """A connected paho client feeding `inbox`; safe to publish and ack from the worker thread."""

    def __init__(
        self,
        config: Config,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]] = (),
        *,
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
        credentials: tuple[str, str] | None = None,
    ):
        self.config = config
        self.subscriptions = list(subscriptions)
        self.inbox: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self.connected = threading.Event()
        self.generation = 0
        self.on_connect_hooks: list[Callable[[], None]] = []
        # handled in paho's thread instead of the inbox: `direct` gets the payload, `watch` the
        # whole Inbound (with its retain flag); both are acked once the handler returned
        self.direct: dict[str, Callable[[bytes], None]] = {}
        self.watch: dict[str, Callable[[Inbound], None]] = {}
        self.fatal: Callable[[str, BaseException], None] = fatal_exit
        # session trouble: another client kicking us off (same client id), or a session the
        # broker no longer had; `on_trouble(kind, detail)` hooks raise the alarm
        self.persistent = persistent
        self.on_trouble: list[Callable[[str, str], None]] = []
        self.session_resets = 0
        self._drops: collections.deque[float] = collections.deque(maxlen=CONTESTED_DROPS)
        self._stopping = False
        self._wanted: dict[str, bool] = {}
        self.unsolicited = 0
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        # no login given: the operator's (the CLI's commands); every service passes its own
        client.username_pw_set(*(credentials or service_credentials(config, "operator")))
        use_tls(client, config.mqtt)
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=0.2, max_delay=5)  # type: ignore[arg-type]  # paho takes floats
        client.on_connect = self._guarded("on_connect", self._on_connect)
        client.on_disconnect = self._guarded("on_disconnect", self._on_disconnect)
        client.on_message = self._guarded("on_message", self._on_message)
        self.client = client

    def _guarded(self, name: str, callback: Callable) -> Callable:
        """`callback` as paho must see it: it never raises into paho's network thread."""
        def guarded(*args) -> None:
            try:
                callback(*args)
            except BaseException as exc:  # anything that would end the network thread
                self.fatal(name, exc)
        return guarded

    def _on_connect(self, client, _userdata, flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            return
        set_nodelay(client)
        if self.generation and self.persistent and not flags.session_present:
            self.session_resets += 1
            self._trouble("session_lost", "the broker no longer had this service's session")
        self.generation += 1
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        self.connected.set()
        for hook in self.on_connect_hooks:
            try:
                hook()
            except BaseException as exc:
                self.fatal(f"on_connect hook {_name(hook)}", exc)

    def _on_disconnect(self, _client, _userdata, _flags, _reason_code, _properties) -> None:
        self.connected.clear()
        if self._stopping:
            return
        was_contested = self.contested
        self._drops.append(time.monotonic())
        if self.contested and not was_contested:
            self._trouble("session_contested",
                          f"disconnected {CONTESTED_DROPS} times within {CONTESTED_WINDOW_S:.0f} s: "
                          "another client is probably using this service's client id")

    @property
    def contested(self) -> bool:
        """Kicked off repeatedly: on Mosquitto, another client connecting with our client id."""
        return len(self._drops) == CONTESTED_DROPS and time.monotonic() - self._drops[0] < CONTESTED_WINDOW_S

    def _trouble(self, kind: str, detail: str) -> None:
        get_logger().error("mqtt session trouble", alarm=kind, detail=detail, state_transition=kind.upper())
        for hook in self.on_trouble:
            hook(kind, detail)

    def _on_message(self, _client, _userdata, message: paho.MQTTMessage) -> None:
        if not self._subscribed(message.topic):
            self._unsolicited(message)
            return
        if handler := self.direct.get(message.topic):
            try:
                handler(message.payload)
            except BaseException as exc:
                self.fatal(f"handler {_name(handler)} of {message.topic}", exc)
            if message.qos:
                self.client.ack(message.mid, message.qos)
            return
        inbound = Inbound(message.topic, message.payload, message.qos, message.mid, self.generation,
                          retain=bool(message.retain))
        if watcher := self.watch.get(message.topic):
            try:
                watcher(inbound)
            except BaseException as exc:
                self.fatal(f"handler {_name(watcher)} of {message.topic}", exc)
            if message.qos:
                self.client.ack(message.mid, message.qos)
            return
        self.inbox.put(inbound)

    def _subscribed(self, topic: str) -> bool:
        wanted = self._wanted.get(topic)
        if wanted is None:
            if len(self._wanted) > 10_000:
                self._wanted.clear()
            wanted = self._wanted[topic] = any(topic_matches(f, topic) for f, _ in self.subscriptions)
        return wanted

    def _unsolicited(self, message: paho.MQTTMessage) -> None:
        """A message on a topic we never subscribed to: a subscription someone else left in our
        persistent session (on Mosquitto, any login may connect with our client id). Acked and
        dropped, never handed to the stage, so it cannot freeze it."""
        self.unsolicited += 1
        if self.unsolicited == 1 or self.unsolicited % 1000 == 0:
            get_logger().warning("message on a topic this service never subscribed to; dropped",
                                 topic=message.topic,
                                 count=self.unsolicited, state_transition="UNSOLICITED_DROPPED")
        if message.qos:
            self.client.ack(message.mid, message.qos)

    def start(self, wait_s: float = 30.0) -> None:
        host, port = self.config.mqtt.host, self.config.mqtt.port
        self.client.connect_async(host, port, keepalive=self.config.mqtt.keepalive_s)
        self.client.loop_start()
        if not self.connected.wait(wait_s):
            self.stop()
            tls = diagnose(self.config.mqtt) if self.config.mqtt.tls else ""
            raise BrokerUnavailable(
                tls or f"no MQTT broker answered at {self.config.mqtt.url} within {wait_s:.0f} s "
                "(is it running? are the credentials right? set MRO_MQTT_URL)"
            )

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def ack(self, message: Inbound) -> None:
        """Ack only on the connection that delivered it: a packet id from an older connection may
        already name a different message, which we must not ack before it is committed."""
        if message.qos > 0 and message.generation == self.generation:
            self.client.ack(message.mid, message.qos)


def _name(function) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def fatal_exit(callback: str, exc: BaseException) -> None:
    """An MQTT callback raised: log it (structured, with where it was raised) and end the process
    at once, non-zero. Called in paho's network thread, so it cannot unwind the main thread: it
    exits the way kill -9 would, and the stores are built for that."""
    try:
        frames = traceback.extract_tb(exc.__traceback__)
        get_logger().critical(
            "mqtt callback raised; exiting so the service is restarted", callback=callback,
            error=type(exc).__name__, detail=str(exc)[:200],
            where=[f"{f.filename}:{f.lineno}:{f.name}" for f in frames[-6:]],
            exit_code=FATAL_EXIT, state_transition="FATAL")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(FATAL_EXIT)


def mqtt_connack(port: int, username: str | None, password: str | None, timeout: float = 2.0,
                 host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, client_id: str | None = None,
                 clean_session: bool = True) -> int:
    """Return code of a bare MQTT 3.1.1 CONNECT (0 = accepted); raises OSError if nothing answers
    (ssl.SSLError, an OSError, when a `tls` handshake fails: `shared.runtime.tls.explain` words it).
    A real CONNECT, so a broker being waited for sees a client, not a half-open socket. Without
    `client_id` it uses a fresh probe id."""
    def utf8(value: str) -> bytes:
        data = value.encode()
        return struct.pack("!H", len(data)) + data

    flags = 0x02 if clean_session else 0x00
    payload = utf8(client_id if client_id is not None else f"probe-{os.getpid()}-{time.monotonic_ns()}")
    if username is not None:
        flags |= 0x80
        payload += utf8(username)
    if password is not None:
        flags |= 0x40
        payload += utf8(password)
    body = utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 10) + payload
    length, remaining = b"", len(body)
    while True:
        byte, remaining = remaining % 128, remaining // 128
        length += bytes([byte | (0x80 if remaining else 0)])
        if not remaining:
            break
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=host))
        sock.sendall(b"\x10" + length + body)
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                raise ConnectionError("broker closed the connection without CONNACK")
            reply += chunk
        if reply[0] != 0x20:
            raise ConnectionError(f"expected CONNACK, got {reply!r}")
        if reply[3] == 0:
            sock.sendall(b"\xe0\x00")  # DISCONNECT, so no will and no "connection lost" noise
        return reply[3]
