"""Stored bodies: `normalize`, `record_from_body`, `idempotency_key`, and the error report."""

from __future__ import annotations

import base64
import json
import random
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mro_edge.simulator.records import valid_record
from shared.contract import (
    RECORD_TYPES,
    ContractError,
    FieldError,
    check_rules,
    decode_record,
    error_report,
    idempotency_key,
    normalize,
    record_from_body,
)
from shared.ledger.canonical import canonical_json, sha256_hex
from shared.runtime.topics import DEVICE_KINDS

STATION, DEVICE = "HGR1", "dev-9"
T0 = datetime(2024, 5, 20, 14, 30, 0, 120000, tzinfo=UTC)
QUANTITIES = {"aircraft_hours", "torque_nm", "torque_min_nm", "torque_max_nm", "angle_deg", "tsn_hours"}
COUNTS = {"aircraft_cycles", "csn", "tightening_id"}


def make(seed: int, record_type: str | None = None, kind: str = "tablet") -> dict:
    return valid_record(random.Random(seed), station=STATION, device_kind=kind, device_id=DEVICE,
                        record_type=record_type, occurred_at=T0)


def decode(data: dict | bytes, kind: str = "tablet"):
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    return decode_record(payload, station=STATION, device_kind=kind, device_id=DEVICE)


records = st.builds(make, st.integers(0, 2**32), st.sampled_from(RECORD_TYPES))


# --- normalize --------------------------------------------------------------------------------------

def test_normalized_torque_event():
    data = make(1, "torque_event")
    data.update(torque_nm=24.50, torque_min_nm=20, torque_max_nm=25.0, angle_deg=90)
    body = normalize(decode(data))
    assert body["torque_nm"] == "24.5" and body["torque_min_nm"] == "20" and body["torque_max_nm"] == "25"
    assert body["angle_deg"] == "90"
    assert body["type"] == "torque_event" and body["event_id"] == data["event_id"]
    assert body["occurred_at"] == "2024-05-20T14:30:00.12Z"
    assert type(body["tightening_id"]) is int
    assert body["tool"]["calibration_due"] == data["tool"]["calibration_due"]


def _shape(value):
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return None


@settings(max_examples=150, deadline=None)
@given(records)
def test_normalize_keeps_the_input_field_names_and_types(data):
    body = normalize(decode(data))
    assert _shape(body) == _shape(data)
    for sent, stored in ((data, body), (data.get("part", {}), body.get("part", {}))):
        for name in QUANTITIES & sent.keys():
            assert type(stored[name]) is str and Decimal(stored[name]) == Decimal(repr(sent[name]))
            text = stored[name]
            assert "e" not in text.lower() and not ("." in text and text.endswith("0"))
        for name in COUNTS & sent.keys():
            assert type(stored[name]) is int and stored[name] == sent[name]
    canonical_json(body)


@settings(max_examples=150, deadline=None)
@given(records)
def test_body_round_trip(data):
    record = decode(data)
    body = normalize(record)
    again = record_from_body(body)
    assert again == record
    assert normalize(again) == body


def test_extreme_values_still_canonicalize():
    data = make(2, "torque_event")
    data.update(torque_nm=0, torque_min_nm=0, torque_max_nm=1_000_000, tightening_id=2**53 - 1)
    payload = json.dumps(data).replace('"torque_nm": 0', '"torque_nm": 0.00000000000000000001').encode()
    body = normalize(decode(payload))
    assert body["torque_nm"] == "0.00000000000000000001"
    assert canonical_json(body)


@pytest.mark.parametrize("change", [
    {"torque_nm": 24.5}, {"torque_nm": "24.50"}, {"torque_nm": "1E+2"},
    {"occurred_at": "2024-05-20T14:30:00+00:00"}, {"surprise": 1}, {"tightening_id": "3"},
], ids=["number-not-string", "trailing-zero", "exponent", "offset", "unknown", "count-as-string"])
def test_record_from_body_refuses_what_normalize_never_makes(change):
    body = normalize(decode(make(3, "torque_event"))) | change
    with pytest.raises(ContractError):
        record_from_body(body)


# --- idempotency key --------------------------------------------------------------------------------

def test_idempotency_key_is_the_hash_of_the_canonical_body_without_event_id():
    body = normalize(decode(make(4)))
    rest = {k: v for k, v in body.items() if k != "event_id"}
    assert idempotency_key(body) == sha256_hex(canonical_json(rest))
    assert len(idempotency_key(body)) == 64


@settings(max_examples=100, deadline=None)
@given(records, st.uuids(version=4))
def test_a_new_event_id_keeps_the_key(data, new_id):
    again = dict(data, event_id=str(new_id))
    assert idempotency_key(normalize(decode(again))) == idempotency_key(normalize(decode(data)))


def _mutations(data: dict) -> list:
    """Content changes that keep the record valid; each must give a new key."""
    changes = [
        lambda d, r: d.update(work_order_id=f"WO-{r.randint(0, 10**9)}-X"),
        lambda d, r: d.update(notes=d.get("notes", "") + r.choice("abc.")),
        lambda d, r: d.update(occurred_at=f"2024-05-20T14:30:{r.randint(1, 59):02d}Z"),
        lambda d, r: d["aircraft"].update(serial_number=str(int(d["aircraft"]["serial_number"]) + 1)),
        lambda d, r: d["aircraft"].pop("type"),
        lambda d, r: d.update(ata=d["ata"][:5] if len(d["ata"]) > 5 else d["ata"] + "-01"),
        lambda d, r: d["technician"].update(cert_no=d["technician"]["cert_no"] + "1"),
    ]
    kind = data["type"]
    if kind == "torque_event":
        changes += [lambda d, r: d.update(torque_nm=d["torque_nm"] + 0.01, result="NOK"),
                    lambda d, r: d.update(tightening_id=d["tightening_id"] + 1)]
    if kind == "maintenance_action":
        changes += [lambda d, r: d.update(return_to_service=not d["return_to_service"])]
    if kind == "inspection":
        changes += [lambda d, r: d.update(findings=d["findings"] + ["New finding."])]
    if kind.startswith("part_"):
        changes += [lambda d, r: d["part"].update(serial_number=d["part"]["serial_number"] + "9")]
    return changes


@settings(max_examples=150, deadline=None)
@given(records, st.randoms(use_true_random=False), st.data())
def test_any_content_change_alters_the_key(data, rng, draw):
    original = idempotency_key(normalize(decode(data)))
    changed = json.loads(json.dumps(data))
    draw.draw(st.sampled_from(_mutations(changed)))(changed, rng)
    assert idempotency_key(normalize(decode(changed))) != original


def _spell(value, rng: random.Random, key: str | None = None) -> str:
    """JSON text of `value` with random key order and whitespace, quantities spelt in random ways."""
    space = rng.choice(["", " ", "\n  ", "\t"])
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        inner = f",{space}".join(f"{json.dumps(k)}{space}:{space}{_spell(v, rng, k)}" for k, v in items)
        return "{" + space + inner + space + "}"
    if isinstance(value, list):
        return "[" + f",{space}".join(_spell(v, rng) for v in value) + "]"
    if key in QUANTITIES and not isinstance(value, bool):
        number = Decimal(repr(value))
        plain = format(number, "f")
        return rng.choice([plain, plain + (".000" if "." not in plain else "00"), format(number, "E"),
                           format(number, "e").replace("e+", "e"), f"{plain}E0"])
    return json.dumps(value)


@settings(max_examples=150, deadline=None)
@given(records, st.randoms(use_true_random=False))
def test_spelling_does_not_change_the_key(data, rng):
    respelt = _spell(data, rng).encode()
    assert respelt != json.dumps(data).encode()
    assert idempotency_key(normalize(decode(respelt))) == idempotency_key(normalize(decode(data)))


def test_number_spellings_of_one_quantity_share_a_key():
    data = make(5, "torque_event")
    text = json.dumps(data | {"torque_nm": 7777.5})
    keys = {idempotency_key(normalize(decode(text.replace("7777.5", spelling).encode())))
            for spelling in ("12.5", "12.50", "1.25e1", "125E-1", "12.500000")}
    assert len(keys) == 1


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_keys_do_not_collide_across_many_records(kind):
    keys = {idempotency_key(normalize(decode(make(seed, kind=kind), kind))) for seed in range(300)}
    assert len(keys) == 300


# --- error report -----------------------------------------------------------------------------------

ERRORS = [FieldError("$.ata", "ata_chapter", "a chapter", '"99"'),
          FieldError("$.technician", "required", "x", None)]


def test_error_report_shape():
    report = error_report(stage="ingest", errors=ERRORS, received_at="2024-05-20T14:30:00.000Z",
                          event_id="e", idempotency_key="k", raw=b"{raw}")
    assert list(report) == ["stage", "event_id", "idempotency_key", "received_at", "errors", "raw_b64"]
    assert report["errors"] == [
        {"path": "$.ata", "rule": "ata_chapter", "expected": "a chapter", "received": '"99"'},
        {"path": "$.technician", "rule": "required", "expected": "x", "received": None},
    ]
    assert base64.b64decode(report["raw_b64"]) == b"{raw}"
    assert canonical_json(report)


def test_error_report_leaves_out_what_is_unknown():
    report = error_report(stage="validate", errors=ERRORS, received_at="t")
    assert list(report) == ["stage", "received_at", "errors"]


def test_raw_is_capped():
    assert "raw_truncated" not in error_report(stage="ingest", errors=ERRORS, received_at="t", raw=b"x" * 10,
                                              max_raw=10)
    report = error_report(stage="ingest", errors=ERRORS, received_at="t", raw=b"x" * 11, max_raw=10)
    assert base64.b64decode(report["raw_b64"]) == b"x" * 10 and report["raw_truncated"] is True


# --- no free text in reports --------------------------------------------------------------------------

secrets = st.text(st.sampled_from("abcdefghij"), min_size=10, max_size=20).map("SECRET".__add__)


def _breakages(secret: str) -> list:
    pad = secret * (2100 // len(secret) + 1)
    return [
        lambda d: d.update(notes=pad),
        lambda d: d.update(notes=secret, ata="99"),
        lambda d: d.update(surprise=secret),
        lambda d: d.update(surprise={"deep": secret}),
        lambda d: d.update(description=pad, type="maintenance_action"),
        lambda d: d.update(data_reference=pad[:130], type="maintenance_action"),
        lambda d: d.update(findings=[pad[:600]], type="inspection"),
        lambda d: d.update(findings=[secret] * 51, type="inspection"),
        lambda d: d.update(position=pad[:50], type="part_installation"),
        lambda d: d["technician"].update(signature=pad),
        lambda d: d["technician"].update(signature=1, nickname=secret),
        lambda d: d.update(type="other", notes=secret),
        lambda d: d.update(schema="mro.record/9", notes=secret),
    ]


@settings(max_examples=150, deadline=None)
@given(records, secrets, st.data())
def test_error_reports_never_contain_free_text(data, secret, draw):
    draw.draw(st.sampled_from(_breakages(secret)))(data)
    payload = json.dumps(data).encode()
    with pytest.raises(ContractError) as caught:
        decode(payload)
    report = error_report(stage="ingest", errors=caught.value.errors, received_at="t",
                          event_id=caught.value.event_id, raw=payload)
    visible = json.dumps({k: v for k, v in report.items() if k != "raw_b64"})
    assert "SECRET" not in visible and "SECRET" not in str(caught.value)


def test_rule_errors_never_contain_free_text():
    data = make(6, "torque_event") | {"notes": "SECRET words", "torque_nm": 99, "result": "OK"}
    found = check_rules(decode(data), received_at=datetime(2030, 1, 1, tzinfo=UTC))
    assert len(found) == 2
    assert "SECRET" not in json.dumps([[e.path, e.rule, e.expected, e.received] for e in found])


def test_event_ids_are_fresh_per_record():
    ids = {make(seed)["event_id"] for seed in range(100)}
    assert len(ids) == 100 and all(uuid.UUID(i).version == 4 for i in ids)
