"""`mro-edge simulate`: a hangar's devices sending realistic records, and a check of the answers.

Each run mixes valid records of every type, bad ones (one per contract rule, at `bad_share`),
exact re-sends and the same content under a new event_id, then waits for every record's final
receipt and reports what is missing. The exit status is non-zero if anything is.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from mro_edge.simulator.devices import SimulatedDevice
from mro_edge.simulator.records import bad_cases, valid_record
from shared.contract import ContractError, decode_record
from shared.runtime.config import Config

DEFAULT_FLEET = (("rfid_reader", "RFID-01"), ("torque_wrench", "TQW-07"), ("tablet", "TAB-12"),
                 ("barcode_scanner", "BCS-03"))


@dataclass
class SimulationReport:
    sent: int = 0
    valid: int = 0
    bad: int = 0
    resent: int = 0
    same_content: int = 0
    recorded: int = 0
    rejected: int = 0
    duplicates: int = 0
    resends_after_timeout: int = 0
    missing: int = 0
    wrong_outcome: int = 0
    unmatched_rejections_expected: int = 0
    unmatched_rejections_seen: int = 0

    @property
    def ok(self) -> bool:
        return (self.missing == 0 and self.wrong_outcome == 0
                and self.unmatched_rejections_seen >= self.unmatched_rejections_expected)


def provision_fleet(config: Config, fleet=DEFAULT_FLEET) -> dict[str, tuple[str, tuple[str, str]]]:
    """Broker credentials for the simulated devices, made once and kept beside the broker files."""
    from services.broker.credentials import BrokerCredentials

    broker_dir = config.data_path / "broker"
    path = Path(broker_dir) / "simulator-devices.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    credentials = BrokerCredentials(broker_dir, config.station)
    changed = False
    for kind, device_id in fleet:
        if device_id not in known:
            known[device_id] = [kind, list(credentials.add_device(device_id, kind))]
            changed = True
    if changed:
        path.write_text(json.dumps(known))
        path.chmod(0o600)
    return {device_id: (kind, tuple(creds)) for device_id, (kind, creds) in known.items()
            if device_id in dict((d, k) for k, d in fleet)}


def reported_event_id(payload: bytes, station: str, kind: str, device_id: str) -> str | None:
    """The event_id the pipeline can read from a payload, i.e. the one its receipt will carry."""
    try:
        return decode_record(payload, station=station, device_kind=kind, device_id=device_id).event_id
    except ContractError as exc:
        return exc.event_id


class Simulation:
    def __init__(self, config: Config, devices: list[SimulatedDevice], *, seed: int | None = None,
                 bad_share: float = 0.05, duplicate_share: float = 0.03):
        self.config = config
        self.devices = devices
        self.rng = random.Random(seed)
        self.bad_share = bad_share
        self.duplicate_share = duplicate_share
        self.report = SimulationReport()
        self._bad_pool: dict[str, list] = {}
        self._valid_sent: list[tuple[SimulatedDevice, dict]] = []
        self.stop = threading.Event()

    def _bad_case(self, device: SimulatedDevice):
        pool = self._bad_pool.get(device.device_id)
        if not pool:
            pool = bad_cases(self.rng, station=self.config.station, device_kind=device.kind,
                             device_id=device.device_id, received_at=datetime.now(UTC))
            self.rng.shuffle(pool)
            self._bad_pool[device.device_id] = pool
        return pool.pop()

    def send_one(self, device: SimulatedDevice) -> None:
        roll = self.rng.random()
        report = self.report
        report.sent += 1
        if roll < self.bad_share:
            case = self._bad_case(device)
            event_id = reported_event_id(case.payload, self.config.station, device.kind, device.device_id)
            device.send(event_id, case.payload, expect="rejected")
            report.bad += 1
            if event_id is None:
                report.unmatched_rejections_expected += 1
        elif roll < self.bad_share + self.duplicate_share and self._valid_sent:
            original_device, record = self.rng.choice(self._valid_sent)
            if self.rng.random() < 0.5:
                original_device.send(record["event_id"], json.dumps(record).encode())
                report.resent += 1
            else:
                copy = dict(record, event_id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)))
                original_device.send(copy["event_id"], json.dumps(copy).encode(), expect="duplicate")
                report.same_content += 1
        else:
            record = valid_record(self.rng, station=self.config.station, device_kind=device.kind,
                                  device_id=device.device_id)
            device.send(record["event_id"], json.dumps(record).encode())
            self._valid_sent.append((device, record))
            if len(self._valid_sent) > 1000:
                self._valid_sent.pop(0)
            report.valid += 1

    def run(
        self, *, rate: float, duration_s: float, grace_s: float = 60.0, progress=None
    ) -> SimulationReport:
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < duration_s and not self.stop.is_set():
            due = int(elapsed * rate) + 1
            while sent < due:
                self.send_one(self.devices[sent % len(self.devices)])
                sent += 1
            for device in self.devices:
                device.resend_unreceipted()
            if progress:
                progress(self.report)
            time.sleep(min(0.05, 1.0 / rate))
        self.settle(min(grace_s, 3.0) if self.stop.is_set() else grace_s)
        return self.report

    def settle(self, grace_s: float) -> SimulationReport:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(d.outstanding() for d in self.devices):
            for device in self.devices:
                device.resend_unreceipted()
            time.sleep(0.2)
        return self.tally()

    def tally(self) -> SimulationReport:
        report = self.report
        report.recorded = report.rejected = report.duplicates = report.missing = report.wrong_outcome = 0
        for device in self.devices:
            report.resends_after_timeout = sum(d.resends for d in self.devices)
            for sent in list(device.sent.values()):
                final = sent.final
                if final is None:
                    report.missing += 1
                    continue
                report.recorded += final["status"] == "recorded"
                report.rejected += final["status"] == "rejected"
                report.duplicates += final["status"] == "duplicate"
                report.wrong_outcome += (final["status"] == "rejected") != (sent.expect == "rejected")
        report.unmatched_rejections_seen = sum(
            1 for d in self.devices for r in d.stray_receipts if r["status"] == "rejected")
        return report


def simulate(config: Config, *, rate: float, duration_s: float, bad_share: float, seed: int | None = None,
             grace_s: float = 60.0, resend_after_s: float = 5.0, out=print) -> SimulationReport:
    fleet = provision_fleet(config)
    devices = [SimulatedDevice(config, kind, device_id, creds, resend_after_s=resend_after_s)
               for device_id, (kind, creds) in fleet.items()]
    for device in devices:
        device.start()
    try:
        simulation = Simulation(config, devices, seed=seed, bad_share=bad_share)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: simulation.stop.set())
        last = [0.0]

        def progress(report: SimulationReport) -> None:
            if time.monotonic() - last[0] >= 5:
                last[0] = time.monotonic()
                out(json.dumps({"progress": asdict(simulation.tally())}))

        report = simulation.run(rate=rate, duration_s=duration_s, grace_s=grace_s, progress=progress)
    finally:
        for device in devices:
            device.stop()
    out(json.dumps({"result": "ok" if report.ok else "missing receipts", **asdict(report)}))
    return report
