"""Hangar devices and work sessions end to end, on both brokers: a stock `mosquitto_pub` is the
RFID reader or part-mark scanner (QoS 1, never re-sends), `mro-edge session` / `mro-edge reads`
are the operator, and the ledger is read back from the sign stage's store.

Places come from the shipped config/edge.toml (BAY1: reader ZEBRA-01, scanner SCAN-01).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

from mro_edge.cli import read_statuses
from services.devices.epc import encode_adi_var
from services.devices.profiles.zebra_iot_connector import simulator as zebra_reader
from shared.ledger.entry import parse_entry
from shared.runtime.mqtt import mqtt_connack
from tests.pipeline import ROOT, wait_until
from tests.stockclients import StockDevice, mosquitto_pub_binary, register_devices

VECTORS = ROOT / "tests" / "vectors" / "devices"
OPEN = ("session", "open", "--place", "BAY1", "--work-order", "WO-7781", "--registration", "N327HA",
        "--aircraft-serial", "4521", "--ata", "32-41", "--cert-no", "3512874", "--cert-kind", "FAA-AP",
        "--action", "receive")
LOST_SCAN = "[)>DDMFR 0CVA5SER 674A36458"  # a keyboard wedge dropped every control character


def cli(pipeline, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=pipeline.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def asked(pipeline, *args: str) -> dict:
    done = cli(pipeline, *args, "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def zebra_event(serial: str) -> bytes:
    """The vendor-shaped Zebra IoT Connector vector (SIMPLE mode, ADI-var tag) as a one-event
    array, read now (the ledger refuses reads older than [limits] max_backdate_days)."""
    vector = json.loads((VECTORS / "zebra_iotc.json").read_text())["vectors"][0]["payload"]
    event = copy.deepcopy(vector)
    event["data"]["idHex"] = encode_adi_var(0, "35962", "PQ7VZ4", serial)
    event["timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"
    return json.dumps([event]).encode()


def publish(pipeline, device: StockDevice, payload: bytes) -> None:
    """One QoS 1 publish by stock mosquitto_pub; it exits 0 only once the broker PUBACKed it."""
    done = subprocess.run([mosquitto_pub_binary(), "-h", "127.0.0.1", "-p", str(pipeline.broker.port),
                           "-u", device.login[0], "-P", device.login[1], "-q", "1", "-t", device.topic,
                           "-m", payload.decode()], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr


def entries(pipeline) -> list[tuple[str, dict]]:
    parsed = (parse_entry(entry.entry) for entry in pipeline.ledger())
    return [(p.type, p.body) for p in parsed]


def part_records(pipeline, serial: str) -> list[dict]:
    return [b for t, b in entries(pipeline) if t == "part_receipt" and b["part"]["serial_number"] == serial]


@pytest.fixture
def hangar(pipeline):
    return {d.device_id: d for d in register_devices(pipeline.broker, (("rfid_zebra", "ZEBRA-01"),
                                                                       ("partmark_scanner", "SCAN-01")))}


def test_reads_become_records_within_a_session_and_wait_unassigned_without_one(pipeline, hangar):
    reader, scanner = hangar["ZEBRA-01"], hangar["SCAN-01"]
    # no session: the read is kept, listed, and not in the ledger
    publish(pipeline, reader, zebra_event("EARLY1"))
    listed = wait_until(lambda: asked(pipeline, "reads", "list")["reads"], 60, 0.5, "the unassigned read")
    [early] = listed
    assert (early["device_id"], early["place"], early["reason"], early["serial"]) == ("ZEBRA-01", "BAY1",
                                                                                     "no_session", "EARLY1")
    # a scan that lost its framing is kept flagged, never given guessed fields
    publish(pipeline, scanner, LOST_SCAN.encode())
    wait_until(lambda: len(asked(pipeline, "reads", "list")["reads"]) == 2, 60, 0.5, "the lost scan kept")
    [lost] = [r for r in asked(pipeline, "reads", "list")["reads"] if r["device_id"] == "SCAN-01"]
    assert lost["reason"] == "framing_lost" and lost["assignable"] is False and lost["serial"] is None
    wait_until(lambda: read_statuses(pipeline.config, 0.5).get("ingest", {}).get("unassigned_reads") == 2, 30, 0.5,
               "ingest's status to count the unassigned reads for MCC")

    opened = cli(pipeline, *OPEN)
    assert opened.returncode == 0, opened.stderr
    assigned = asked(pipeline, "reads", "assign", early["read_id"])
    assert assigned["ok"], assigned
    refused = cli(pipeline, "reads", "assign", lost["read_id"])
    assert refused.returncode == 1 and "without guessing" in refused.stderr

    # within the session a read becomes a record at once
    publish(pipeline, reader, zebra_event("LIVE22"))
    for serial in ("EARLY1", "LIVE22"):
        [record] = wait_until(lambda s=serial: part_records(pipeline, s), 90, 0.5, f"part {serial} in the ledger")
        assert (record["work_order_id"], record["ata"], record["device"]) == (
            "WO-7781", "32-41", {"kind": "rfid_reader", "id": "ZEBRA-01"})
        assert record["technician"]["cert_no"] == "3512874" and record["part"]["cage"] == "35962"
    assert [r["device_id"] for r in asked(pipeline, "reads", "list")["reads"]] == ["SCAN-01"]

    closed = cli(pipeline, "session", "close", "--place", "BAY1")
    assert closed.returncode == 0, closed.stderr
    kinds = wait_until(lambda: [b for t, b in entries(pipeline) if t == "work_session_closed"], 60, 0.5,
                       "the session closed in the ledger")
    [opened_entry] = [b for t, b in entries(pipeline) if t == "work_session_opened"]
    assert opened_entry["work_order_id"] == "WO-7781" and opened_entry["place"] == "BAY1"
    assert opened_entry["technician"]["cert_no"] == "3512874" and opened_entry["operator"]
    assert kinds[0]["session_id"] == opened_entry["session_id"] and kinds[0]["records"] == 2
    assert "0 open session(s)" in cli(pipeline, "session", "list").stdout


def test_a_tablet_opens_the_session_and_a_puback_survives_kill_9_of_ingest(pipeline, hangar):
    """A technician's tablet opens the session on its own `in` topic; then the reader gets its
    PUBACK while ingest is dead, and the read still becomes its record."""
    [tab] = register_devices(pipeline.broker, (("tablet", "TAB-01"),))
    publish(pipeline, tab, json.dumps({
        "schema": "mro.work_session/1", "id": str(uuid.uuid4()), "command": "open", "place": "BAY1",
        "work_order_id": "WO-7781", "aircraft": {"registration": "N327HA", "serial_number": "4521"},
        "ata": "32-41", "technician": {"cert_no": "3512874", "cert_kind": "FAA-AP"},
        "part_action": "receive"}).encode())
    [opened] = wait_until(lambda: [b for t, b in entries(pipeline) if t == "work_session_opened"], 60, 0.5,
                          "the tablet's session in the ledger")
    assert opened["operator"] == "tablet/TAB-01"
    pipeline.kill("ingest")
    publish(pipeline, hangar["ZEBRA-01"], zebra_event("KILL99"))
    pipeline.restart("ingest")
    [record] = wait_until(lambda: part_records(pipeline, "KILL99"), 90, 0.5, "the read in the ledger")
    assert record["work_order_id"] == "WO-7781"


def test_a_records_notes_name_the_sha256_of_what_the_reader_sent_and_reads_raw_returns_those_bytes(
        pipeline, tmp_path):
    """Registered by profile; one Zebra array publish of two tags (built by the profile's
    simulator) within a session: both ledger entries name the payload's SHA-256, and `mro-edge
    reads raw` gets back bytes that `sha256sum` agrees with."""
    added = cli(pipeline, "devices", "add", "ZEBRA-01", "--profile", "zebra_iot_connector", "--json")
    assert added.returncode == 0, added.stderr
    login = json.loads(added.stdout)
    assert login["publishes_to"].endswith("/in/rfid_zebra/ZEBRA-01")
    pipeline.broker.reload()
    wait_until(lambda: mqtt_connack(pipeline.broker.port, login["username"], login["password"]) == 0, 10, 0.05,
               "the broker to accept the reader's login")
    reader = StockDevice("rfid_zebra", "ZEBRA-01", (login["username"], login["password"]), login["publishes_to"])
    assert cli(pipeline, *OPEN).returncode == 0
    now = datetime.now(UTC)
    payload = zebra_reader.payload([zebra_reader.part_event("35962", "PQ7VZ4", serial, now, reads=3)
                                    for serial in ("RAWA01", "RAWB02")])
    publish(pipeline, reader, payload)
    digest = hashlib.sha256(payload).hexdigest()
    for serial in ("RAWA01", "RAWB02"):
        [record] = wait_until(lambda s=serial: part_records(pipeline, s), 90, 0.5, f"part {serial} in the ledger")
        assert record["notes"] == f"raw sha256 {digest} (zebra_iot_connector event)"
    out = tmp_path / "raw.bin"
    fetched = cli(pipeline, "reads", "raw", digest, "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert out.read_bytes() == payload
    summed = subprocess.run([shutil.which("sha256sum") or "sha256sum", str(out)], capture_output=True, text=True,
                            timeout=30)
    assert summed.stdout.split()[0] == digest
    missing = cli(pipeline, "reads", "raw", "0" * 64, "--out", str(tmp_path / "none.bin"))
    assert missing.returncode == 1 and "no raw payload" in missing.stderr and not (tmp_path / "none.bin").exists()
