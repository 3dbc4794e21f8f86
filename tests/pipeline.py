"""Test harness: the real services as real processes against a real broker and real LMDB.

Tests start, kill -9 and restart processes exactly as an operator (or a power cut) would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mro_edge.simulator.devices import SimulatedDevice
from services.broker.credentials import BrokerCredentials
from shared.ledger.entry import SignedEntry
from shared.ledger.store import iter_entries, open_ledger
from shared.runtime.config import Config, load_config
from shared.runtime.store import Store, StoreError

STAGES = ("ingest", "validate", "sign")
ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {message}")


class Pipeline:
    """The ingest, validate and sign services of one station, each its own OS process."""

    def __init__(self, broker, data_dir: Path, station: str = "HGR1", **settings: str):
        self.broker = broker
        self.data_dir = Path(data_dir)
        self.station = station
        self.env = dict(os.environ)
        self.env.update(
            MRO_DATA_DIR=str(self.data_dir),
            MRO_MQTT_URL=broker.url,
            MRO_STATION=station,
            MRO_STAGE_REDELIVER_AFTER_S="3",
            MRO_STAGE_STATUS_INTERVAL_S="1",
            MRO_LOG_LEVEL="WARNING",
            PYTHONPATH=str(ROOT),
        )
        self.env.update(getattr(broker, "client_env", {}))  # mqtts:// and its CA, for a TLS broker
        self.env.update({k.upper(): v for k, v in settings.items()})
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = self.data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.devices: list[SimulatedDevice] = []

    @property
    def config(self) -> Config:
        return load_config(env=self.env)

    def start(self, *names: str, wait: bool = True) -> None:
        names = names or STAGES
        for name in names:
            log = open(self.logs / f"{name}.log", "ab")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "mro_edge", "service", name], env=self.env, stdout=log, stderr=log,
                cwd=ROOT,
            )
        if wait:
            self.wait_up(*names)

    def wait_up(self, *names: str, timeout_s: float = 30) -> None:
        """Until each service has subscribed (it publishes `up` right after): on a fresh broker,
        records published before a stage's first subscription have no session to wait in."""
        from mro_edge.cli import read_statuses

        def up() -> bool:
            statuses = read_statuses(self.config, 0.3)
            return all(statuses.get(n, {}).get("state") == "up" and statuses[n].get("pid") == self.procs[n].pid
                       for n in names)

        wait_until(up, timeout_s, 0.2, f"{', '.join(names)} to be up")

    def kill(self, name: str) -> None:
        """kill -9: no chance to ack, flush or say goodbye."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str) -> None:
        self.start(name)

    def stop(self) -> None:
        for device in self.devices:
            device.stop()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def device(self, kind: str, device_id: str, resend_after_s: float = 3.0) -> SimulatedDevice:
        credentials = BrokerCredentials(self.data_dir / "broker", self.station).add_device(device_id, kind)
        self.broker.reload()
        device = SimulatedDevice(self.config, kind, device_id, credentials, resend_after_s=resend_after_s)
        wait_until(lambda: _try_start(device), 20, 0.5, f"device {device_id} to connect")
        self.devices.append(device)
        return device

    def ledger(self) -> list[SignedEntry]:
        try:
            store = open_ledger(self.config)
        except StoreError:
            return []
        try:
            return list(iter_entries(store))
        finally:
            store.close()

    def dlq(self, stage: str) -> list[dict]:
        path = self.data_dir / stage
        if not (path / "data.mdb").exists():
            return []
        store = Store(path, ("dlq",), readonly=True)
        try:
            with store.read() as txn:
                return [json.loads(v) for _, v in txn.cursor(db=store.table("dlq"))]
        finally:
            store.close()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _try_start(device: SimulatedDevice) -> bool:
    try:
        device.start(wait_s=5)
        return True
    except ConnectionError:
        device.client.loop_stop()
        return False
