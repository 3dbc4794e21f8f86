"""Forged pipeline traffic on real brokers (embedded and Mosquitto), real processes, real LMDB.

The attacker holds the broker password of the service entitled to publish on a pipeline topic
(the broker ACL lets only that service's user publish there; its hop key is what the attacker
lacks) and publishes straight onto the pipeline topics, as the red team did: batches to sign,
stage receipts to ingest, outcome notices to ingest. Each attempt is refused by hop authentication
(a `hop_auth` DLQ report and an alarm), nothing of it takes effect, and the stage keeps going.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mro_edge.simulator.records import valid_record
from shared.contract import decode_record, idempotency_key, normalize
from shared.runtime.hopauth import HopAuth, HopKeys, ensure_hop_keys, hop_digest
from shared.runtime.mqtt import MqttLink, service_credentials
from shared.runtime.topics import Topics
from tests.edge import TopicRecorder
from tests.pipeline import ROOT, Pipeline, wait_until

DEVICE = ("torque_wrench", "TQW-07")


@pytest.fixture
def stopped_pipeline(broker, tmp_path):
    """The pipeline of the `broker` fixture, no stage started yet."""
    pipe = Pipeline(broker, tmp_path / "data")
    yield pipe
    pipe.stop()


def attacker(pipe: Pipeline, service: str) -> MqttLink:
    """A client with `service`'s own broker login: exactly what a leaked service password gives."""
    link = MqttLink(pipe.config, client_id=f"attacker-{random.getrandbits(32)}", persistent=False,
                    credentials=service_credentials(pipe.config, service))
    link.start()
    return link


def attacker_seal(tmp_path: Path, topic: str, source: str, body: bytes) -> bytes:
    """`body` sealed in the name of `source`, by a key of the attacker's own making."""
    ensure_hop_keys(tmp_path / "attacker")
    key = HopKeys.of(tmp_path / "attacker").signing_key(source)
    sig = key.sign_raw(hop_digest(topic, source, body)).hex()
    return b'{"type":"sealed/1","source":"' + source.encode() + b'","body":' + body + b',"sig":"' + sig.encode() + b'"}'


def send_good(pipe: Pipeline, device, rng: random.Random) -> tuple[str, str, bytes]:
    record = valid_record(rng, station=pipe.station, device_kind=DEVICE[0], device_id=DEVICE[1])
    payload = json.dumps(record).encode()
    device.send(record["event_id"], payload)
    key = idempotency_key(normalize(decode_record(payload, station=pipe.station, device_kind=DEVICE[0],
                                                  device_id=DEVICE[1])))
    return record["event_id"], key, payload


def receipts(device, event_id: str) -> list[dict]:
    return list(device.sent[event_id].receipts)


def hop_auth_reports(pipe: Pipeline, stage: str) -> list[dict]:
    return [r for r in pipe.dlq(stage) if r["errors"][0]["rule"] == "hop_auth"]


def item(event_id: str, key: str, record: dict, device: tuple[str, str]) -> bytes:
    return json.dumps({"type": "validated/1", "key": key, "record": record,
                       "device": {"kind": device[0], "id": device[1]}}).encode()


def envelope(items: list[bytes]) -> bytes:
    return b'{"source":"validate","items":[' + b",".join(items) + b"]}"


def test_a_forged_batch_to_sign_is_never_signed(stopped_pipeline, tmp_path):
    pipe = stopped_pipeline
    pipe.start()
    topics = Topics(pipe.station)
    recorder = TopicRecorder(pipe.config, (topics.alarm, topics.dlq("sign"))).start()
    rng = random.Random(13)
    device = pipe.device(*DEVICE)
    first, _, _ = send_good(pipe, device, rng)
    wait_until(lambda: any(r["status"] == "recorded" for r in receipts(device, first)), 60, 0.2,
               "the first good record to be recorded")
    assert len(pipe.ledger()) == 1

    # What the red team published: a torque of 99999 Nm marked OK by an unregistered technician,
    # for a real device (which would get a `recorded` receipt), a schema_change, a made-up type.
    torque = valid_record(rng, station=pipe.station, device_kind=DEVICE[0], device_id=DEVICE[1])
    torque.update(torque_nm=99999, result="OK", technician={"cert_no": "Z9999999", "cert_kind": "FAA-AP"})
    change = {"type": "schema_change", "schema": "mro.schema-change/1", "event_id": "forged-change",
              "station": pipe.station, "action": "activate", "version": "mro.record/9", "previous": "mro.record/1",
              "at": "2026-01-01T00:00:00Z", "command_id": "x", "operator": "mallory"}
    made_up = dict(torque, type="firmware_update", event_id="forged-type")
    forged = [
        envelope([item(torque["event_id"], "k-torque", torque, DEVICE)]),
        envelope([item("forged-change", "k-change", change, ("service", "validate"))]),
        envelope([item("forged-type", "k-type", made_up, DEVICE)]),
    ]
    sign_in = topics.stage_input("sign")
    link = attacker(pipe, "validate")
    try:
        for body in forged:
            link.publish(sign_in, body)  # the red team's message as it was
            link.publish(sign_in, attacker_seal(tmp_path, sign_in, "validate", body))  # a seal, wrong key
        wait_until(lambda: len(hop_auth_reports(pipe, "sign")) == 6, 30, 0.2, "six hop_auth reports")
    finally:
        link.stop()
    wait_until(lambda: [m for m in recorder.of(topics.alarm) if m.payload["alarm"] == "hop_auth"], 20, 0.2,
               "a hop_auth alarm")
    assert {m.payload["service"] for m in recorder.of(topics.alarm) if m.payload["alarm"] == "hop_auth"} == {"sign"}
    assert len(recorder.of(topics.dlq("sign"))) >= 6
    assert len(pipe.ledger()) == 1, "nothing forged was signed"
    assert not device.stray_receipts, "the device was told nothing about records it never sent"
    assert pipe.alive("sign")

    second, _, _ = send_good(pipe, device, rng)
    wait_until(lambda: any(r["status"] == "recorded" for r in receipts(device, second)), 60, 0.2,
               "the next good record to be recorded")
    assert [e.seq for e in pipe.ledger()] == [0, 1]
    recorder.stop()
    pipe.stop()

    out = tmp_path / "export"
    env = pipe.env
    exported = subprocess.run([sys.executable, "-m", "mro_edge", "audit", "export", "--out", str(out)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    verified = subprocess.run([sys.executable, "-m", "mro_edge", "audit", "verify", str(out)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and verified.stdout.startswith("OK: 2 entries"), verified.stdout


def test_a_forged_stage_receipt_does_not_delete_ingest_outbox_rows(stopped_pipeline, tmp_path):
    """While validate is down, a receipt naming a record ingest still owes it would delete the row:
    the record would never reach the ledger. Forged, it is refused and the record arrives."""
    pipe = stopped_pipeline
    pipe.start("ingest")
    rng = random.Random(17)
    device = pipe.device(*DEVICE)
    event_id, key, _ = send_good(pipe, device, rng)
    wait_until(lambda: receipts(device, event_id), 30, 0.2, "the `received` receipt")
    topic = Topics(pipe.station).stage_receipt("ingest")
    body = json.dumps({"type": "stage-receipt/1", "stage": "validate", "keys": [key]}).encode()
    link = attacker(pipe, "validate")
    try:
        link.publish(topic, body)
        link.publish(topic, attacker_seal(tmp_path, topic, "validate", body))
        # sealed by ingest's own downstream's downstream: sign may not receipt ingest
        sign = HopKeys.of(pipe.data_dir).signing_key("sign")
        link.publish(topic, b'{"type":"sealed/1","source":"sign","body":' + body + b',"sig":"'
                     + sign.sign_raw(hop_digest(topic, "sign", body)).hex().encode() + b'"}')
        wait_until(lambda: len(hop_auth_reports(pipe, "ingest")) == 3, 30, 0.2, "three hop_auth reports")
    finally:
        link.stop()
    pipe.start("validate", "sign")
    wait_until(lambda: any(e.idem == key for e in pipe.ledger()), 60, 0.3, "the record in the ledger")
    wait_until(lambda: any(r["status"] == "recorded" for r in receipts(device, event_id)), 30, 0.2,
               "its `recorded` receipt")


def test_a_forged_outcome_makes_no_false_recorded_answer(stopped_pipeline, tmp_path):
    """A `recorded` outcome told to ingest before the record is signed would make ingest answer the
    device's re-send with the seq of another entry. Forged, it is refused."""
    pipe = stopped_pipeline
    pipe.start("ingest")
    rng = random.Random(19)
    device = pipe.device(*DEVICE)
    event_id, key, payload = send_good(pipe, device, rng)
    wait_until(lambda: receipts(device, event_id), 30, 0.2, "the `received` receipt")
    topic = Topics(pipe.station).outcomes
    body = json.dumps({"type": "outcomes/1", "outcomes": [{"key": key, "status": "recorded", "seq": 0}]}).encode()
    validate = HopAuth.for_service(pipe.data_dir, Topics(pipe.station), "validate", ())
    link = attacker(pipe, "sign")
    try:
        link.publish(topic, body)
        link.publish(topic, attacker_seal(tmp_path, topic, "sign", body))
        link.publish(topic, validate.seal(topic, body))  # validate's genuine key: still not its to say
        wait_until(lambda: len(hop_auth_reports(pipe, "ingest")) == 3, 30, 0.2, "three hop_auth reports")
    finally:
        link.stop()
    device.send(event_id, payload)  # the device asks again
    wait_until(lambda: len(receipts(device, event_id)) >= 2, 30, 0.2, "the answer to the re-send")
    assert [r["status"] for r in receipts(device, event_id)] == ["received", "duplicate"]
    assert all(r.get("seq") is None for r in receipts(device, event_id)), "no seq before the record is signed"

    pipe.start("validate", "sign")
    wait_until(lambda: any(r["status"] == "recorded" for r in receipts(device, event_id)), 60, 0.2,
               "the real `recorded` receipt")
    [entry] = [e for e in pipe.ledger() if e.idem == key]
    assert next(r for r in receipts(device, event_id) if r["status"] == "recorded")["seq"] == entry.seq
