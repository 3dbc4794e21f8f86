"""Test harness for the link: a real gateway process behind a controllable proxy, the uplink and
heartbeat services, and a recorder of every connectivity state they publish.

    with EdgeStack(tmp_path, db_url) as edge:     # mosquitto, gateway, proxy, all six services
        edge.proxy.set("refuse")
        edge.wait_state("ISOLATED")
        edge.send(10_000)                          # several devices in parallel, waits for `recorded`
        edge.proxy.set("pass")
        edge.wait_state("CONNECTED")
        edge.assert_gateway_has_ledger()

Everything is a real OS process (the gateway too, so it can be kill -9'd), on real Mosquitto,
real LMDB, real SQLite or PostgreSQL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mro_edge.simulator.records import valid_record
from services.gateway.admin import register_edge
from services.gateway.storage import open_storage
from shared.contract import decode_record, idempotency_key, normalize
from shared.ledger.entry import SignedEntry
from shared.ledger.keys import SigningKey
from shared.ledger.verify import verify_chain
from shared.runtime.config import Config
from shared.runtime.mqtt import MqttLink
from shared.runtime.topics import Topics
from tests.brokers import free_port, start_broker
from tests.linkfault import LinkFault
from tests.pipeline import ROOT, STAGES, Pipeline, wait_until
from tests.support.gateway import gateway_reader

PG_ADMIN_URL = os.environ.get("MRO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

# Fast link settings for tests: probes every 0.3 s, a probe over 500 ms is slow (a loaded CI
# machine answers a healthy /health well within that). The probe interval is below the probe's
# timeout (500 ms + 1 s), as on a box whose gateway is black-holed. An unchanged link state is
# published again every 4 s; DEGRADED for over 1 s raises an alarm.
LINK_SETTINGS = {
    "MRO_LINK_PROBE_INTERVAL_S": "0.3",
    "MRO_LINK_SLOW_PROBE_MS": "500",
    "MRO_LINK_ISOLATE_AFTER": "3",
    "MRO_LINK_STATE_REFRESH_S": "4",
    "MRO_LINK_DEGRADED_ALARM_S": "1",
    "MRO_UPLINK_BREAKER_RESET_S": "1",
    "MRO_UPLINK_REQUEST_TIMEOUT_S": "5",
    "MRO_STAGE_STATUS_INTERVAL_S": "1",
}
FLEET = (("rfid_reader", "RFID-01"), ("torque_wrench", "TQW-07"), ("tablet", "TAB-12"), ("barcode_scanner", "BCS-03"))

# DESIGN.md section 5: every transition the connectivity state machine may take.
LEGAL = {
    ("CONNECTED", "DEGRADED"), ("DEGRADED", "CONNECTED"), ("DEGRADED", "ISOLATED"),
    ("ISOLATED", "RECONCILING"), ("RECONCILING", "CONNECTED"), ("RECONCILING", "ISOLATED"),
}


@contextmanager
def database(backend: str, tmp_path: Path):
    """A fresh gateway database URL: a SQLite file, or a scratch PostgreSQL database (dropped
    after). A PostgreSQL server that cannot be reached fails the test; it never skips it."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/central/gateway.db"
        return
    import psycopg

    from tests.support.gateway import scratch_postgres

    try:
        scratch = scratch_postgres(PG_ADMIN_URL)
        url = scratch.__enter__()
    except psycopg.OperationalError as exc:
        raise AssertionError(f"PostgreSQL is required ({PG_ADMIN_URL}; set MRO_TEST_POSTGRES_URL): {exc}") from None
    try:
        yield url
    finally:
        scratch.__exit__(None, None, None)


class GatewayProc:
    """`mro-edge service gateway` as its own process on a fixed port, so it can be kill -9'd and
    restarted where the proxy expects it."""

    def __init__(self, db_url: str, data_dir: Path, port: int | None = None, **env: str):
        """`env`: more MRO_GATEWAY_* settings (MRO_GATEWAY_TLS_CERT/_KEY serve HTTPS; the health
        probe then trusts MRO_GATEWAY_TLS_CERT's issuer, given as `ca_file`)."""
        self.db_url = db_url
        self.port = port or free_port()
        self.tls = bool(env.get("MRO_GATEWAY_TLS_CERT"))
        self.ca_file = env.pop("ca_file", "")
        self.client_cert = env.pop("client_cert", None)  # (cert, key) for a gateway that wants mTLS
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "gateway.log"
        self.env = dict(os.environ, MRO_GATEWAY_LISTEN=f"127.0.0.1:{self.port}", MRO_GATEWAY_DB_URL=db_url,
                        MRO_DATA_DIR=str(self.data_dir), MRO_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT), **env)
        self.proc: subprocess.Popen | None = None

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify` for a test client of this gateway (its CA, the client certificate)."""
        if not self.tls:
            return True
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert:
            context.load_cert_chain(*self.client_cert)
        return context

    def _probe(self) -> bool:
        return httpx.get(self.url + "/health", timeout=1, verify=self.verify()).status_code == 200

    def start(self, timeout_s: float = 30) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mro_edge", "service", "gateway"], env=self.env,
                                         stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self._probe():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the gateway did not answer /health within {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """kill -9: whatever it had not committed is gone, whatever it had committed must stay."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class Recorded:
    at: float
    payload: dict


@dataclass
class TopicRecorder:
    """Every message on a few topics (the retained one first), with its arrival time."""

    config: Config
    topics: tuple[str, ...]
    messages: dict[str, list[Recorded]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.link = MqttLink(self.config, client_id=f"test-recorder-{time.monotonic_ns()}",
                             subscriptions=[(t, 1) for t in self.topics], persistent=False)
        self.errors: list[str] = []
        self.link.fatal = self._fatal  # a test process reports a broken handler; it does not exit
        for topic in self.topics:
            self.messages[topic] = []
            self.link.direct[topic] = lambda payload, topic=topic: self._keep(topic, payload)

    def _fatal(self, callback: str, exc: BaseException) -> None:
        self.errors.append(f"{callback}: {type(exc).__name__}: {exc}")

    def _keep(self, topic: str, payload: bytes) -> None:
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = {"unreadable": payload[:200].decode(errors="replace")}
        with self._lock:
            self.messages[topic].append(Recorded(time.monotonic(), decoded))

    def start(self) -> TopicRecorder:
        self.link.start(wait_s=20)
        return self

    def stop(self) -> None:
        self.link.stop()

    def of(self, topic: str) -> list[Recorded]:
        assert not self.errors, f"the recorder's MQTT callbacks raised: {self.errors}"
        with self._lock:
            return list(self.messages[topic])


class EdgeStack:
    """Mosquitto, ingest/validate/sign, uplink and heartbeat, a gateway process and the proxy
    between them. `settings` are extra MRO_* variables for every service."""

    def __init__(self, tmp_path: Path, db_url: str, *, start_link: bool = True, stages: tuple[str, ...] = STAGES,
                 stage_env: dict[str, dict[str, str]] | None = None, gateway_env: dict | None = None,
                 **settings: str):
        """`stages`: the pipeline stages started with the stack (the others: `start_stage`).
        `gateway_env`: GatewayProc's extra settings (TLS); with MRO_GATEWAY_TLS_CERT the link is https://."""
        self.tmp_path = Path(tmp_path)
        self.stages = tuple(stages)
        self.db_url = db_url
        self.data_dir = self.tmp_path / "data"
        self.settings = {**LINK_SETTINGS, **settings}
        self.start_link = start_link
        self.stage_env = stage_env or {}
        self.gateway_env = dict(gateway_env or {})
        self._stack = ExitStack()
        self._devices: list = []
        self._rng = random.Random(20260)
        self._sent = 0
        self._keys: set[str] = set()

    # -- lifecycle
    def __enter__(self) -> EdgeStack:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self._stack.close()

    def _start(self) -> None:
        stack = self._stack
        self.broker = start_broker("mosquitto", self.data_dir)
        stack.callback(self.broker.stop)
        self.gateway = GatewayProc(self.db_url, self.tmp_path / "central", **self.gateway_env)
        self.gateway.start()
        stack.callback(self.gateway.stop)
        self.proxy = LinkFault(self.gateway.port)
        stack.callback(self.proxy.close)
        link_url = self.proxy.url.replace("http://", "https://") if self.gateway.tls else self.proxy.url
        self.pipeline = Pipeline(self.broker, self.data_dir, MRO_LINK_GATEWAY_URL=link_url, **self.settings)
        stack.callback(self.pipeline.stop)
        config = self.config
        self.topics = Topics(config.station)
        self.origin = config.origin
        self.key = SigningKey.load_or_create(self.data_dir / "keys")
        self.token = register_edge(self.db_url, self.origin, self.key.public_pem())
        token_path = self.data_dir / "uplink" / "token"
        token_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token_path.write_text(self.token + "\n")
        self.recorder = TopicRecorder(config, (self.topics.status("connectivity"), self.topics.alarm,
                                               *(self.topics.status(s) for s in STAGES + ("uplink",)))).start()
        stack.callback(self.recorder.stop)
        plain = [name for name in self.stages if name not in self.stage_env]
        if plain:
            self.pipeline.start(*plain, wait=False)
        for name in self.stages:
            if name in self.stage_env:
                self._start_with(name, self.stage_env[name], wait=False)
        if self.stages:
            self.pipeline.wait_up(*self.stages)
        if self.start_link:
            self.start_uplink()
            self.start_heartbeat()
            self.wait_state("CONNECTED")

    @property
    def config(self) -> Config:
        return self.pipeline.config

    def start_uplink(self, **env: str) -> None:
        self._start_with("uplink", env)

    def start_heartbeat(self, **env: str) -> None:
        self._start_with("heartbeat", env)

    def start_stage(self, name: str, **env: str) -> None:
        self._start_with(name, self.stage_env.get(name, {}) | env)

    def _start_with(self, name: str, env: dict[str, str], wait: bool = True) -> None:
        """Start one service, with extra environment for this start only."""
        saved = dict(self.pipeline.env)
        self.pipeline.env.update(env)
        try:
            self.pipeline.start(name, wait=wait)
        finally:
            self.pipeline.env = saved

    def status_of(self, service: str) -> list[dict]:
        """Every status `service` published since the stack started (stages and uplink)."""
        return [m.payload for m in self.recorder.of(self.topics.status(service))]

    # -- what the box says
    @property
    def connectivity(self) -> list[Recorded]:
        return self.recorder.of(self.topics.status("connectivity"))

    def states(self, since: float = 0.0) -> list[str]:
        """The states walked from `since` (time.monotonic()): the state published last before it,
        then every change after it (consecutive repeats collapsed)."""
        walked: list[str] = []
        for message in self.connectivity:
            state = message.payload.get("state")
            if message.at < since:
                walked[:] = [state]
            elif not walked or walked[-1] != state:
                walked.append(state)
        return walked

    def state(self) -> str | None:
        messages = self.connectivity
        return messages[-1].payload.get("state") if messages else None

    def wait_state(self, state: str, timeout_s: float = 30) -> float:
        """Until the heartbeat publishes `state`; returns when it did (monotonic)."""
        def reached():
            messages = self.connectivity
            return messages[-1].at if messages and messages[-1].payload.get("state") == state else None

        try:
            return wait_until(reached, timeout_s, 0.02, f"connectivity {state}")
        except AssertionError:
            raise AssertionError(f"connectivity never reached {state}; walked {self.states()}; "
                                 f"uplink: {self.uplink_status()}\nheartbeat log:\n"
                                 f"{self.pipeline.log_tail('heartbeat')}\nuplink log:\n"
                                 f"{self.pipeline.log_tail('uplink')}") from None

    def wait_uplink(self, predicate, timeout_s: float = 30, what: str = "the uplink status") -> dict:
        """Until the uplink's latest status satisfies `predicate`; returns that status."""
        def check():
            status = self.uplink_status()
            return status if status and predicate(status) else None

        try:
            return wait_until(check, timeout_s, 0.02, what)
        except AssertionError:
            raise AssertionError(f"timed out waiting for {what}; last uplink status {self.uplink_status()}\n"
                                 f"{self.pipeline.log_tail('uplink')}") from None

    def uplink_status(self) -> dict:
        messages = self.recorder.of(self.topics.status("uplink"))
        return messages[-1].payload if messages else {}

    def alarms(self) -> list[dict]:
        return [m.payload for m in self.recorder.of(self.topics.alarm)]

    # -- records
    def devices(self) -> list:
        if not self._devices:
            self._devices = [self.pipeline.device(kind, device_id) for kind, device_id in FLEET]
        return self._devices

    def send(self, count: int, *, wait: bool = True, timeout_s: float = 120) -> None:
        """`count` valid, distinct records, spread over the fleet and sent in parallel; with
        `wait`, until every one has its `recorded` receipt."""
        devices = self.devices()
        per_device: list[list[tuple[str, bytes]]] = [[] for _ in devices]
        station = self.pipeline.station
        i = 0
        while i < count:
            index = i % len(devices)
            device = devices[index]
            record = valid_record(self._rng, station=station, device_kind=device.kind, device_id=device.device_id)
            payload = json.dumps(record).encode()
            key = idempotency_key(normalize(decode_record(payload, station=station, device_kind=device.kind,
                                                          device_id=device.device_id)))
            if key in self._keys:
                continue  # the same content twice would be one record: keep the count exact
            self._keys.add(key)
            per_device[index].append((record["event_id"], payload))
            i += 1
        self._sent += count

        def publish(device, records) -> None:
            for event_id, payload in records:
                device.send(event_id, payload)

        threads = [threading.Thread(target=publish, args=(d, r)) for d, r in zip(devices, per_device, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if wait:
            self.wait_recorded(timeout_s)

    def wait_recorded(self, timeout_s: float = 120) -> None:
        def settled() -> bool:
            for device in self._devices:
                device.resend_unreceipted()
            return not any(device.outstanding() for device in self._devices)

        wait_until(settled, timeout_s, 0.2, "every record's `recorded` receipt")
        for device in self._devices:
            for event_id, sent in device.sent.items():
                assert sent.final and sent.final["status"] in ("recorded", "duplicate"), (event_id, sent.receipts)
                assert sent.final.get("seq") is not None, (event_id, sent.receipts)

    @property
    def sent(self) -> int:
        return self._sent

    def ledger(self) -> list[SignedEntry]:
        return self.pipeline.ledger()

    # -- the central side
    def gateway_head(self) -> tuple[int, str]:
        """Straight from the gateway (not through the proxy)."""
        response = httpx.get(self.gateway.url + "/v1/head", headers={"Authorization": f"Bearer {self.token}"},
                             timeout=10, verify=self.gateway.verify())
        response.raise_for_status()
        body = response.json()
        return body["seq"], body["hash"]

    def gateway_entries(self) -> list[SignedEntry]:
        storage = open_storage(self.db_url, pool_size=1)
        try:
            out: list[SignedEntry] = []
            while True:
                with storage.transaction(write=False) as tx:
                    rows = tx.entries(self.origin, from_seq=len(out), limit=5000)
                if not rows:
                    return out
                out.extend(SignedEntry(seq=r["seq"], idem=r["idem"], entry=bytes(r["entry"]), hash=r["hash"],
                                       signature=bytes(r["signature"]), kid=r["kid"]) for r in rows)
        finally:
            storage.close()

    def gateway_count(self) -> int:
        with gateway_reader(self.db_url) as tx:
            return tx.count_entries(self.origin)

    def assert_gateway_has_ledger(self, expected: int) -> None:
        """The gateway holds exactly the local ledger: same count, same bytes, chain verified,
        same head hash; and the ledger holds exactly the `expected` records."""
        local = self.ledger()
        assert len(local) == expected, f"the local ledger holds {len(local)} entries, expected {expected}"
        assert len({e.idem for e in local}) == expected, "a record appears twice in the local ledger"
        count = self.gateway_count()  # read once: the message must show what was compared
        assert count == expected, f"the gateway holds {count} rows, expected {expected}"
        central = self.gateway_entries()
        assert verify_chain(central, {self.key.kid: self.key.public_bytes}, expect_count=expected) == expected
        assert [(e.seq, e.hash, e.entry, e.signature) for e in central] == \
            [(e.seq, e.hash, e.entry, e.signature) for e in local], "the gateway's chain differs from the ledger"
        assert self.gateway_head() == (local[-1].seq, local[-1].hash)


def assert_legal_walk(walked: list[str]) -> None:
    for before, after in zip(walked, walked[1:], strict=False):
        assert (before, after) in LEGAL, f"illegal transition {before} -> {after} in {walked}"
