"""Heartbeat: probe the gateway's /health and publish the link state (retained) on every change.

The uplink reads that state (it makes no calls while ISOLATED) and reports its backlog and
whether the gateway's chain head equals ours, which ends RECONCILING.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import msgspec

from services.heartbeat.state import Link, Probe, Thresholds, after_probe, after_uplink
from shared.config import Config
from shared.logs import configure_logging, get_logger
from shared.mqtt import MqttLink
from shared.topics import Topics
from shared.wire import json_encode, utc_now


class Heartbeat:
    def __init__(self, config: Config):
        self.config = config
        self.topics = Topics(config.station)
        self.limits = Thresholds(config.link.slow_probe_ms, config.link.isolate_after)
        self.log = get_logger()
        self.state, self.streak, self.since = Link.CONNECTED, 0, utc_now()
        self.last_probe_ms: float | None = None
        self.uplink: dict = {}
        self.link = MqttLink(config, client_id=f"mro-{config.station}-heartbeat",
                             subscriptions=[(self.topics.status("uplink"), 0)], persistent=False,
                             will=(self.topics.status("heartbeat"),
                                   json_encode({"service": "heartbeat", "state": "down"})))
        self.http = httpx.Client(timeout=config.link.slow_probe_ms / 1000 + 1.0)
        self.link.on_connect_hooks.append(self.publish)

    def probe(self) -> Probe:
        start = time.monotonic()
        try:
            ok = self.http.get(self.config.link.gateway_url.rstrip("/") + "/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        return Probe(ok, (time.monotonic() - start) * 1000)

    def _move(self, state: Link, reason: str) -> None:
        if state != self.state:
            self.log.info("link state changed", state_transition=f"{self.state}->{state}", reason=reason,
                          last_probe_ms=self.last_probe_ms)
            self.state, self.since = state, utc_now()
            self.publish()

    def publish(self) -> None:
        self.link.publish(self.topics.status("connectivity"), json_encode({
            "state": self.state, "since": self.since, "last_probe_ms": self.last_probe_ms,
            "backlog": self.uplink.get("backlog"), "last_acked_seq": self.uplink.get("acked_seq"),
            "bad_probes": self.streak, "at": utc_now()}), retain=True)
        self.link.publish(self.topics.status("heartbeat"), json_encode(
            {"service": "heartbeat", "state": "up", "link": self.state, "at": utc_now()}), retain=True)

    def step(self) -> None:
        probe = self.probe()
        self.last_probe_ms = round(probe.latency_ms, 1)
        state, self.streak = after_probe(self.state, self.streak, probe, self.limits)
        self._move(state, "probe ok" if probe.ok else "probe failed")
        self.publish()

    def read_uplink(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.link.inbox.get(timeout=remaining)
            except Exception:
                return
            try:
                self.uplink = msgspec.json.decode(message.payload)
            except msgspec.DecodeError:
                continue
            self._move(after_uplink(self.state, bool(self.uplink.get("in_sync"))), "uplink in sync")

    def serve(self, stop: threading.Event) -> None:
        self.link.start()
        try:
            while not stop.is_set():
                started = time.monotonic()
                self.step()
                self.read_uplink(max(0.0, self.config.link.probe_interval_s - (time.monotonic() - started)))
        finally:
            self.link.stop()


def run_heartbeat(config: Config) -> None:
    configure_logging("heartbeat", config.station)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Heartbeat(config).serve(stop)
