"""paho-mqtt client set up the way every stage needs it.

Fixed client id + persistent session (clean_session=False) so the broker keeps QoS1 messages
for us while we are away; manual acks so a message is acked only after our LMDB commit.
Subscriptions are renewed on every connect because a broker restarted without persistence
(amqtt) forgets sessions.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from shared.config import Config


class BrokerUnavailable(Exception):
    """The broker could not be reached in time; the message says where we looked."""


@dataclass(slots=True)
class Inbound:
    """One message handed from paho's network thread to the stage's worker."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int
    received_at: float = field(default_factory=time.time)


def service_credentials(config: Config) -> tuple[str, str]:
    """Configured service credentials, else the ones `mro-edge run`/`devices init` keep on disk."""
    if config.mqtt.username:
        return config.mqtt.username, config.mqtt.password
    from shared.credentials import BrokerCredentials

    return BrokerCredentials(config.data_path / "broker", config.station).ensure_service_user()


def set_nodelay(client: paho.Client) -> None:
    """paho leaves Nagle on: a PUBACK followed by a small publish then waits for the peer's
    delayed ACK (~40 ms per hop). Records are small and latency matters, so turn it off."""
    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """A connected paho client feeding `inbox`; safe to publish and ack from the worker thread."""

    def __init__(
        self,
        config: Config,
        client_id: str,
        subscriptions: list[tuple[str, int]] = (),
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
        self.on_connect_hooks: list = []
        self.direct: dict[str, object] = {}
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        username, password = credentials or service_credentials(config)
        client.username_pw_set(username, password)
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            return
        set_nodelay(client)
        self.generation += 1
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        self.connected.set()
        for hook in self.on_connect_hooks:
            hook()

    def _on_disconnect(self, _client, _userdata, _flags, _reason_code, _properties) -> None:
        self.connected.clear()

    def _on_message(self, _client, _userdata, message: paho.MQTTMessage) -> None:
        if handler := self.direct.get(message.topic):
            handler(message.payload)
            if message.qos:
                self.client.ack(message.mid, message.qos)
            return
        self.inbox.put(Inbound(message.topic, message.payload, message.qos, message.mid, self.generation))

    def start(self, wait_s: float = 30.0) -> None:
        host, port = self.config.mqtt.host, self.config.mqtt.port
        self.client.connect_async(host, port, keepalive=self.config.mqtt.keepalive_s)
        self.client.loop_start()
        if not self.connected.wait(wait_s):
            self.stop()
            raise BrokerUnavailable(
                f"no MQTT broker answered at {self.config.mqtt.url} within {wait_s:.0f} s "
                "(is it running? are the credentials right? set MRO_MQTT_URL)"
            )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def ack(self, message: Inbound) -> None:
        """Ack only on the connection that delivered it: a packet id from an older connection may
        already name a different message, which we must not ack before it is committed."""
        if message.qos > 0 and message.generation == self.generation:
            self.client.ack(message.mid, message.qos)


def mqtt_connack(port: int, username: str | None, password: str | None, timeout: float = 2.0,
                 host: str = "127.0.0.1") -> int:
    """Return code of a bare MQTT 3.1.1 CONNECT (0 = accepted); raises OSError if nothing answers.
    A real CONNECT, so a broker being waited for sees a client, not a half-open socket."""
    def utf8(value: str) -> bytes:
        data = value.encode()
        return struct.pack("!H", len(data)) + data

    flags = 0x02
    payload = utf8(f"probe-{os.getpid()}-{time.monotonic_ns()}")
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
    with socket.create_connection((host, port), timeout=timeout) as sock:
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
