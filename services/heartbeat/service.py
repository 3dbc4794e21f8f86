"""Heartbeat: probe the gateway's /health and publish the link state (retained) on every change.

The uplink reads that state (it makes no calls while ISOLATED) and reports its backlog and
whether the gateway's chain head equals ours, which ends RECONCILING. The heartbeat takes
`in_sync` only from an uplink that has itself seen the link come back (its status names the
link state RECONCILING or later), so a status from before the outage can never end it.

On start the heartbeat picks up the retained state it published last: a restart while the box
is ISOLATED stays ISOLATED instead of claiming a link nobody has probed yet.
"""

from __future__ import annotations

import os
import queue
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
        self._uplink_topic = self.topics.status("uplink")
        self._own_topic = self.topics.status("connectivity")
        self.link = MqttLink(config, client_id=f"mro-{config.station}-heartbeat",
                             subscriptions=[(self._uplink_topic, 0), (self._own_topic, 0)], persistent=False,
                             will=(self.topics.status("heartbeat"),
                                   json_encode({"service": "heartbeat", "state": "down"})))
        self.http = httpx.Client(timeout=config.link.slow_probe_ms / 1000 + 1.0)
        self._started = False
        self.link.on_connect_hooks.append(self._on_connect)

    def _on_connect(self) -> None:
        if self._started:
            self.publish()

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
                          last_probe_ms=self.last_probe_ms, bad_probes=self.streak)
            self.state, self.since = state, utc_now()
            self.publish()

    def publish(self, service_state: str = "up") -> None:
        self.link.publish(self._own_topic, json_encode({
            "state": self.state, "since": self.since, "last_probe_ms": self.last_probe_ms,
            "backlog": self.uplink.get("backlog"), "last_acked_seq": self.uplink.get("acked_seq"),
            "bad_probes": self.streak, "at": utc_now()}), retain=True)
        self.link.publish(self.topics.status("heartbeat"), json_encode(
            {"service": "heartbeat", "state": service_state, "pid": os.getpid(), "link": self.state,
             "at": utc_now()}), retain=True)

    def step(self) -> None:
        probe = self.probe()
        self.last_probe_ms = round(probe.latency_ms, 1)
        state, self.streak = after_probe(self.state, self.streak, probe, self.limits)
        if probe.ok and probe.latency_ms <= self.limits.slow_probe_ms:
            reason = "probe ok"
        else:
            reason = "probe slow" if probe.ok else "probe failed"
        self._move(state, reason)
        self.publish()

    def on_uplink(self, status: dict) -> None:
        self.uplink = status
        seen_link_back = status.get("link") in (Link.RECONCILING, Link.CONNECTED)
        in_sync = bool(status.get("in_sync")) and status.get("state") == "up" and seen_link_back
        self._move(after_uplink(self.state, in_sync), "uplink drained and in sync")

    def read_inbox(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.link.inbox.get(timeout=remaining)
            except queue.Empty:
                return
            if message.topic != self._uplink_topic:
                continue  # our own connectivity messages coming back
            try:
                status = msgspec.json.decode(message.payload)
            except msgspec.DecodeError:
                continue
            if isinstance(status, dict):
                self.on_uplink(status)

    def resume_retained(self, wait_s: float = 0.5) -> None:
        """Start from the state this heartbeat published before it stopped (retained)."""
        deadline = time.monotonic() + wait_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.link.inbox.get(timeout=remaining)
            except queue.Empty:
                return
            try:
                status = msgspec.json.decode(message.payload)
            except msgspec.DecodeError:
                continue
            if not isinstance(status, dict):
                continue
            if message.topic == self._uplink_topic:
                self.uplink = status
            elif message.topic == self._own_topic and status.get("state") in Link.__members__:
                self.state = Link(status["state"])
                self.since = status.get("since") or self.since
                self.streak = int(status.get("bad_probes") or 0)
                self.log.info("link state resumed", state=str(self.state))
                return

    def serve(self, stop: threading.Event) -> None:
        self.link.start()
        try:
            self.resume_retained()
            self._started = True
            self.publish()
            while not stop.is_set():
                started = time.monotonic()
                self.step()
                self.read_inbox(max(0.0, self.config.link.probe_interval_s - (time.monotonic() - started)))
        finally:
            self.publish("down")
            time.sleep(0.1)
            self.link.stop()
            self.http.close()


def run_heartbeat(config: Config) -> None:
    configure_logging("heartbeat", config.station)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Heartbeat(config).serve(stop)
