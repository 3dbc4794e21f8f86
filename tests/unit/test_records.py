"""The simulator's record generators: valid records pass everything, bad cases fail where they say."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from mro_edge.simulator.records import RECORD_TYPES, BadCase, bad_cases, valid_record
from shared.compliance import RULES as COMPLIANCE_RULES
from shared.compliance import STATEFUL_RULES, VERSION_RULES, Compliance, MemoryState, load_registry
from shared.compliance.settings import DEFAULT_REGISTRIES
from shared.contract import RULES, ContractError, check_rules, decode_record, idempotency_key, normalize
from shared.runtime.topics import DEVICE_KINDS

STATION = "HGR1"
RECEIVED = datetime(2024, 5, 20, 14, 30, tzinfo=UTC)
COMPLIANCE = Compliance(load_registry(DEFAULT_REGISTRIES))


def _judge(payload: bytes, kind: str, device_id: str, received_at: datetime,
           state: MemoryState | None = None) -> tuple[str, list]:
    """(stage that rejected it or "accepted", errors): ingest's decode, then validate's contract
    rules and compliance rules (with `state` as the box's history)."""
    try:
        record = decode_record(payload, station=STATION, device_kind=kind, device_id=device_id)
    except ContractError as exc:
        return "ingest", exc.errors
    state = state if state is not None else MemoryState()
    errors = check_rules(record, received_at=received_at)
    verdict = COMPLIANCE.judge(record, normalize(record), state)
    errors += verdict.errors
    if not errors:
        for table, key, value in verdict.writes:
            state.put(table, key, value)
    return ("validate" if errors else "accepted"), errors


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("record_type", [None, *RECORD_TYPES])
def test_valid_records_pass_everything(kind, record_type):
    rng = random.Random(f"{kind}/{record_type}")
    state = MemoryState()  # one box: hours, cycles and installed parts carry over between records
    for _ in range(40):
        occurred = RECEIVED - timedelta(seconds=rng.uniform(0, 60))
        data = valid_record(rng, station=STATION, device_kind=kind, device_id=f"{kind}-1",
                            record_type=record_type, occurred_at=occurred)
        stage, errors = _judge(json.dumps(data).encode(), kind, f"{kind}-1", occurred + timedelta(seconds=3),
                               state)
        assert stage == "accepted", (data, errors)
        if record_type is not None:
            assert data["type"] == record_type


def test_default_occurred_at_is_now():
    data = valid_record(random.Random(1), station=STATION, device_kind="tablet", device_id="t-1")
    stage, errors = _judge(json.dumps(data).encode(), "tablet", "t-1", datetime.now(UTC))
    assert stage == "accepted", errors


@pytest.mark.parametrize(("kind", "types"), [
    ("torque_wrench", {"torque_event"}),
    ("rfid_reader", {"part_removal", "part_installation", "part_receipt"}),
    ("barcode_scanner", {"part_removal", "part_installation", "part_receipt"}),
    ("tablet", set(RECORD_TYPES)),
])
def test_record_types_suit_the_device(kind, types):
    rng = random.Random(kind)
    seen = Counter(valid_record(rng, station=STATION, device_kind=kind, device_id="d",
                                occurred_at=RECEIVED)["type"] for _ in range(400))
    assert set(seen) == types


def test_generation_is_reproducible():
    def batch(seed):
        rng = random.Random(seed)
        return [valid_record(rng, station=STATION, device_kind="tablet", device_id="t", occurred_at=RECEIVED)
                for _ in range(20)]
    assert batch(9) == batch(9)
    assert batch(9) != batch(10)


def test_quantities_are_json_numbers():
    rng = random.Random(2)
    data = valid_record(rng, station=STATION, device_kind="torque_wrench", device_id="w",
                        occurred_at=RECEIVED)
    for name in ("torque_nm", "torque_min_nm", "torque_max_nm"):
        assert type(data[name]) in (int, float)


def test_naive_occurred_at_is_refused():
    with pytest.raises(ValueError):
        valid_record(random.Random(1), station=STATION, device_kind="tablet", device_id="t",
                     occurred_at=datetime(2024, 1, 1))


@pytest.fixture(scope="module", params=DEVICE_KINDS)
def cases(request) -> tuple[str, list[BadCase]]:
    kind = request.param
    return kind, bad_cases(random.Random(kind), station=STATION, device_kind=kind, device_id=f"{kind}-1",
                           received_at=RECEIVED)


def test_every_bad_case_fails_where_it_says(cases):
    kind, found = cases
    for case in found:
        stage, errors = _judge(case.payload, kind, f"{kind}-1", RECEIVED)
        assert stage == case.stage, case.name
        found = [(e.path, e.rule) for e in errors]
        assert (case.expected_path, case.expected_rule) in found, (case.name, errors)
        assert len(errors) == 1, (case.name, errors)


def test_bad_cases_cover_every_rule(cases):
    _, found = cases
    without_history = set(COMPLIANCE_RULES) - STATEFUL_RULES - VERSION_RULES
    assert {case.expected_rule for case in found} == (set(RULES) - {"contract"}) | without_history
    assert {case.stage for case in found} == {"ingest", "validate"}


def test_bad_cases_are_distinct(cases):
    _, found = cases
    assert len({case.name for case in found}) == len(found)
    assert len({case.payload for case in found}) == len(found)
    event_ids = [json.loads(case.payload)["event_id"] for case in found
                 if case.name not in ("not_json", "not_utf8", "not_an_object", "missing_event_id")
                 and case.expected_rule != "max_size"]
    assert len(set(event_ids)) == len(event_ids)


def test_validate_stage_cases_have_distinct_idempotency_keys(cases):
    kind, found = cases
    keys = set()
    for case in found:
        if case.stage == "validate":
            record = decode_record(case.payload, station=STATION, device_kind=kind, device_id=f"{kind}-1")
            keys.add(idempotency_key(normalize(record)))
    assert len(keys) == sum(case.stage == "validate" for case in found)


@pytest.mark.parametrize("received_at", [datetime(2024, 3, 1, 0, 0, 2, tzinfo=UTC),
                                         datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC)],
                         ids=["just-after-midnight", "just-before-midnight"])
def test_bad_cases_near_midnight_fail_only_as_named(received_at):
    for kind in DEVICE_KINDS:
        for case in bad_cases(random.Random(7), station=STATION, device_kind=kind, device_id="d-1",
                              received_at=received_at):
            stage, errors = _judge(case.payload, kind, "d-1", received_at)
            assert (stage, [(e.path, e.rule) for e in errors]) == (
                case.stage, [(case.expected_path, case.expected_rule)]), case.name
