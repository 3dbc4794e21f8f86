"""`mro-edge run`: every service as its own OS process, restarted with backoff when it dies.

A crash of one service never takes down another; Ctrl-C or SIGTERM stops the stages first
(so they ack and publish `down`), then the broker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from shared.config import Config
from shared.mqtt import mqtt_connack
from shared.stage import REFUSED_EXIT

PIPELINE = ("ingest", "validate", "sign", "uplink", "heartbeat")
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0


class PortTaken(Exception):
    """The embedded broker's port is in use; the message says what to do."""


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise PortTaken(
                f"port {port} on {host} is already taken (probably Mosquitto). Either run the embedded "
                f"broker on another port: MRO_MQTT_URL=mqtt://{host}:{port + 1} mro-edge run, or use the "
                "broker that is already there: mro-edge run --no-broker"
            ) from None


def wait_for_broker(config: Config, timeout_s: float = 20.0) -> bool:
    """Until the broker answers an MQTT CONNECT (any answer: it is up and speaking MQTT)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            mqtt_connack(config.mqtt.port, None, None, timeout=0.5, host=config.mqtt.host)
            return True
        except OSError:
            time.sleep(0.1)
    return False


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = 0.5
    restart_at: float = 0.0
    restarts: int = 0
    refused: bool = False


class Supervisor:
    def __init__(self, config: Config, *, with_broker: bool, with_gateway: bool = False,
                 extra: list[tuple[str, list[str]]] = ()):
        self.config = config
        self.with_broker = with_broker
        cli = [sys.executable, "-m", "mro_edge"]
        names = (("broker",) if with_broker else ()) + (("gateway",) if with_gateway else ()) + PIPELINE
        self.children = [Child(name, cli + ["service", name]) for name in names]
        self.children += [Child(name, cli + argv) for name, argv in extra]
        self._stopping = False

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, env=os.environ.copy())
        child.started_at = time.monotonic()
        print(f"[run] started {child.name} (pid {child.process.pid})", file=sys.stderr, flush=True)

    def start(self) -> None:
        host, port = self.config.mqtt.host, self.config.mqtt.port
        if self.with_broker:
            check_port_free(host, port)
            self._spawn(self.children[0])
            if not wait_for_broker(self.config):
                self.stop()
                raise RuntimeError(f"the embedded broker did not start listening on {host}:{port}")
        for child in self.children[1 if self.with_broker else 0:]:
            self._spawn(child)

    def watch_once(self) -> None:
        """Restart any child that exited, with exponential backoff reset after a stable run."""
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if now >= child.restart_at:
                    self._spawn(child)
                continue
            code = child.process.poll()
            if code is None:
                if now - child.started_at > STABLE_AFTER_S:
                    child.backoff_s = 0.5
                continue
            if child.name == "simulator" and code == 0:
                continue
            if code == REFUSED_EXIT:
                if not child.refused:
                    print(f"[run] {child.name} refused to start (see its message above); not restarting it "
                          "until the cause is fixed", file=sys.stderr, flush=True)
                    child.refused = True
                continue
            child.process = None
            child.restarts += 1
            child.restart_at = now + child.backoff_s
            print(f"[run] {child.name} exited with {code}; restarting in {child.backoff_s:.1f} s",
                  file=sys.stderr, flush=True)
            child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)

    def supervise(self, on_started=None) -> None:
        """Start everything, keep it running until SIGTERM/SIGINT, then stop in order."""
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        self.start()
        if on_started:
            on_started()
        while not self._stopping:
            self.watch_once()
            time.sleep(0.25)
        self.stop()

    def _request_stop(self) -> None:
        self._stopping = True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stages first (they still need the broker to publish `down`), then the broker."""
        ordered = [c for c in self.children if c.name != "broker"] + [c for c in self.children if c.name == "broker"]
        for group in (ordered[:-1], ordered[-1:]) if self.with_broker else (ordered,):
            for child in group:
                if child.process and child.process.poll() is None:
                    child.process.terminate()
            deadline = time.monotonic() + timeout_s
            for child in group:
                if child.process:
                    try:
                        child.process.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        child.process.kill()
                        child.process.wait()
