"""Heartbeat: probe the gateway's /health and publish the link state (retained) when it changes.

`mro/<station>/status/connectivity` is published (retained, QoS 1) once per transition, and
re-published unchanged every `link.state_refresh_s` (and after a reconnect to the broker) so a
reader that lost it gets it back; never on every probe. Each transition gets a new `epoch`, a
counter that only grows (it survives a restart of the heartbeat through the retained state).
The service's own liveness goes to `status/heartbeat` every `stage.status_interval_s`.

ISOLATED raises an alarm on `mro/<station>/alarm` (`link_isolated`), and so does DEGRADED
lasting longer than `link.degraded_alarm_s` (`link_degraded`); CONNECTED after either says
`link_restored`.

The uplink reads that state (it makes no calls while ISOLATED) and reports its backlog and
whether the gateway's chain head equals ours, which ends RECONCILING. Its status names the
connectivity `epoch` it had seen when it computed `in_sync`, and the uplink asks the gateway
for its head again whenever it sees a new RECONCILING epoch; so the heartbeat takes `in_sync`
only from a status carrying the epoch of the RECONCILING it is in (produced after it entered
it), and only from the newest status waiting in its inbox: a status from before the outage, or
one queued while the probes were slow, can never end RECONCILING.

On start the heartbeat picks up the retained state it published last: a restart while the box
is ISOLATED stays ISOLATED instead of claiming a link nobody has probed yet. With no retained
state it publishes nothing until its first probe has answered (or failed).
"""

from __future__ import annotations

import os
import queue
import signal
import ssl
import threading
import time

import httpx
import msgspec

from services.heartbeat.state import (
    Link,
    Probe,
    Thresholds,
    UplinkView,
    after_probe,
    after_uplink,
    decode_uplink_view,
)
from shared.runtime.alarms import alarm_payload
from shared.runtime.clock import utc_now
from shared.runtime.config import Config
from shared.runtime.gatewayhttp import gateway_http
from shared.runtime.logs import configure_logging, get_logger
from shared.runtime.messages import json_encode
from shared.runtime.mqtt import MqttLink, client_id_for, service_credentials
from shared.runtime.topics import Topics


def first_epoch() -> int:
    """The epoch of a heartbeat with no retained state: milliseconds since 1970, so it is above
    every epoch an earlier heartbeat reached (one per transition) on this box."""
    return time.time_ns() // 1_000_000


def _caused_by_ssl(exc: BaseException | None) -> bool:
    """Whether an ssl.SSLError (a refused certificate, a missing client certificate) is in the chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class Heartbeat:
    def __init__(self, config: Config):
        self.config = config
        self.topics = Topics(config.station)
        self.limits = Thresholds(config.link.slow_probe_ms, config.link.isolate_after)
        self.log = get_logger()
        self.state, self.streak, self.since = Link.CONNECTED, 0, utc_now()
        self.epoch = first_epoch()
        self.entered = time.monotonic()  # when the current state began
        self.last_probe_ms: float | None = None
        self.uplink = UplinkView()
        self._uplink_topic = self.topics.status("uplink")
        self._own_topic = self.topics.status("connectivity")
        login = service_credentials(config, "heartbeat")
        self.link = MqttLink(config, client_id=client_id_for(config, "heartbeat", login), credentials=login,
                             subscriptions=[(self._uplink_topic, 0), (self._own_topic, 0)], persistent=False,
                             will=(self.topics.status("heartbeat"),
                                   json_encode({"service": "heartbeat", "state": "down"})))
        self.http = gateway_http(config.link, timeout_s=config.link.slow_probe_ms / 1000 + 1.0)
        self._lock = threading.Lock()  # state and epoch change together (publish may run in paho's thread)
        self._started = False
        self._published_at: float | None = None  # connectivity, monotonic
        self._status_at = 0.0  # status/heartbeat, monotonic
        self._degraded_alarmed = False  # this DEGRADED spell has raised its alarm
        self._alarmed = False  # a link alarm was raised since the link was last CONNECTED
        self._tls_refused = False  # the last probe failed the TLS handshake (alarmed once per spell)
        self.link.on_connect_hooks.append(self._on_connect)

    def _on_connect(self) -> None:
        if self._started:  # the broker may have lost what we published: say it again
            self.publish()
            self.publish_status()

    def probe(self) -> Probe:
        start = time.monotonic()
        tls_refused = False
        try:
            ok = self.http.get("/health").status_code == 200
        except httpx.HTTPError as exc:
            ok = False
            tls_refused = _caused_by_ssl(exc)
        if tls_refused and not self._tls_refused:
            # a configuration error more likely than an outage: one alarm per spell, naming the settings
            self._alarm("link_tls", "gateway TLS handshake failed: check link.ca_file (the CA that signed the "
                        "gateway's certificate) and link.client_cert/client_key (if the gateway requires mTLS)")
        self._tls_refused = tls_refused
        return Probe(ok, (time.monotonic() - start) * 1000)

    def _move(self, state: Link, reason: str) -> bool:
        """Take `state`; on a change, a new epoch and one retained publication. True if it changed."""
        with self._lock:
            if state == self.state:
                return False
            previous = self.state
            self.state, self.since, self.entered = state, utc_now(), time.monotonic()
            self.epoch += 1
        self.log.info("link state changed", state_transition=f"{previous}->{state}", reason=reason,
                      epoch=self.epoch, last_probe_ms=self.last_probe_ms, bad_probes=self.streak)
        self.publish()
        if state == Link.ISOLATED:
            self._alarmed = True
            self._alarm("link_isolated", f"{self.streak} bad probes of the gateway in a row; "
                        "the uplink holds every entry until the link is back")
        elif state == Link.DEGRADED:
            self._degraded_alarmed = False  # one alarm per DEGRADED spell that lasts too long
        elif state == Link.CONNECTED and self._alarmed:
            self._alarmed = False
            self._alarm("link_restored", "the link to the gateway is CONNECTED again")
        return True

    def publish(self) -> None:
        """The connectivity state, retained."""
        with self._lock:
            payload = json_encode({
                "state": self.state, "since": self.since, "epoch": self.epoch,
                "last_probe_ms": self.last_probe_ms,
                "backlog": self.uplink.backlog, "last_acked_seq": self.uplink.acked_seq,
                "bad_probes": self.streak, "at": utc_now()})
            self._published_at = time.monotonic()
        self.link.publish(self._own_topic, payload, retain=True)

    def publish_status(self, service_state: str = "up") -> None:
        """The heartbeat service's own status, retained."""
        self._status_at = time.monotonic()
        self.link.publish(self.topics.status("heartbeat"), json_encode(
            {"service": "heartbeat", "state": service_state, "pid": os.getpid(), "link": self.state,
             "epoch": self.epoch, "at": utc_now()}), retain=True)

    def _alarm(self, kind: str, detail: str) -> None:
        self.log.error("alarm", alarm=kind, detail=detail, link=str(self.state), epoch=self.epoch,
                       state_transition=f"ALARM_{kind.upper()}")
        self.link.publish(self.topics.alarm, alarm_payload("heartbeat", kind, detail, link=self.state,
                                                            epoch=self.epoch))

    def step(self) -> None:
        probe = self.probe()
        self.last_probe_ms = round(probe.latency_ms, 1)
        state, self.streak = after_probe(self.state, self.streak, probe, self.limits)
        if probe.ok and probe.latency_ms <= self.limits.slow_probe_ms:
            reason = "probe ok"
        else:
            reason = "probe slow" if probe.ok else "probe failed"
        if not self._move(state, reason) and self._published_at is None:
            self.publish()  # the first probe of a heartbeat that found no retained state

    def tick(self) -> None:
        """Timers: the DEGRADED alarm, the retained refresh, the service status."""
        now = time.monotonic()
        link = self.config.link
        degraded_too_long = self.state == Link.DEGRADED and now - self.entered > link.degraded_alarm_s
        if degraded_too_long and not self._degraded_alarmed:
            self._degraded_alarmed = self._alarmed = True
            self._alarm("link_degraded", f"DEGRADED for more than {link.degraded_alarm_s:g} s "
                        f"({self.streak} bad probes in a row, last {self.last_probe_ms} ms)")
        if self._published_at is not None and now - self._published_at >= link.state_refresh_s:
            self.publish()
        if now - self._status_at >= self.config.stage.status_interval_s:
            self.publish_status()

    def on_uplink(self, status: UplinkView) -> None:
        """The uplink's newest status. Only one computed after this RECONCILING began (it carries
        its epoch) may end it; any other is kept for the figures only."""
        self.uplink = status
        fresh = status.link_epoch == self.epoch and status.link == Link.RECONCILING
        in_sync = fresh and status.in_sync is True and status.state == "up"
        self._move(after_uplink(self.state, in_sync), "uplink drained and in sync")

    def read_inbox(self, timeout_s: float) -> None:
        """Until `timeout_s` has passed (at least one look, also with 0): whatever is waiting is
        read at once, and only the newest uplink status of it is acted on."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            inbox = self.link.inbox
            try:
                first = inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait()
            except queue.Empty:
                return
            waiting = [first]
            while True:
                try:
                    waiting.append(self.link.inbox.get_nowait())
                except queue.Empty:
                    break
            newest = next((m for m in reversed(waiting) if m.topic == self._uplink_topic), None)
            if newest is not None:  # the rest is our own connectivity coming back, or older statuses
                status = decode_uplink_view(newest.payload)
                if status is not None:
                    self.on_uplink(status)
            self.tick()

    def resume_retained(self, wait_s: float = 0.5) -> bool:
        """Start from the state this heartbeat published before it stopped (retained)."""
        deadline = time.monotonic() + wait_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.link.inbox.get(timeout=remaining)
            except queue.Empty:
                return False
            if message.topic == self._uplink_topic:
                self.uplink = decode_uplink_view(message.payload) or self.uplink
                continue
            try:
                status = msgspec.json.decode(message.payload)
            except msgspec.DecodeError:
                continue
            own = message.topic == self._own_topic and isinstance(status, dict)
            if own and status.get("state") in Link.__members__:
                with self._lock:
                    self.state = Link(status["state"])
                    self.since = status.get("since") or self.since
                    self.streak = int(status.get("bad_probes") or 0)
                    if isinstance(status.get("epoch"), int) and status["epoch"] > 0:
                        self.epoch = status["epoch"]
                    self.entered = time.monotonic()
                    # its alarm was raised before the restart
                    self._alarmed = self.state in (Link.ISOLATED, Link.RECONCILING)
                self.log.info("link state resumed", state=str(self.state), epoch=self.epoch)
                return True
        return False

    def serve(self, stop: threading.Event) -> None:
        self.link.start()
        try:
            if self.resume_retained():
                self.publish()  # unchanged state and epoch: a refresh, and a sign of life
            self._started = True
            self.publish_status()
            while not stop.is_set():
                started = time.monotonic()
                self.step()
                self.tick()
                self.read_inbox(max(0.0, self.config.link.probe_interval_s - (time.monotonic() - started)))
        finally:
            self.publish_status("down")
            time.sleep(0.1)
            self.link.stop()
            self.http.close()


def run_heartbeat(config: Config) -> None:
    configure_logging("heartbeat", config.station)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Heartbeat(config).serve(stop)
