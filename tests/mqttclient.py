"""A paho MQTT 3.1.1 test client driven synchronously, for the broker tests on both brokers."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from tests.brokers import BrokerProc

_ids = itertools.count(1)


class Client:
    """A paho MQTT 3.1.1 client driven synchronously: connect, subscribe, publish, collect."""

    def __init__(self, broker: BrokerProc, login: tuple[str, str] | None, *, client_id: str | None = None,
                 clean_session: bool = True, will: tuple[str, bytes] | None = None) -> None:
        self.client_id = client_id or f"t{next(_ids)}-{time.monotonic_ns()}"
        self._c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                              clean_session=clean_session)
        if login:
            self._c.username_pw_set(*login)
        if will:
            self._c.will_set(will[0], will[1], qos=1)
        self._cond = threading.Condition()
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: mqtt.ReasonCode | None = None
        self.session_present = False
        self.disconnected = threading.Event()
        self._subacks: dict[int, list[mqtt.ReasonCode]] = {}
        self._c.on_connect = self._on_connect
        self._c.on_message = self._on_message
        self._c.on_subscribe = self._on_subscribe
        self._c.on_disconnect = lambda *_: self.disconnected.set()
        self._broker = broker

    def _on_connect(self, _c, _u, flags, reason, _p) -> None:
        with self._cond:
            self.connack, self.session_present = reason, flags.session_present
            self._cond.notify_all()

    def _on_message(self, _c, _u, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, reasons, _p) -> None:
        with self._cond:
            self._subacks[mid] = reasons
            self._cond.notify_all()

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def connect(self, timeout: float = 5) -> mqtt.ReasonCode:
        self._c.connect("127.0.0.1", self._broker.port, keepalive=30)
        self._c.loop_start()
        if not self._wait(lambda: self.connack is not None, timeout):
            raise TimeoutError(f"no CONNACK for {self.client_id}")
        assert self.connack is not None
        if self.connack.is_failure:
            self._c.loop_stop()
        return self.connack

    def subscribe(self, topic_filter: str, qos: int = 1) -> mqtt.ReasonCode:
        _, mid = self._c.subscribe(topic_filter, qos)
        assert mid is not None, f"paho refused to send SUBSCRIBE for {topic_filter}"
        assert self._wait(lambda: mid in self._subacks, 5), f"no SUBACK for {topic_filter}"
        return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def wait_for(self, topic: str, payload: bytes, timeout: float = 5) -> mqtt.MQTTMessage:
        def found() -> bool:
            return any(m.topic == topic and m.payload == payload for m in self.messages)

        assert self._wait(found, timeout), f"{self.client_id} never got {payload!r} on {topic}: {self.seen()}"
        return next(m for m in self.messages if m.topic == topic and m.payload == payload)

    def seen(self) -> list[tuple[str, bytes]]:
        with self._cond:
            return [(m.topic, m.payload) for m in self.messages]

    def close(self) -> None:
        """Clean DISCONNECT (no will)."""
        self._c.disconnect()
        self._c.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a crashed device does: the broker sends the will."""
        self._c.loop_stop()
        sock = self._c.socket()
        if sock is not None:
            sock.close()
