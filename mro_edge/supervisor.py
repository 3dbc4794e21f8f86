"""`mro-edge run`: every service as its own OS process, supervised.

* A child that exits is restarted with exponential backoff (reset after a stable run); one
  that refuses to start (exit 3: a person has to act) is not.
* A child whose watchdog file stops moving for `supervisor.hung_after_s` (stopped by SIGSTOP,
  wedged, or a stage whose main loop is stuck; see shared/runtime/watchdog.py) is reported `hung` on
  its retained status topic, alarmed on mro/<station>/alarm, killed and restarted.
* Children die with the supervisor, even after kill -9 (mro_edge/lifeline.py).
* Children run in their own process group: Ctrl-C reaches only the supervisor, which stops
  the services first (so they ack and publish `down`), then the broker.
* The children's output (JSON log lines) goes to one size-rotated file in the data directory,
  written by the supervisor alone; the terminal gets a short human console instead: what
  runs, where to look, refusals, alarms, and a summary line every `console_interval_s`.
* The supervisor's view of its children (pid, state, restarts, hangs) is published, retained,
  on mro/<station>/status/supervisor; `mro-edge status` merges it in.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TextIO, cast

from mro_edge import lifeline
from services.registry import SERVICES, Kind, Service, service_names
from shared.runtime.alarms import alarm_payload
from shared.runtime.clock import utc_now
from shared.runtime.config import Config
from shared.runtime.logs import get_logger
from shared.runtime.mqtt import mqtt_connack
from shared.runtime.stage import REFUSED_EXIT
from shared.runtime.tls import TlsProblem, client_context, explain
from shared.runtime.topics import Topics

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0
STARTUP_GRACE_S = 30.0  # before a child's first watchdog ping (imports on a busy box)
READY_TIMEOUT_S = 60.0
STATE_UP = "up"


class SupervisorError(Exception):
    """The stack could not be started; the message says why."""


def run_services(*, with_broker: bool, with_gateway: bool) -> tuple[Service, ...]:
    """What `mro-edge run` starts, in start order: every service of the registry, but the
    embedded broker and the reference gateway only when it is to run them."""
    left_out = {
        kind for kind, wanted in ((Kind.BROKER, with_broker), (Kind.GATEWAY, with_gateway)) if not wanted
    }
    return tuple(service for service in SERVICES if service.kind not in left_out)


def wait_for_broker(
    config: Config, timeout_s: float = 20.0, alive: Callable[[], bool] = lambda: True
) -> bool:
    """Until the broker answers an MQTT CONNECT (any answer: it is up and speaking MQTT), over
    TLS for mqtts:// with the services' own client context. A TLS setup or handshake that fails
    raises SupervisorError at once, explained: waiting longer would not help."""
    try:
        tls = client_context(config.mqtt)
    except TlsProblem as exc:
        raise SupervisorError(str(exc)) from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            mqtt_connack(config.mqtt.port, None, None, timeout=0.5, host=config.mqtt.host, tls=tls)
            return True
        except ssl.SSLError as exc:
            raise SupervisorError(explain(exc, config.mqtt)) from None
        except OSError:
            time.sleep(0.1)
    return False


class Console:
    """Short human lines on the terminal; errors of the same kind at most once per 30 s."""

    def __init__(self, out: TextIO | None = None, enabled: bool = True) -> None:
        self.out = out or sys.stderr
        self.enabled = enabled
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            try:
                print(text, file=self.out, flush=True)
            except OSError:
                pass

    def once_in_a_while(self, key: tuple[str, str], text: str, every_s: float = 30.0) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -every_s) >= every_s:
            self._last[key] = now
            self.say(text)


class LogSink:
    """The children's output: one JSON object per line (other lines are wrapped into one), into
    a size-rotated file written only by the supervisor, or onto stderr."""

    def __init__(
        self, path: Path | None, console: Console, *, max_bytes: int = 20 << 20, backups: int = 5
    ) -> None:
        self.path = path
        self.console = console
        self._handler: RotatingFileHandler | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._handler = RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        if self._handler is not None:
            self._handler.handle(
                logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"})
            )
            return
        with self._lock:
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except OSError:
                pass

    def child_line(self, name: str, text: str) -> None:
        text = text.rstrip("\r\n")
        if not text.strip():
            return
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if isinstance(event, dict):
            if "service" not in event or "at" not in event:  # e.g. the simulator's JSON progress lines
                event = {"service": name, **event}
                event.setdefault("at", utc_now())
                text = json.dumps(event)
            self.write_line(text)
            if event.get("level") in ("error", "critical") and event.get("event") != "alarm":
                why = event.get("error") or event.get("detail") or event.get("alarm") or ""
                self.console.once_in_a_while(
                    (name, str(event.get("event"))),
                    f"[{name}] {event.get('level')}: {event.get('event')}{f' ({why})' if why else ''}"
                    + (f"; see {self.path}" if self.path else ""))
            return
        self.write_line(json.dumps({"service": name, "level": "info", "event": "output", "text": text[:4000],
                                    "at": utc_now()}))
        if text.startswith("mro-edge"):
            self.console.say(f"[{name}] {text}")
        elif text.startswith("Traceback"):
            self.console.once_in_a_while(
                (name, "traceback"), f"[{name}] crashed; the traceback is in {self.path}"
            )

    def stream(self) -> TextIO:
        """A text stream for the supervisor's own structlog lines (its logger calls only write
        and flush)."""
        return cast(TextIO, _LineStream(self.write_line))

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()


class _LineStream:
    """What structlog's PrintLogger writes to: complete lines go to `emit`."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._buffer = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                if line:
                    self._emit(line)
        return len(text)

    def flush(self) -> None:
        pass


class Monitor:
    """The supervisor's MQTT client: reads every retained status and alarm, publishes its own."""

    def __init__(self, config: Config) -> None:
        from shared.runtime.mqtt import MqttLink, client_id_for, service_credentials

        self.topics = Topics(config.station)
        self.statuses: dict[str, dict] = {}
        self.alarms: queue.SimpleQueue[dict] = queue.SimpleQueue()
        down = json.dumps({"service": "supervisor", "state": "down", "pid": os.getpid()}).encode()
        login = service_credentials(config, "supervisor")
        self.link = MqttLink(
            config,
            client_id=client_id_for(config, "supervisor", login),
            credentials=login,
            subscriptions=[(self.topics.status_all, 0), (self.topics.alarm, 0)],
            persistent=False,
            will=(self.topics.status("supervisor"), down),
        )
        self.started = False

    def start(self) -> None:
        self.link.start(wait_s=10)
        self.started = True

    def drain(self) -> None:
        while True:
            try:
                message = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                payload = json.loads(message.payload)
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            if message.topic == self.topics.alarm:
                self.alarms.put(payload)
            else:
                self.statuses[message.topic.rsplit("/", 1)[1]] = payload

    def publish(self, topic: str, payload: dict, retain: bool = False) -> None:
        self._send(topic, json.dumps(payload).encode(), retain)

    def alarm(self, service: str, kind: str, detail: str) -> None:
        self._send(self.topics.alarm, alarm_payload(service, kind, detail), retain=False)

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.started:
            self.link.publish(topic, payload, qos=1, retain=retain)

    def stop(self, final: dict) -> None:
        if not self.started:
            return
        info = self.link.client.publish(self.topics.status("supervisor"), json.dumps(final).encode(), qos=1,
                                        retain=True)
        try:
            info.wait_for_publish(2)
        except (RuntimeError, ValueError):
            pass
        self.link.stop()
        self.started = False


@dataclass
class Child:
    name: str
    argv: list[str]
    watchdog: Path  # the file the child's lifeline touches every second
    service: Service | None = None  # None: a tool (`mro-edge simulate`), done once it exits with 0
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = 0.5
    restart_at: float = 0.0
    restarts: int = 0
    hung: int = 0
    last_exit: int | None = None
    state: str = "starting"  # starting | up | hung | restarting | refused | done | stopped
    seen_mtime: float | None = None
    alive_at: float = 0.0
    pinged: bool = False
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def kind(self) -> Kind | None:
        return self.service.kind if self.service else None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def view(self) -> dict:
        return {"pid": self.pid, "state": self.state, "restarts": self.restarts, "hung": self.hung,
                "last_exit": self.last_exit}


class Supervisor:
    def __init__(self, config: Config, *, with_broker: bool, with_gateway: bool = False,
                 extra: Sequence[tuple[str, list[str]]] = (), env: dict[str, str] | None = None,
                 console: Console | None = None, sink: LogSink | None = None,
                 warnings: Sequence[tuple[str, str]] = ()) -> None:
        self.config = config
        self.with_broker = with_broker
        self.env = dict(os.environ if env is None else env)
        self.console = console or Console()
        self.sink = sink or LogSink(None, self.console)
        self.warnings = list(warnings)  # (alarm kind, detail) raised at start, kept in the status
        self.hung_after_s = float(config.supervisor.hung_after_s)
        self.log = get_logger(component="supervisor")
        cli = [sys.executable, "-m", "mro_edge"]
        self.watchdog_dir = config.data_path / "supervisor"
        self.children = [Child(s.name, cli + ["service", s.name], self._watchdog(s.name), s)
                         for s in run_services(with_broker=with_broker, with_gateway=with_gateway)]
        self.children += [Child(name, cli + argv, self._watchdog(name)) for name, argv in extra]
        self.monitor: Monitor | None = None
        self._stopping = False
        self._status_at = 0.0
        self._changed = True

    def _watchdog(self, name: str) -> Path:
        return self.watchdog_dir / f"{name}.alive"

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    # ---- processes --------------------------------------------------------------------------

    def login_env(self, child: Child) -> dict[str, str]:
        """The child's own broker login: its user and the file with its password (never the
        password itself, never another service's). Nothing when the operator configured one
        login for all (MRO_MQTT_USERNAME) or the child does not speak MQTT."""
        if self.config.mqtt.username:
            return {}
        from services.broker.credentials import SERVICE_ACL, service_user

        name = child.name if child.name in SERVICE_ACL else "operator" if child.service is None else None
        if name is None:
            return {}
        path = self.config.data_path.resolve() / "secrets" / name / "password"
        return {"MRO_MQTT_USERNAME": service_user(name), "MRO_MQTT_PASSWORD_FILE": str(path)}

    def _spawn(self, child: Child) -> subprocess.Popen:
        self.watchdog_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = dict(self.env, MRO_SUPERVISOR_PID=str(os.getpid()), MRO_WATCHDOG_FILE=str(child.watchdog),
                   **self.login_env(child))
        try:
            child.seen_mtime = os.stat(child.watchdog).st_mtime
        except FileNotFoundError:
            child.seen_mtime = None
        child.process = subprocess.Popen(
            child.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=lifeline.die_with_parent(os.getpid()), process_group=0)
        child.started_at = child.alive_at = time.monotonic()
        child.pinged = False
        child.state = "starting"
        child.reader = threading.Thread(target=self._pump, args=(child.name, child.process.stdout),
                                        name=f"output-{child.name}", daemon=True)
        child.reader.start()
        self._changed = True
        self.log.info("service started", child=child.name, pid=child.process.pid, state_transition="STARTED")
        return child.process

    def _pump(self, name: str, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.sink.child_line(name, raw.decode("utf-8", "replace"))
        stream.close()

    def start(self, after_broker: Callable[[], None] | None = None) -> None:
        """Start the broker (and wait until it speaks MQTT), run `after_broker` (the checks that
        need a broker), then every other service. Raises SupervisorError; stops what it started."""
        rest = self.children
        if self.with_broker:
            broker = self.children[0]
            process = self._spawn(broker)
            if not wait_for_broker(self.config, alive=lambda: process.poll() is None):
                host, port = self.config.mqtt.host, self.config.mqtt.port
                raise SupervisorError(f"the embedded broker did not start listening on {host}:{port}"
                                      + (f"; its log is in {self.sink.path}" if self.sink.path else ""))
            broker.state = STATE_UP
            rest = self.children[1:]
        if after_broker:
            after_broker()
        self.monitor = Monitor(self.config)
        self.monitor.start()
        for kind, detail in self.warnings:
            self.log.warning("alarm", alarm=kind, detail=detail, state_transition=f"ALARM_{kind.upper()}")
            self.monitor.alarm("supervisor", kind, detail)
        for child in rest:
            self._spawn(child)

    def watch_once(self) -> None:
        """Restart children that exited (backoff), kill and restart hung ones, track who is up."""
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if child.state not in ("refused", "done", "stopped") and now >= child.restart_at:
                    self._spawn(child)
                continue
            code = child.process.poll()
            if code is not None:
                self._exited(child, code, now)
                continue
            if now - child.started_at > STABLE_AFTER_S:
                child.backoff_s = 0.5
            self._check_alive(child, now)
            self._check_up(child)

    def _exited(self, child: Child, code: int, now: float) -> None:
        child.process = None
        child.last_exit = code
        self._changed = True
        if child.service is None and code == 0:
            child.state = "done"
            return
        if code == REFUSED_EXIT:
            child.state = "refused"
            self.log.error("service refused to start; not restarted", child=child.name, exit_code=code,
                           state_transition="REFUSED")
            self.console.say(
                f"[run] {child.name} refused to start (its reason is above); not restarting it until "
                "the cause is fixed and mro-edge run is started again"
            )
            return
        child.state = "restarting"
        child.restarts += 1
        child.restart_at = now + child.backoff_s
        self.log.warning(
            "service exited; restarting",
            child=child.name,
            exit_code=code,
            backoff_s=child.backoff_s,
            state_transition="RESTARTING",
        )
        self.console.say(f"[run] {child.name} exited with {code}; restarting in {child.backoff_s:.1f} s")
        child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)

    def _check_alive(self, child: Child, now: float) -> None:
        try:
            mtime = os.stat(child.watchdog).st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != child.seen_mtime:
            child.seen_mtime, child.alive_at, child.pinged = mtime, now, True
            return
        limit = self.hung_after_s if child.pinged else max(self.hung_after_s, STARTUP_GRACE_S)
        if now - child.alive_at > limit:
            self._hung(child, now - child.alive_at, now)

    def _hung(self, child: Child, silent_s: float, now: float) -> None:
        process = child.process
        if process is None:
            return
        pid = process.pid
        detail = (
            f"no watchdog ping from {child.name} (pid {pid}) for {silent_s:.0f} s "
            f"(limit supervisor.hung_after_s = {self.hung_after_s:g} s): "
            "stopped or stuck; killed and restarted"
        )
        child.hung += 1
        self.log.error("service hung", child=child.name, pid=pid, silent_s=round(silent_s, 1),
                       state_transition="HUNG")
        self.console.say(f"[run] {child.name} (pid {pid}) is hung: no watchdog ping for {silent_s:.0f} s; "
                         "killing and restarting it")
        if self.monitor and child.kind is not Kind.BROKER:
            self.monitor.publish(self.monitor.topics.status(child.name),
                                 {"service": child.name, "state": "hung", "pid": pid, "detail": detail,
                                  "at": utc_now()}, retain=True)
            self.monitor.alarm(child.name, "hung", detail)
        process.kill()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        child.process = None
        child.last_exit = -signal.SIGKILL
        child.state = "hung"
        child.restarts += 1
        child.restart_at = now + child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
        self._changed = True

    def _check_up(self, child: Child) -> None:
        if child.state != "starting":
            return
        if child.service is not None and child.service.publishes_status:
            status = self.monitor.statuses.get(child.name, {}) if self.monitor else {}
            up = status.get("pid") == child.pid and status.get("state") not in (None, "down", "hung")
        elif child.kind is Kind.GATEWAY:
            from services.gateway.server import split_listen

            try:
                with socket.create_connection(split_listen(self.config.gateway.listen), timeout=0.2):
                    up = True
            except OSError:
                up = False
        else:
            up = time.monotonic() - child.started_at > 1.0
        if up:
            child.state = STATE_UP
            self._changed = True

    def not_up(self) -> list[Child]:
        return [c for c in self.children if c.state not in (STATE_UP, "done")]

    # ---- status -----------------------------------------------------------------------------

    def status_payload(self, state: str = "up") -> dict:
        return {"service": "supervisor", "state": state, "pid": os.getpid(), "at": utc_now(),
                "hung_after_s": self.hung_after_s, "children": {c.name: c.view() for c in self.children},
                "warnings": [kind for kind, _ in self.warnings]}

    def _publish_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.monitor and (
            force or self._changed or now - self._status_at >= self.config.stage.status_interval_s
        ):
            self.monitor.publish(self.monitor.topics.status("supervisor"), self.status_payload(), retain=True)
            self._status_at, self._changed = now, False

    # ---- main loop --------------------------------------------------------------------------

    def supervise(self, after_broker: Callable[[], None] | None = None,
                  on_ready: Callable[[list[Child]], None] | None = None,
                  summary: Callable[[], str] | None = None) -> None:
        """Start everything, keep it running until SIGTERM/SIGINT, then stop in order."""
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        try:
            self.start(after_broker)
            started, ready = time.monotonic(), False
            next_summary = 0.0
            while not self._stopping:
                self.watch_once()
                if self.monitor:
                    self.monitor.drain()
                    self._show_alarms()
                now = time.monotonic()
                if not ready and (not self.not_up() or now - started > READY_TIMEOUT_S):
                    ready = True
                    next_summary = now + self.config.supervisor.console_interval_s
                    if on_ready:
                        on_ready(self.not_up())
                elif ready and summary and now >= next_summary:
                    next_summary = now + self.config.supervisor.console_interval_s
                    self.console.say(summary())
                self._publish_status()
                time.sleep(0.25)
        finally:
            self.stop()

    def _show_alarms(self) -> None:
        if self.monitor is None:
            return
        while True:
            try:
                alarm = self.monitor.alarms.get_nowait()
            except queue.Empty:
                return
            self.console.say(f"[alarm] {alarm.get('service', '?')}: {alarm.get('alarm', '?')}"
                             + (f" ({alarm['detail']})" if alarm.get("detail") else ""))

    def _request_stop(self) -> None:
        self._stopping = True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Services first (they still need the broker to publish `down`), then the broker."""
        services = [c for c in self.children if c.kind is not Kind.BROKER]
        brokers = [c for c in self.children if c.kind is Kind.BROKER]
        self._end(services, timeout_s)
        if self.monitor:
            self.monitor.drain()
            self.monitor.stop(self.status_payload("down"))
        self._end(brokers, timeout_s)
        for child in self.children:
            if child.reader:
                child.reader.join(2)
            if child.state not in ("refused", "done"):
                child.state = "stopped"

    def _end(self, group: list[Child], timeout_s: float) -> None:
        for child in group:
            if child.process and child.process.poll() is None:
                child.process.terminate()
                child.process.send_signal(signal.SIGCONT)  # a stopped child must run to see SIGTERM
        deadline = time.monotonic() + timeout_s
        for child in group:
            if child.process:
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
                child.last_exit = child.process.returncode
                child.process = None


def summary_line(supervisor: Supervisor) -> Callable[[], str]:
    """The console's periodic line: signed records/s, backlog, link state, DLQ count, who is up."""
    last: dict[str, float] = {}

    def line() -> str:
        statuses = supervisor.monitor.statuses if supervisor.monitor else {}
        sign = statuses.get("sign", {})
        processed = sign.get("processed")
        now = time.monotonic()
        rate = "?"
        if isinstance(processed, int):
            if "processed" in last and now > last["at"]:
                rate = f"{max(0.0, (processed - last['processed']) / (now - last['at'])):.1f}"
            last.update(processed=processed, at=now)
        backlog = statuses.get("uplink", {}).get("backlog", "?")
        link = statuses.get("connectivity", {}).get("state", "?")
        stages = service_names(Kind.STAGE)
        dlq = sum(int(statuses.get(s, {}).get("failed") or 0) for s in stages)
        children = supervisor.children
        up = sum(1 for c in children if c.state in (STATE_UP, "done"))
        problems = [f"{c.name} {c.state}" for c in children if c.state not in (STATE_UP, "done")]
        problems += [f"{s} frozen" for s in stages if statuses.get(s, {}).get("state") == "frozen"]
        total = processed if processed is not None else "?"
        text = (
            f"{time.strftime('%H:%M:%S')}  signed {rate}/s (total {total})"
            f"  backlog {backlog}  link {link}  DLQ {dlq}  services {up}/{len(children)} up"
        )
        return text + (f"  ({', '.join(problems)})" if problems else "")

    return line
