"""`mro-edge keys` and `mro-edge audit` against the real services (real processes, Mosquitto, LMDB).

A key rotation while the pipeline runs, an audit export of the stopped pipeline that verifies
with nothing but the first key, a flipped byte in the sign stage's data.mdb and in an export
(each reported with its seq), and a sign service that refuses to start on a rolled-back store
(alarm on the alarm topic, recovery in the message).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time

import pytest

from mro_edge.simulator.records import valid_record
from shared.ledger.entry import KEY_ROTATION, parse_entry
from shared.ledger.keys import LedgerKeyFiles
from shared.ledger.verify import verify_chain
from shared.runtime.mqtt import MqttLink
from shared.runtime.topics import Topics
from tests.brokers import start_broker
from tests.pipeline import ROOT, Pipeline, wait_until


@pytest.fixture
def mosquitto_pipeline(tmp_path):
    broker = start_broker("mosquitto", tmp_path / "data")
    pipe = Pipeline(broker, tmp_path / "data")
    pipe.start()
    try:
        yield pipe
    finally:
        pipe.stop()
        broker.stop()


def cli(pipe: Pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=pipe.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def send(pipe: Pipeline, device, rng: random.Random, count: int) -> list[dict]:
    records = []
    for _ in range(count):
        record = valid_record(rng, station=pipe.station, device_kind="torque_wrench", device_id="TQW-09")
        device.send(record["event_id"], json.dumps(record).encode())
        records.append(record)
    return records


def settle(pipe: Pipeline, device, total: int) -> None:
    def done():
        device.resend_unreceipted()
        return not device.outstanding()

    wait_until(done, 60, 0.3, "every record's final receipt")
    wait_until(lambda: len(pipe.ledger()) >= total, 30, 0.2, "the ledger to catch up")


def test_rotation_export_verify_and_flipped_bytes(mosquitto_pipeline, tmp_path):
    pipe = mosquitto_pipeline
    rng = random.Random(4)
    device = pipe.device("torque_wrench", "TQW-09")
    first = send(pipe, device, rng, 20)
    settle(pipe, device, 20)
    old = LedgerKeyFiles(pipe.data_dir / "keys").current(create=False)
    (tmp_path / "first.pem").write_text(old.public_pem())

    rotated = cli(pipe, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    send(pipe, device, rng, 15)
    settle(pipe, device, 36)  # 35 records and the rotation entry
    shown = json.loads(cli(pipe, "keys", "show", "--json").stdout)
    assert shown["rotations"] and shown["rotations"][0]["old_kid"] == old.kid
    new_kid = shown["rotations"][0]["new_kid"]
    pipe.stop()

    entries = pipe.ledger()
    assert len(entries) == 36
    rotation_at = next(e.seq for e in entries if parse_entry(e.entry).type == KEY_ROTATION)
    assert {e.kid for e in entries[: rotation_at + 1]} == {old.kid}
    assert {e.kid for e in entries[rotation_at + 1:]} == {new_kid}
    assert verify_chain(entries, {old.kid: old.public_bytes}) == 36
    assert shown["kid"] in (old.kid, new_kid)

    out = tmp_path / "export"
    exported = cli(pipe, "audit", "export", "--out", str(out), "--seq", "3", "30")
    assert exported.returncode == 0, exported.stderr
    assert "exported 36 entries" in exported.stdout
    verified = cli(pipe, "audit", "verify", str(out), "--trusted-key", str(tmp_path / "first.pem"))
    assert verified.returncode == 0 and verified.stdout.startswith("OK: 36 entries"), verified.stdout + verified.stderr

    # A flipped byte in an export: the first bad seq and why.
    rows = (out / "entries.jsonl").read_bytes().splitlines(keepends=True)
    rows[12] = rows[12].replace(b"TQW-09", b"TQW-08", 1)
    (out / "entries.jsonl").write_bytes(b"".join(rows))
    failed = cli(pipe, "audit", "verify", str(out))
    assert failed.returncode == 1 and failed.stdout.startswith("FAILED at seq 12: hash does not match"), failed.stdout

    # A flipped byte inside the sign stage's LMDB file, where entry 7's bytes live.
    victim = first[7]["event_id"]
    assert parse_entry(entries[7].entry).body["event_id"] == victim
    mdb = pipe.data_dir / "sign" / "data.mdb"
    data = bytearray(mdb.read_bytes())
    pattern = f'"event_id":"{victim}"'.encode()
    at = data.find(pattern)
    assert at >= 0
    while at >= 0:  # every copy LMDB may still hold (live page and freed ones)
        data[at + len(b'"event_id":"')] ^= 0x01
        at = data.find(pattern, at + 1)
    mdb.write_bytes(bytes(data))
    broken = cli(pipe, "audit", "export", "--out", str(tmp_path / "export2"))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "seq 7: hash does not match" in broken.stderr
    assert not (tmp_path / "export2").exists()


def test_sign_refuses_to_start_on_a_rolled_back_store(mosquitto_pipeline, tmp_path):
    pipe = mosquitto_pipeline
    rng = random.Random(5)
    device = pipe.device("torque_wrench", "TQW-09")
    send(pipe, device, rng, 10)
    settle(pipe, device, 10)
    pipe.procs["sign"].terminate()
    assert pipe.procs["sign"].wait(15) == 0
    backup = tmp_path / "sign-backup"
    shutil.copytree(pipe.data_dir / "sign", backup)
    pipe.start("sign")
    send(pipe, device, rng, 10)
    settle(pipe, device, 20)
    pipe.procs["sign"].terminate()
    assert pipe.procs["sign"].wait(15) == 0
    newest = tmp_path / "sign-newest"
    shutil.copytree(pipe.data_dir / "sign", newest)

    # An SD-card image / VM snapshot brings back the 10-entry store.
    shutil.rmtree(pipe.data_dir / "sign")
    shutil.copytree(backup, pipe.data_dir / "sign")
    topics = Topics(pipe.station)
    watcher = MqttLink(pipe.config, client_id="test-alarm-watch", subscriptions=[(topics.alarm, 1)], persistent=False)
    watcher.start(wait_s=10)
    try:
        pipe.start("sign", wait=False)
        assert pipe.procs["sign"].wait(60) != 0
        alarm = None
        deadline = time.monotonic() + 10
        while alarm is None and time.monotonic() < deadline:
            try:
                message = watcher.inbox.get(timeout=0.5)
            except Exception:
                continue
            body = json.loads(message.payload)
            if body.get("service") == "sign":
                alarm = body
    finally:
        watcher.stop()
    log = (pipe.logs / "sign.log").read_text()
    assert "ROLLBACK: the ledger holds 10 entries" in log
    assert alarm is not None and alarm["alarm"] == "ledger_rollback"
    assert "restoring the newest backup" in alarm["detail"] and "mv " in alarm["detail"]
    assert len(pipe.ledger()) == 10

    # Restoring the newest backup (the recovery the message names) lets it start again.
    shutil.rmtree(pipe.data_dir / "sign")
    shutil.copytree(newest, pipe.data_dir / "sign")
    pipe.start("sign")
    send(pipe, device, rng, 1)
    settle(pipe, device, 21)
