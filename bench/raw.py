"""The broker alone: one paho publisher, one paho subscriber, QoS1 both ways.

This is the reference the pipeline figures are read against: it moves the same bytes through
the same broker on the same (shared, noisy) machine a few seconds apart.
"""

from __future__ import annotations

import os
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.fleet import set_nodelay
from bench.stats import percentiles

RECORD_BYTES = 700  # about the size of a real record (mro_edge.simulator.records)
RAW_TOPIC = "mro/HGR1/pipeline/validate"  # ingest may write it, validate read it (broker ACL)
PUBLISHER_INFLIGHT = 1000  # what the stage links use (shared.runtime.mqtt) and mosquitto.conf allows


def _client(broker, name: str, service: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{os.getpid()}",
                         clean_session=True, protocol=paho.MQTTv311)
    client.username_pw_set(*broker.login(service))
    client.max_inflight_messages_set(PUBLISHER_INFLIGHT)
    client.max_queued_messages_set(0)
    return client


class _Pair:
    """A connected publisher and a subscriber (QoS1) on one topic; `on_arrival(payload, t)`. They
    log in as ingest and validate, the one pair of users that may send and read validate's input
    (RAW_TOPIC); the reference runs before the pipeline starts."""

    def __init__(self, broker, topic: str, on_arrival) -> None:
        self.topic = topic
        self.subscribed = threading.Event()
        self.sub = _client(broker, "raw-sub", "validate")
        self.sub.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.sub.on_subscribe = lambda *_: self.subscribed.set()
        self.sub.on_message = lambda _c, _u, m: on_arrival(m.payload, time.perf_counter())
        self.pub = _client(broker, "raw-pub", "ingest")
        connected = threading.Event()
        self.pub.on_connect = lambda *_: connected.set()
        host, port = "127.0.0.1", broker.port
        for client in (self.sub, self.pub):
            client.connect(host, port, keepalive=30)
            set_nodelay(client)
            client.loop_start()
        if not (self.subscribed.wait(10) and connected.wait(10)):
            self.close()
            raise RuntimeError(f"raw reference clients could not connect to {broker.url}")

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


def raw_throughput(broker, n: int, topic: str, timeout_s: float = 120.0) -> dict:
    """N QoS1 messages of ~700 bytes as fast as paho publishes them; rate = N / time until the
    subscriber holds all of them."""
    got = 0
    done = threading.Event()

    def arrived(_payload, _t) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    pair = _Pair(broker, topic, arrived)
    payload = (b"x" * RECORD_BYTES)
    try:
        start = time.perf_counter()
        for _ in range(n):
            pair.pub.publish(topic, payload, qos=1)
        queued = time.perf_counter() - start
        complete = done.wait(timeout_s)
        elapsed = time.perf_counter() - start
    finally:
        pair.close()
    return {
        "n": n,
        "bytes": RECORD_BYTES,
        "received": got,
        "complete": complete,
        "seconds": elapsed,
        "queued_s": queued,
        "rate": got / elapsed if elapsed else 0.0,
        "publisher_inflight": PUBLISHER_INFLIGHT,
    }


def raw_latency(broker, rate: float, seconds: float, topic: str) -> dict:
    """The broker's own publish -> delivery time at the offered load the pipeline latency run uses."""
    n = max(1, int(rate * seconds))
    arrivals: dict[int, float] = {}

    def arrived(payload, t) -> None:
        arrivals[int(payload[:12])] = t

    pair = _Pair(broker, topic, arrived)
    filler = b"x" * (RECORD_BYTES - 12)
    sent: list[float] = []
    try:
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent.append(time.perf_counter())
            pair.pub.publish(topic, b"%012d" % i + filler, qos=1)
        deadline = time.perf_counter() + 10
        while len(arrivals) < n and time.perf_counter() < deadline:
            time.sleep(0.02)
    finally:
        pair.close()
    latencies = [(arrivals[i] - sent[i]) * 1000 for i in range(n) if i in arrivals]
    return {"n": n, "received": len(latencies), "rate": rate, **percentiles(latencies)}
