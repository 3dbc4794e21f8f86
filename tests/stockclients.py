"""Device clients that never re-send: stock `mosquitto_pub` and plain paho, no receipt handling.

Real RFID readers, torque controllers and scanners publish at QoS 1, take the broker's PUBACK
as delivery and forget the record. These helpers do exactly that and report which records got
their PUBACK, so a test can hold the box to its promise: every PUBACKed valid record ends in
the ledger exactly once.

- `mosquitto_pub` (mosquitto-clients) runs as `mosquitto_pub -d -l -q 1`: one connection per
  burst, one line per record from stdin; it disconnects after the PUBACK of its last line. The
  `-d` trace says which message ids were PUBACKed.
- paho: one `paho.Client` per burst (MQTT 3.1.1, clean session unless asked), `on_publish` as
  the only callback, DISCONNECT once every PUBACK is in or the burst's deadline passed.

Neither subscribes to receipts or re-sends anything. Every wait here is bounded.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from mro_edge.simulator.records import valid_record
from services.registry import SERVICES
from shared.ledger.entry import parse_entry
from shared.runtime.mqtt import mqtt_connack
from shared.runtime.topics import Topics

CLIENTS = ("mosquitto_pub", "paho")
STATION = "HGR1"
_PUBLISH = re.compile(rb"sending PUBLISH \(d(\d), q\d, r\d, m(\d+),")
_PUBACK = re.compile(rb"received PUBACK \(Mid: (\d+)")


def service_client_ids(station: str = STATION) -> list[str]:
    """The services' well-known client ids, `mro-<station>-<client>` (services/registry.py
    `mqtt_clients`), as an attacker would guess them: the services themselves add a tag derived
    from their password (BrokerProc.client_id gives the real one)."""
    return [f"mro-{station}-{name}" for service in SERVICES for name in service.mqtt_clients]


def mosquitto_pub_binary() -> str:
    found = shutil.which("mosquitto_pub")
    if not found:
        raise RuntimeError("mosquitto_pub is not installed; install the Debian package `mosquitto-clients`")
    return found


@dataclass
class StockDevice:
    """A registered device: its broker login and its one `in` topic."""

    kind: str
    device_id: str
    login: tuple[str, str]
    topic: str


def register_devices(broker, specs: Iterable[tuple[str, str]], timeout_s: float = 10.0) -> list[StockDevice]:
    """BrokerCredentials.add_device for each (kind, device_id), then until the broker accepts each login."""
    topics = Topics(broker.station)
    devices = []
    for kind, device_id in specs:
        login = broker.credentials.add_device(device_id, kind)
        devices.append(StockDevice(kind, device_id, login, topics.device_in(kind, device_id)))
    broker.reload()
    deadline = time.monotonic() + timeout_s
    for device in devices:
        while mqtt_connack(broker.port, *device.login) != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{broker.kind} never accepted the login of {device.device_id}")
            time.sleep(0.05)
    return devices


def make_records(rng: random.Random, device: StockDevice, n: int, seen: set[str] | None = None,
                 station: str = STATION) -> list[tuple[str, bytes]]:
    """n valid records of `device` as (event_id, one-line JSON payload), each with unique content
    (the same content under a new event_id would be a `duplicate`, not a ledger entry)."""
    seen = set() if seen is None else seen
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        record = valid_record(rng, station=station, device_kind=device.kind, device_id=device.device_id)
        content = json.dumps({k: v for k, v in record.items() if k != "event_id"}, sort_keys=True)
        if content in seen:
            continue
        seen.add(content)
        out.append((record["event_id"], json.dumps(record, separators=(",", ":")).encode()))
    return out


@dataclass
class Burst:
    """One connection's worth of records and what the broker acknowledged."""

    client: str
    device_id: str
    event_ids: list[str]
    acked: set[str] = field(default_factory=set)
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    error: str | None = None
    puback_at: dict[str, float] = field(default_factory=dict)  # event_id -> perf_counter (paho only)
    sent_at: dict[str, float] = field(default_factory=dict)


def mosquitto_pub_burst(
    port: int,
    device: StockDevice,
    records: list[tuple[str, bytes]],
    *,
    client_id: str | None = None,
    persistent: bool = False,
    timeout_s: float = 60.0,
) -> Burst:
    """`mosquitto_pub -d -l -q 1` with one line per record on stdin; PUBACKed ids from its trace."""
    burst = Burst("mosquitto_pub", device.device_id, [e for e, _ in records])
    command = [mosquitto_pub_binary(), "-d", "-h", "127.0.0.1", "-p", str(port), "-u", device.login[0],
               "-P", device.login[1], "-q", "1", "-t", device.topic, "-l"]
    if client_id:
        command += ["-i", client_id]
    if persistent:
        command += ["-c"]
    lines = []
    for _, payload in records:
        if b"\n" in payload:
            raise ValueError("mosquitto_pub -l sends one line per message; the payload has a newline")
        lines.append(payload + b"\n")
    burst.started = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(b"".join(lines), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        burst.error = f"mosquitto_pub still running after {timeout_s:.0f} s; killed"
    burst.seconds = time.perf_counter() - burst.started
    burst.returncode = proc.returncode
    burst.acked = set(_acked_lines(out, burst.event_ids))
    if proc.returncode and not burst.error:
        burst.error = f"mosquitto_pub exited {proc.returncode}: {out[-300:].decode(errors='replace')}"
    return burst


def _acked_lines(trace: bytes, event_ids: list[str]) -> list[str]:
    """Line k is the k-th first-time (d0) PUBLISH; a PUBACK names its message id."""
    mid_of_line: list[int] = []
    for dup, mid in _PUBLISH.findall(trace):
        if dup == b"0":
            mid_of_line.append(int(mid))
    line_of_mid: dict[int, int] = {}
    for index, mid in enumerate(mid_of_line[:len(event_ids)]):
        line_of_mid[mid] = index  # one burst stays far below 65,535 messages: ids are unique
    acked = {int(m) for m in _PUBACK.findall(trace)}
    return [event_ids[line_of_mid[m]] for m in acked if m in line_of_mid]


def paho_burst(port: int, device: StockDevice, records: list[tuple[str, bytes]], *,
               client_id: str | None = None, persistent: bool = False, timeout_s: float = 60.0,
               rate: float | None = None) -> Burst:
    """A plain paho client: connect, publish every record at QoS 1 (at `rate` per second if
    given), DISCONNECT once every PUBACK is in (or at the deadline). No receipts, no re-send."""
    burst = Burst("paho", device.device_id, [e for e, _ in records])
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=not persistent,
                         protocol=paho.MQTTv311)
    client.username_pw_set(*device.login)
    lock = threading.Condition()
    mids: dict[int, str] = {}
    early: dict[int, float] = {}  # PUBACKs that beat publish() returning its mid
    connected = threading.Event()

    def on_publish(_c, _u, mid, _reason, _props) -> None:
        now = time.perf_counter()
        with lock:
            event_id = mids.get(mid)
            if event_id is None:
                early[mid] = now
            else:
                burst.acked.add(event_id)
                burst.puback_at[event_id] = now
            lock.notify_all()

    def on_connect(_c, _u, _flags, reason, _props) -> None:
        if not reason.is_failure:
            connected.set()

    client.on_publish = on_publish
    client.on_connect = on_connect
    burst.started = time.perf_counter()
    deadline = burst.started + timeout_s
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except OSError as exc:
        burst.error = f"connect failed: {exc}"
        return burst
    client.loop_start()
    try:
        if not connected.wait(min(10.0, timeout_s)):
            burst.error = "no CONNACK"
            return burst
        start = time.perf_counter()
        for i, (event_id, payload) in enumerate(records):
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            burst.sent_at[event_id] = time.perf_counter()
            info = client.publish(device.topic, payload, qos=1)
            with lock:
                mids[info.mid] = event_id
                if info.mid in early:
                    burst.acked.add(event_id)
                    burst.puback_at[event_id] = early.pop(info.mid)
        with lock:
            lock.wait_for(lambda: len(burst.acked) >= len(records), max(0.0, deadline - time.perf_counter()))
        if len(burst.acked) < len(records):
            burst.error = f"{len(records) - len(burst.acked)} PUBACKs missing after {timeout_s:.0f} s"
    finally:
        client.disconnect()
        client.loop_stop()
        burst.seconds = time.perf_counter() - burst.started
    return burst


def burst(client: str, port: int, device: StockDevice, records: list[tuple[str, bytes]], **kwargs) -> Burst:
    if client == "mosquitto_pub":
        return mosquitto_pub_burst(port, device, records, **kwargs)
    if client == "paho":
        return paho_burst(port, device, records, **kwargs)
    raise ValueError(f"client {client!r} must be one of {CLIENTS}")


class BurstRunner:
    """Several devices, each sending its records in bursts (one connection per burst) from its
    own thread; `clients` alternates per burst. Call `start()`, do your damage, then `join()`."""

    def __init__(self, broker, devices: list[StockDevice], records: dict[str, list[tuple[str, bytes]]], *,
                 burst_size: int, clients: tuple[str, ...] = CLIENTS, pause_s: float = 0.0,
                 burst_timeout_s: float = 60.0) -> None:
        self.broker = broker
        self.devices = devices
        self.records = records
        self.burst_size = burst_size
        self.clients = clients
        self.pause_s = pause_s
        self.burst_timeout_s = burst_timeout_s
        self.bursts: list[Burst] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(d, i), daemon=True, name=f"burst-{d.device_id}")
            for i, d in enumerate(devices)
        ]

    def _run(self, device: StockDevice, offset: int) -> None:
        records = self.records[device.device_id]
        for number, start in enumerate(range(0, len(records), self.burst_size)):
            client = self.clients[(number + offset) % len(self.clients)]
            try:
                result = burst(client, self.broker.port, device, records[start:start + self.burst_size],
                               timeout_s=self.burst_timeout_s)
            except Exception as exc:  # reported with the burst, never silently lost
                result = Burst(
                    client,
                    device.device_id,
                    [e for e, _ in records[start : start + self.burst_size]],
                    error=f"{type(exc).__name__}: {exc}",
                )
            with self._lock:
                self.bursts.append(result)
            if self.pause_s:
                time.sleep(self.pause_s)

    def start(self) -> BurstRunner:
        for thread in self._threads:
            thread.start()
        return self

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.alive():
            raise AssertionError(f"device bursts still running after {timeout_s:.0f} s")

    def run(self, timeout_s: float) -> BurstRunner:
        self.start()
        self.join(timeout_s)
        return self

    @property
    def sent(self) -> set[str]:
        return {e for b in self.bursts for e in b.event_ids}

    @property
    def acked(self) -> set[str]:
        return {e for b in self.bursts for e in b.acked}


def ledger_event_ids(pipeline) -> Counter:
    """event_id -> number of ledger entries carrying it (service-made entries have none)."""
    counts: Counter = Counter()
    for entry in pipeline.ledger():
        event_id = parse_entry(entry.entry).body.get("event_id")
        if event_id is not None:
            counts[event_id] += 1
    return counts


@dataclass
class Outcome:
    acked: int
    sent: int
    landed_acked: int
    lost: list[str]
    duplicated: list[str]
    strangers: list[str]
    landed_unacked: int

    def __str__(self) -> str:
        return (f"{self.landed_acked}/{self.acked} PUBACKed records in the ledger ({len(self.lost)} lost), "
                f"{self.sent - self.acked} sent without PUBACK ({self.landed_unacked} of them landed), "
                f"{len(self.duplicated)} duplicated, {len(self.strangers)} unknown")


def settle(pipeline, acked: set[str], sent: set[str], *, stall_s: float = 20.0, cap_s: float = 180.0,
           interval_s: float = 0.5, known: set[str] | None = None) -> Outcome:
    """Wait until every PUBACKed record is in the ledger, or the ledger has not grown for
    `stall_s` (a lost record never arrives), or `cap_s`; then count. Ledger entries outside
    `known` (default: `sent`) are strangers: records nobody sent."""
    start = time.monotonic()
    last_size, last_move = -1, start
    while True:
        counts = ledger_event_ids(pipeline)
        now = time.monotonic()
        if acked <= counts.keys() or now - last_move > stall_s or now - start > cap_s:
            break
        size = sum(counts.values())
        if size != last_size:
            last_size, last_move = size, now
        time.sleep(interval_s)
    time.sleep(interval_s)  # whatever was in flight to sign, to catch duplicates
    counts = ledger_event_ids(pipeline)
    return Outcome(
        acked=len(acked),
        sent=len(sent),
        landed_acked=len(acked & counts.keys()),
        lost=sorted(acked - counts.keys()),
        duplicated=sorted(e for e, n in counts.items() if n > 1),
        strangers=sorted(counts.keys() - (sent if known is None else known | sent)),
        landed_unacked=len((sent - acked) & counts.keys()),
    )


def assert_exactly_once(outcome: Outcome, *, max_lost: int = 0, what: str = "") -> None:
    prefix = f"{what}: " if what else ""
    assert not outcome.duplicated, f"{prefix}{outcome}; duplicated e.g. {outcome.duplicated[:5]}"
    assert not outcome.strangers, f"{prefix}{outcome}; unknown e.g. {outcome.strangers[:5]}"
    assert len(outcome.lost) <= max_lost, f"{prefix}{outcome}; lost e.g. {outcome.lost[:5]}"


class Watcher:
    """A paho subscriber (any login) that keeps (topic, payload, arrival time)."""

    def __init__(self, port: int, login: tuple[str, str] | None, filters: list[str], *,
                 client_id: str = "", persistent: bool = False, on_message: Callable | None = None) -> None:
        self.messages: list[tuple[str, bytes, float]] = []
        self.connack: paho.ReasonCode | None = None
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._connacked = threading.Event()
        self._extra = on_message
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                             protocol=paho.MQTTv311, reconnect_on_failure=False)
        if login:
            client.username_pw_set(*login)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        self.filters = filters
        self.client = client
        self.port = port

    def _on_connect(self, client, _u, flags, reason, _p) -> None:
        self.connack = reason
        self.session_present = flags.session_present
        self._connacked.set()
        if not reason.is_failure and self.filters:
            client.subscribe([(f, 1) for f in self.filters])
        elif not self.filters:
            self._subscribed.set()

    def _on_message(self, _c, _u, message) -> None:
        now = time.perf_counter()
        with self._lock:
            self.messages.append((message.topic, message.payload, now))
        if self._extra:
            self._extra(message.topic, message.payload, now)

    def start(self, timeout_s: float = 10.0) -> Watcher:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self._connacked.wait(timeout_s):
            self.stop()
            raise TimeoutError("no CONNACK")
        if self.connack is not None and not self.connack.is_failure and not self._subscribed.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"no SUBACK for {self.filters}")
        return self

    def seen(self) -> list[tuple[str, bytes, float]]:
        with self._lock:
            return list(self.messages)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def receipts_watcher(broker, on_receipt: Callable[[str, str, float], None] | None = None) -> Watcher:
    """Every device receipt on the station (the operator's login): `on_receipt(event_id, status, t)`."""

    def handle(_topic: str, payload: bytes, now: float) -> None:
        try:
            receipt = json.loads(payload)
        except ValueError:
            return
        if on_receipt and isinstance(receipt, dict):
            on_receipt(receipt.get("event_id"), receipt.get("status"), now)

    return Watcher(broker.port, broker.service_user, [Topics(broker.station).receipt("+")],
                   on_message=handle).start()
