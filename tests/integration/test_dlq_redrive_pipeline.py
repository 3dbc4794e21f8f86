"""DLQ redrive end to end: real broker (embedded and Mosquitto), real ingest, validate and sign, a
registry file fixed at run time and `mro-edge dlq redrive` as an operator runs it."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from mro_edge.simulator.records import sign_record, valid_record
from shared.compliance.settings import DEFAULT_REGISTRIES
from shared.ledger.entry import parse_entry
from shared.runtime.clock import utc_now
from tests.pipeline import ROOT, Pipeline, wait_until

NEW_TOOL = "NORBAR-EVO-2000-77001"  # not registered until the registry file is fixed
NEVER = "NORBAR-EVO-2000-99999"  # never registered
OVERDUE = "CDI-2503MRMH-00417"  # registered; its calibration is made overdue, then renewed
TOOL_ENTRY = (f'\n[[tool]]\nserial_number = "{NEW_TOOL}"\ndescription = "new wrench"\n'
              'calibrated_on = 2026-01-02\ncalibration_due = 2099-12-31\n')


@pytest.fixture
def edge(broker, tmp_path):
    registries = tmp_path / "registries"
    shutil.copytree(DEFAULT_REGISTRIES, registries)
    tools = registries / "tools.toml"
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    renewed = tools.read_text()
    marker = f'serial_number = "{OVERDUE}"\ndescription = "CDI 2503MRMH click wrench 50-250 lbf.in"\n' \
             'calibrated_on = 2026-03-02\ncalibration_due = 2099-12-31'
    assert marker in renewed
    tools.write_text(renewed.replace(marker, marker.replace("2099-12-31", yesterday)))
    pipe = Pipeline(broker, tmp_path / "data", mro_compliance_registries_dir=str(registries),
                    mro_compliance_registry_check_s="0.2")
    pipe.start()
    pipe.fix_registry = lambda: tools.write_text(renewed + TOOL_ENTRY)
    yield pipe
    pipe.stop()


def cli(pipe, *args, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=pipe.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def redrive(pipe, *args) -> dict:
    done = cli(pipe, "dlq", "redrive", *args, "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout)


def torque(seed: int, device_id: str, tool: str, station: str) -> dict:
    data = valid_record(random.Random(seed), station=station, device_kind="torque_wrench", device_id=device_id,
                        record_type="torque_event")
    data["tool"]["serial_number"] = tool
    if "signature" in data["technician"]:
        sign_record(data)
    return data


def send_rejected(device, records) -> None:
    for data in records:
        device.send(data["event_id"], json.dumps(data).encode(), expect="rejected")

    def done():
        device.resend_unreceipted()
        return all((device.sent[r["event_id"]].final or {}).get("status") == "rejected" for r in records)

    wait_until(done, 60, 0.3, "the rejections")


def recorded(device, event_id: str) -> dict | None:
    return next((r for r in device.sent[event_id].receipts if r["status"] == "recorded"), None)


def test_fixed_records_are_redriven_into_the_ledger_exactly_once(edge, tmp_path):
    station = edge.station
    tqw07, tqw08 = edge.device("torque_wrench", "TQW-07"), edge.device("torque_wrench", "TQW-08")
    unknown = torque(1, "TQW-07", NEW_TOOL, station)
    overdue = torque(2, "TQW-07", OVERDUE, station)
    never = torque(3, "TQW-08", NEVER, station)
    send_rejected(tqw07, [unknown, overdue])
    send_rejected(tqw08, [never])
    time.sleep(0.05)
    since = utc_now()
    later = torque(4, "TQW-08", NEW_TOOL, station)
    send_rejected(tqw08, [later])

    listed = cli(edge, "dlq", "list", "--json")
    rows = {row["event_id"]: row for row in json.loads(listed.stdout) if row["stage"] == "validate"}
    assert len(rows) == 4 and all(row["redrivable"] for row in rows.values()), listed.stdout
    assert [e["rule"] for e in rows[overdue["event_id"]]["errors"]] == ["tool_calibration_expired"]
    assert ledger_keys(edge) == Counter()

    refused = cli(edge, "dlq", "redrive")
    assert refused.returncode == 2 and "--rule" in refused.stderr

    edge.fix_registry()
    time.sleep(0.5)  # [compliance] registry_check_s
    by_id = redrive(edge, "--id", str(rows[overdue["event_id"]]["dlq_id"]), "--by", "alice")
    assert (by_id["selected"], by_id["accepted"]) == (1, 1), by_id
    assert [i["event_id"] for i in by_id["items"]] == [overdue["event_id"]]
    by_device = redrive(edge, "--rule", "tool_unknown", "--device", "TQW-07")
    assert [(i["event_id"], i["result"]) for i in by_device["items"]] == [(unknown["event_id"], "accepted")]
    by_since = redrive(edge, "--rule", "tool_unknown", "--since", since)
    assert [(i["event_id"], i["result"]) for i in by_since["items"]] == [(later["event_id"], "accepted")]
    still = redrive(edge, "--rule", "tool_unknown")
    assert [(i["event_id"], i["result"], i["rules"]) for i in still["items"]] == [
        (never["event_id"], "rejected", ["tool_unknown"])]
    again = cli(edge, "dlq", "redrive", "--rule", "tool_unknown", "--device", "TQW-07")
    assert again.returncode == 0 and again.stdout.startswith("0 record(s) redriven"), again

    accepted = {unknown["event_id"]: tqw07, overdue["event_id"]: tqw07, later["event_id"]: tqw08}
    for event_id, device in accepted.items():
        wait_until(lambda d=device, e=event_id: recorded(d, e), 60, 0.3, f"`recorded` for {event_id}")
    wait_until(lambda: sum(1 for b in bodies(edge) if b.get("type") == "dlq_redrive") == 4, 60, 0.3,
               "the redrive entries")
    entries = {b.get("event_id"): (seq, b) for seq, b in ((e.seq, parse_entry(e.entry).body) for e in edge.ledger())}
    for event_id, device in accepted.items():
        assert recorded(device, event_id)["seq"] == entries[event_id][0]
    assert never["event_id"] not in entries
    assert all(count == 1 for count in ledger_keys(edge).values())
    redrives = [b for b in bodies(edge) if b.get("type") == "dlq_redrive"]
    first = next(b for b in redrives if b["event_id"] == by_id["ledger_event_id"])
    assert first["operator"] == "alice" and first["selection"] == {"id": rows[overdue["event_id"]]["dlq_id"]}
    assert [(i["event_id"], i["result"]) for i in first["items"]] == [(overdue["event_id"], "accepted")]
    last = next(b for b in redrives if b["event_id"] == still["ledger_event_id"])
    assert last["rejected"] == 1 and last["operator"]

    [left] = [row for row in edge.dlq("validate") if "record" in row]
    assert left["event_id"] == never["event_id"] and left["redrive"] == 1  # the new report
    assert json.loads(cli(edge, "dlq", "list", "--json").stdout)[0]["dlq_id"] > max(
        row["dlq_id"] for row in rows.values())

    # a re-send now is answered from ingest's newest fate: in the ledger, at its seq (not `rejected`)
    receipts = tqw07.sent[unknown["event_id"]].receipts
    before = len(receipts)
    tqw07.send(unknown["event_id"], json.dumps(unknown).encode())
    wait_until(lambda: len(receipts) > before, 60, 0.3, "the answer to the re-send")
    answer = receipts[before]
    assert (answer["status"], answer.get("seq")) == ("duplicate", entries[unknown["event_id"]][0]), answer
    assert ledger_keys(edge).most_common(1)[0][1] == 1

    edge.stop()
    out = tmp_path / "export"
    exported = cli(edge, "audit", "export", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    verified = cli(edge, "audit", "verify", str(out))
    assert verified.returncode == 0 and verified.stdout.startswith(f"OK: {len(entries)} entries"), verified


def bodies(pipe) -> list[dict]:
    return [parse_entry(e.entry).body for e in pipe.ledger()]


def ledger_keys(pipe) -> Counter[str]:
    return Counter(e.idem for e in pipe.ledger())


def test_concurrent_redrives_of_one_record_record_it_once(edge):
    wrench = edge.device("torque_wrench", "TQW-07")
    data = torque(7, "TQW-07", NEW_TOOL, edge.station)
    send_rejected(wrench, [data])
    edge.fix_registry()
    time.sleep(0.5)  # [compliance] registry_check_s
    args = [sys.executable, "-m", "mro_edge", "dlq", "redrive", "--rule", "tool_unknown", "--json"]
    procs = [subprocess.Popen(args, env=edge.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    wrench.send(data["event_id"], json.dumps(data).encode())  # and the device sends it again meanwhile
    replies = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, (out, err)
        replies.append(json.loads(out))
    assert sorted(r["accepted"] for r in replies) == [0, 1], replies
    wait_until(lambda: recorded(wrench, data["event_id"]), 60, 0.3, "`recorded`")
    wait_until(lambda: sum(1 for b in bodies(edge) if b.get("type") == "dlq_redrive") == 1, 60, 0.3,
               "the redrive entry")
    time.sleep(1)
    assert [b["event_id"] for b in bodies(edge)].count(data["event_id"]) == 1
    assert ledger_keys(edge).most_common(1)[0][1] == 1
