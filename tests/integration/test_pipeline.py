"""End to end on real brokers, real LMDB and real processes: mixed traffic, poison, crashes."""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime

import pytest

from mro_edge.simulator.records import RECORD_TYPES, bad_cases, valid_record
from mro_edge.simulator.run import reported_event_id
from shared.contract import decode_record, idempotency_key, normalize
from shared.ledger.keys import SigningKey
from shared.ledger.verify import verify_chain
from tests.pipeline import wait_until

FLEET = (("rfid_reader", "RFID-01"), ("torque_wrench", "TQW-07"), ("tablet", "TAB-12"), ("barcode_scanner", "BCS-03"))


def key_of(payload: bytes, station: str, kind: str, device_id: str) -> str:
    return idempotency_key(normalize(decode_record(payload, station=station, device_kind=kind, device_id=device_id)))


def assert_ledger_verifies(pipeline, expected_keys: set[str]) -> None:
    entries = pipeline.ledger()
    keys = Counter(e.idem for e in entries)
    duplicated = [k for k, n in keys.items() if n > 1]
    assert not duplicated, f"{len(duplicated)} records appear more than once in the ledger"
    missing = expected_keys - set(keys)
    assert not missing, f"{len(missing)} receipted records are missing from the ledger"
    assert set(keys) == expected_keys, "the ledger holds records nobody sent"
    key = SigningKey.load_or_create(pipeline.data_dir / "keys")
    assert verify_chain(entries, {key.kid: key.public_bytes}) == len(entries)


def test_mixed_traffic_every_record_once_every_bad_one_reported(pipeline):
    """~1,000 records: valid ones of every type, one bad one per rule, exact re-sends and the
    same content under a new event_id."""
    rng = random.Random(7)
    station = pipeline.station
    devices = {device_id: pipeline.device(kind, device_id) for kind, device_id in FLEET}
    expected_keys: set[str] = set()
    expected_bad: list = []
    valid_sent: list[tuple] = []
    sent_records = 0
    while sent_records < 800:
        for kind, device_id in FLEET:
            types = RECORD_TYPES if kind == "tablet" else (None,)
            record = valid_record(rng, station=station, device_kind=kind, device_id=device_id,
                                  record_type=rng.choice(types))
            payload = json.dumps(record).encode()
            devices[device_id].send(record["event_id"], payload)
            expected_keys.add(key_of(payload, station, kind, device_id))
            valid_sent.append((device_id, record))
            sent_records += 1
    for kind, device_id in FLEET:
        for case in bad_cases(rng, station=station, device_kind=kind, device_id=device_id,
                              received_at=datetime.now(UTC)):
            event_id = reported_event_id(case.payload, station, kind, device_id)
            devices[device_id].send(event_id, case.payload, expect="rejected")
            expected_bad.append((case, event_id))
    for device_id, record in rng.sample(valid_sent, 60):
        devices[device_id].send(record["event_id"], json.dumps(record).encode())
    for device_id, record in rng.sample(valid_sent, 60):
        copy = dict(record, event_id=str(uuid.uuid4()))
        devices[device_id].send(copy["event_id"], json.dumps(copy).encode(), expect="duplicate")
    total = sent_records + len(expected_bad) + 120
    assert total >= 1000

    def settled():
        for device in devices.values():
            device.resend_unreceipted()
        return all(not d.outstanding() for d in devices.values())

    wait_until(settled, 120, 0.5, "every record's final receipt")
    wait_until(lambda: len(pipeline.ledger()) >= len(expected_keys), 60, 0.5, "the ledger to catch up")
    assert_ledger_verifies(pipeline, expected_keys)

    assert_every_bad_case_reported(pipeline, expected_bad)
    assert_receipts_as_expected(devices.values())


def assert_every_bad_case_reported(pipeline, expected_bad: list) -> None:
    """Each bad case has a DLQ report from its stage naming the path and rule it breaks."""
    wait_until(lambda: len(pipeline.dlq("ingest") + pipeline.dlq("validate")) >= len(expected_bad), 30, 0.2,
               "a DLQ report for every bad record")
    dlq = pipeline.dlq("ingest") + pipeline.dlq("validate")
    by_event: dict = {}
    for report in dlq:
        by_event.setdefault(report.get("event_id"), []).append(report)
    for case, event_id in expected_bad:
        reports = by_event.get(event_id, [])
        if event_id is None:
            reports = [r for r in reports if any(e["rule"] == case.expected_rule for e in r["errors"])]
        assert reports, f"no DLQ report for bad case {case.name} ({event_id}); DLQ has {sorted(by_event, key=str)[:50]}"
        errors = [e for r in reports for e in r["errors"]]
        assert any(e["path"] == case.expected_path and e["rule"] == case.expected_rule for e in errors), (
            f"{case.name}: expected {case.expected_path} {case.expected_rule}, got {errors}")
        assert all(r["stage"] == case.stage for r in reports), case.name
        for error in errors:
            assert set(error) >= {"path", "rule", "expected", "received"}


def assert_receipts_as_expected(devices) -> None:
    """Every record sent got the receipts its kind (valid, bad, re-sent copy) calls for."""
    for device in devices:
        for event_id, sent in device.sent.items():
            statuses = [r["status"] for r in sent.receipts]
            if sent.expect == "rejected":
                assert "rejected" in statuses, event_id
            elif sent.expect == "recorded":
                assert "received" in statuses or "duplicate" in statuses, event_id
                assert "recorded" in statuses or any(r.get("seq") is not None for r in sent.receipts), event_id
            else:
                # the copy may come over another connection and overtake its original.
                assert "duplicate" in statuses or "recorded" in statuses, event_id


def expected_ledger_keys(pipeline, devices) -> set[str]:
    keys = set()
    for device in devices:
        for sent in device.sent.values():
            if sent.expect != "rejected":
                keys.add(key_of(sent.payload, pipeline.station, device.kind, device.device_id))
    return keys


def test_poison_is_isolated_and_good_records_keep_flowing(pipeline):
    """Malformed messages interleaved with good ones: each gets a DLQ report, the worker keeps
    its pid, and the good records take about as long as they do with no poison at all."""
    rng = random.Random(11)
    device = pipeline.device("torque_wrench", "TQW-01")
    station = pipeline.station
    poison = [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[" * 5000 + b"]" * 5000,
        b'{"schema": "mro.record/1", "pad": "' + b"x" * 70000 + b'"}',
        b"null",
        json.dumps({"schema": "mro.record/1", "type": "torque_event", "surprise": 1}).encode(),
    ]
    pids = {name: pipeline.procs[name].pid for name in ("ingest", "validate", "sign")}

    def send_good(count: int) -> float:
        import time

        start = time.monotonic()
        batch = []
        for _ in range(count):
            record = valid_record(rng, station=station, device_kind="torque_wrench", device_id="TQW-01")
            device.send(record["event_id"], json.dumps(record).encode())
            batch.append(record["event_id"])
            if poisoned:
                for payload in poison:
                    device.send(None, payload)
        def recorded() -> bool:
            device.resend_unreceipted()
            return all(device.sent[e].final for e in batch)

        wait_until(recorded, 60, 0.05, "good records to be recorded")
        return time.monotonic() - start

    poisoned = False
    clean_s = send_good(200)
    poisoned = True
    poisoned_s = send_good(200)
    assert all(pipeline.procs[name].pid == pid and pipeline.alive(name) for name, pid in pids.items())
    wait_until(lambda: len(pipeline.dlq("ingest")) >= 200 * len(poison), 30, 0.2, "every poison message in the DLQ")
    rules = Counter(r["errors"][0]["rule"] for r in pipeline.dlq("ingest"))
    assert set(rules) >= {"utf8", "json", "max_depth", "max_size", "type", "unknown_field"}, rules
    # 1,200 poison messages ride along; the good records may slow down, but not stall.
    assert poisoned_s < 4 * clean_s + 5, (clean_s, poisoned_s)


def test_garbage_on_a_pipeline_topic_goes_to_the_dlq(pipeline):
    """Unsealed garbage fails hop authentication; garbage sealed by the entitled stage (a bug in
    it) is an unreadable envelope. Both are reported and the stage keeps going."""
    from shared.runtime.hopauth import HopAuth
    from shared.runtime.mqtt import MqttLink, service_credentials
    from shared.runtime.topics import Topics

    topic = Topics(pipeline.station).stage_input("validate")
    ingest = HopAuth.for_service(pipeline.data_dir, Topics(pipeline.station), "ingest", ())
    # only ingest's user may publish on validate's input: a broken ingest is what sends garbage
    link = MqttLink(pipeline.config, client_id="test-garbage", persistent=False,
                    credentials=service_credentials(pipeline.config, "ingest"))
    link.start()
    link.publish(topic, b"\x00garbage")
    wait_until(lambda: pipeline.dlq("validate"), 20, 0.2, "a hop_auth report in the validate DLQ")
    link.publish(topic, ingest.seal(topic, b'["garbage"]'))
    wait_until(lambda: len(pipeline.dlq("validate")) == 2, 20, 0.2, "an envelope report in the validate DLQ")
    link.stop()
    assert [r["errors"][0]["rule"] for r in pipeline.dlq("validate")] == ["hop_auth", "envelope"]
    assert pipeline.alive("validate")


def crash_run(pipeline, broker, *, seconds: float, kills: int, rate: float, seed: int) -> None:
    import threading
    import time

    from mro_edge.simulator.run import Simulation

    rng = random.Random(seed)
    devices = [pipeline.device(kind, device_id) for kind, device_id in FLEET]
    simulation = Simulation(pipeline.config, devices, seed=seed, bad_share=0.05, duplicate_share=0.03)
    runner = threading.Thread(target=simulation.run, kwargs=dict(rate=rate, duration_s=seconds, grace_s=0))
    runner.start()
    victims = ("ingest", "validate", "sign", "broker")
    for _ in range(kills):
        time.sleep(rng.uniform(0.5, seconds / kills))
        victim = rng.choice(victims)
        if victim == "broker":
            broker.kill()
            time.sleep(rng.uniform(0.2, 1.5))
            broker.restart()
        else:
            pipeline.kill(victim)
            time.sleep(rng.uniform(0.2, 1.5))
            pipeline.restart(victim)
    runner.join()
    report = simulation.settle(180)
    assert report.missing == 0, report
    assert report.wrong_outcome == 0, report
    wait_until(lambda: len(pipeline.ledger()) >= len(expected_ledger_keys(pipeline, devices)), 60, 0.5,
               "the ledger to hold every valid record")
    assert_ledger_verifies(pipeline, expected_ledger_keys(pipeline, devices))


def test_kill_9_of_any_process_loses_and_duplicates_nothing(pipeline, broker):
    crash_run(pipeline, broker, seconds=30, kills=6, rate=40, seed=3)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill_9_soak(pipeline, broker):
    crash_run(pipeline, broker, seconds=300, kills=40, rate=100, seed=5)


def test_forged_stage_traffic_never_reaches_the_ledger(pipeline):
    """The red team's forgery: a well-formed `{"source": "validate", "items": [...]}` published on
    `pipeline/sign` with every other user's credentials (each service but validate, the
    operator, a device) never reaches sign (the broker ACL); from validate's user it reaches sign
    but, without validate's hop seal, is refused (`hop_auth`); sealed by validate's own hop key it
    is signed, so the forgery was one sign would have taken."""
    import time

    from services.broker.credentials import SERVICE_NAMES
    from shared.runtime.hopauth import HopAuth
    from shared.runtime.messages import encode_envelope, item_encoder
    from shared.runtime.topics import Topics
    from tests.mqttclient import Client
    from tests.support.sign import record_item

    topic = Topics(pipeline.station).stage_input("sign")
    forged = encode_envelope("validate", [item_encoder.encode(record_item(7, pipeline.station))])
    device = pipeline.broker.credentials.add_device("TQW-66", "torque_wrench")
    pipeline.broker.reload()
    logins = {name: pipeline.broker.login(name) for name in SERVICE_NAMES if name != "validate"}
    logins["device"] = device
    for name, login in logins.items():
        client = Client(pipeline.broker, login)
        assert client.connect(timeout=10) == 0, name
        client.publish(topic, forged)
        client.close()
    time.sleep(3.0)
    assert pipeline.ledger() == [], [e.seq for e in pipeline.ledger()]
    assert pipeline.dlq("sign") == []
    genuine = Client(pipeline.broker, pipeline.broker.login("validate"))
    assert genuine.connect(timeout=10) == 0
    genuine.publish(topic, forged)
    wait_until(lambda: pipeline.dlq("sign"), 20, 0.2, "the unsealed message refused by hop authentication")
    assert [r["errors"][0]["rule"] for r in pipeline.dlq("sign")] == ["hop_auth"]
    assert pipeline.ledger() == []
    seal = HopAuth.for_service(pipeline.data_dir, Topics(pipeline.station), "validate", ())
    genuine.publish(topic, seal.seal(topic, forged))
    genuine.close()
    wait_until(lambda: len(pipeline.ledger()) == 1, 20, 0.2, "validate's message signed")
