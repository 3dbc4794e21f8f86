"""Compliance end to end: real broker (embedded and Mosquitto), real services, the `mro-edge schema` and
`mro-edge registry` commands as an operator runs them."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from mro_edge.simulator.records import valid_record
from shared.compliance.esign import simulator_seed
from shared.ledger.entry import parse_entry
from shared.ledger.keys import SigningKey
from tests.pipeline import ROOT, wait_until

DRIFT = """
version = "mro.record/2"
title = "Aircraft hours on every maintenance action (AC 43-9C change 1)"
reference = "test"

[[require]]
field = "aircraft_hours"
types = ["maintenance_action"]
"""


def cli(pipeline, *args, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=pipeline.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def settle(devices, seconds=60):
    def done():
        for device in devices:
            device.resend_unreceipted()
        return all(not d.outstanding() for d in devices)

    wait_until(done, seconds, 0.3, "every record's final receipt")


def send(device, record):
    device.send(record["event_id"], json.dumps(record).encode())


def ledger_bodies(pipeline) -> list[dict]:
    return [parse_entry(e.entry).body for e in pipeline.ledger()]


def test_schema_drift_trips_the_breaker_and_a_rollback_clears_it(pipeline, tmp_path):
    rng = random.Random(21)
    tablet = pipeline.device("tablet", "TAB-12")
    wrench = pipeline.device("torque_wrench", "TQW-07")
    station = pipeline.station
    history = [valid_record(rng, station=station, device_kind="tablet", device_id="TAB-12",
                            record_type="maintenance_action") for _ in range(60)]
    for record in history:
        send(tablet, record)
    settle([tablet])
    assert any("aircraft_hours" not in r for r in history)

    definition = tmp_path / "v2.toml"
    definition.write_text(DRIFT)
    staged = cli(pipeline, "schema", "stage", str(definition), "--sample", "60", "--json")
    assert staged.returncode == 0, staged.stderr
    reply = json.loads(staged.stdout)
    assert reply["dry_run"]["report"]["sample"] == 60
    assert reply["state"]["breaker"] == "open", reply

    torques = [valid_record(rng, station=station, device_kind="torque_wrench", device_id="TQW-07")
               for _ in range(5)]
    sign_offs = [valid_record(rng, station=station, device_kind="tablet", device_id="TAB-12",
                              record_type="maintenance_action") for _ in range(5)]
    for record in torques:
        send(wrench, record)
    for record in sign_offs:
        send(tablet, record)
    settle([tablet])  # sign-offs keep flowing on the active version
    wait_until(lambda: all(wrench.sent[r["event_id"]].held for r in torques), 30, 0.2, "torque events received")
    assert all(wrench.sent[r["event_id"]].final is None for r in torques)  # held, neither recorded nor rejected

    refused = cli(pipeline, "schema", "activate")
    assert refused.returncode == 1 and "refused" in refused.stderr, (refused.stdout, refused.stderr)
    status = json.loads(cli(pipeline, "schema", "status", "--json").stdout)
    assert status["state"]["breaker"] == "open" and status["state"]["held"] == 5

    rolled = cli(pipeline, "schema", "rollback", "--reason", "tablets not updated yet")
    assert rolled.returncode == 0, rolled.stderr
    assert "5 held record(s) released" in rolled.stdout
    settle([wrench])
    assert all(wrench.sent[r["event_id"]].final["status"] == "recorded" for r in torques)
    wait_until(lambda: any(b.get("type") == "schema_change" for b in ledger_bodies(pipeline)), 30, 0.3,
               "the rollback in the ledger")
    [change] = [b for b in ledger_bodies(pipeline) if b.get("type") == "schema_change"]
    assert change["action"] == "rollback" and change["withdrawn"] == "mro.record/2"
    assert change["reason"] == "tablets not updated yet"
    status = json.loads(cli(pipeline, "schema", "status", "--json").stdout)
    assert status["state"]["breaker"] == "closed" and status["state"]["held"] == 0


def test_registry_update_needs_the_authority_signature(pipeline, tmp_path):
    authority = SigningKey.load_or_create(tmp_path / "authority", "registry-authority")
    keys = pipeline.data_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "registry-authority.pub.pem").write_text(authority.public_pem())
    cert_no = "US-0777001"
    import base64

    update = {"serial": 1, "issued_at": "2026-11-23T10:00:00Z", "reason": "new hire enrolled",
              "technicians": {"upsert": [{
                  "cert_no": cert_no, "status": "active",
                  "public_key": base64.b64encode(SigningKey(simulator_seed(cert_no)).public_bytes).decode(),
                  "certificates": [{"kind": "FAA-AP", "issued": "2019-04-01"}],
                  "authorisations": [{"chapters": ["*"], "privileges": ["maintain"]}]}]}}
    (tmp_path / "update.json").write_text(json.dumps(update))

    forged = SigningKey.load_or_create(tmp_path / "forger", "key")
    signed = cli(pipeline, "registry", "sign", "--key", str(tmp_path / "forger" / "key.key"),
                 str(tmp_path / "update.json"))
    (tmp_path / "forged.json").write_text(signed.stdout)
    refused = cli(pipeline, "registry", "push", str(tmp_path / "forged.json"))
    assert refused.returncode == 1 and "not the configured authority key" in refused.stderr, refused
    assert forged.kid in refused.stderr

    signed = cli(pipeline, "registry", "sign", "--key", str(tmp_path / "authority" / "registry-authority.key"),
                 str(tmp_path / "update.json"))
    assert signed.returncode == 0, signed.stderr
    (tmp_path / "signed.json").write_text(signed.stdout)
    applied = cli(pipeline, "registry", "push", str(tmp_path / "signed.json"))
    assert applied.returncode == 0 and "applied" in applied.stdout, applied

    wrench = pipeline.device("torque_wrench", "TQW-07")
    record = valid_record(random.Random(3), station=pipeline.station, device_kind="torque_wrench",
                          device_id="TQW-07")
    record["technician"] = {"cert_no": cert_no, "cert_kind": "FAA-AP"}
    send(wrench, record)
    settle([wrench])
    assert wrench.sent[record["event_id"]].final["status"] == "recorded"
    again = cli(pipeline, "registry", "push", str(tmp_path / "signed.json"))
    assert again.returncode == 1 and "replayed" in again.stderr
