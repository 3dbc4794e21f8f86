"""`decode_record` on hostile input: only ContractError ever escapes, and both paths agree.

The fast path (msgspec typed decode) and the error collector (a walk over the same Structs)
must agree on every payload: what decodes has no collected errors, and what fails is always
explained by a named rule, never by the `contract` safety net.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mro_edge.simulator.records import valid_record
from shared.contract import RECORD_TYPES, ContractError, decode_record, idempotency_key, normalize
from shared.contract.schema import collect_errors
from shared.ledger.canonical import canonical_json

STATION, KIND, DEVICE = "HGR1", "tablet", "tab-01"
T0 = datetime(2024, 5, 20, 14, 30, tzinfo=UTC)
_untyped = msgspec.json.Decoder(float_hook=Decimal)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["mro.record/1", "torque_event", "OK", "32-41", "N123AB", "2024-05-20T14:30:00Z",
                       "2024-05-20", "HGR1", "tab-01", "tablet", "FAA-AP", "NEW", "81205", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _record(seed: int, record_type: str) -> dict:
    return valid_record(random.Random(seed), station=STATION, device_kind=KIND, device_id=DEVICE,
                        record_type=record_type, occurred_at=T0)


records = st.builds(_record, st.integers(0, 2**32), st.sampled_from(RECORD_TYPES))


def outcome(payload: bytes):
    """Decode, asserting the contract of decode_record itself; the record or the errors."""
    try:
        record = decode_record(payload, station=STATION, device_kind=KIND, device_id=DEVICE)
    except ContractError as exc:
        assert exc.errors
        assert all(e.rule != "contract" for e in exc.errors), exc.errors
        for error in exc.errors:
            assert error.path.startswith("$")
            assert error.received is None or len(error.received) <= 80
        return exc.errors
    obj = _untyped.decode(payload)
    assert collect_errors(obj, station=STATION, device_kind=KIND, device_id=DEVICE) == []
    canonical_json(normalize(record))
    idempotency_key(normalize(record))
    return record


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _mutate(data, path, action, value):
    if not path:
        return value
    holder = data
    for step in path[:-1]:
        holder = holder[step]
    if action == "delete" and isinstance(holder, dict):
        del holder[path[-1]]
    elif action == "add" and isinstance(holder, dict):
        holder[str(path[-1]) + "_x"] = value
    else:
        holder[path[-1]] = value
    return data


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes(payload):
    outcome(payload)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json(value):
    outcome(json.dumps(value).encode())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.data())
def test_mutated_records(data, draw):
    for _ in range(draw.draw(st.integers(1, 3))):
        path = draw.draw(st.sampled_from(list(_paths(data))))
        action = draw.draw(st.sampled_from(["set", "delete", "add"]))
        data = _mutate(data, path, action, draw.draw(json_values))
    outcome(json.dumps(data).encode())


@settings(max_examples=300, deadline=None)
@given(records, st.data())
def test_mutated_bytes(data, draw):
    payload = bytearray(json.dumps(data, ensure_ascii=False).encode())
    for _ in range(draw.draw(st.integers(1, 4))):
        at = draw.draw(st.integers(0, len(payload) - 1))
        kind = draw.draw(st.sampled_from(["flip", "insert", "delete"]))
        byte = draw.draw(st.integers(0, 255))
        if kind == "flip":
            payload[at] = byte
        elif kind == "insert":
            payload.insert(at, byte)
        elif len(payload) > 1:
            del payload[at]
    outcome(bytes(payload))


@settings(max_examples=300, deadline=None)
@given(records, st.data())
def test_mutated_strings(data, draw):
    """Identifiers replaced by near-misses, where pattern edge cases live."""
    paths = [p for p in _paths(data) if p and isinstance(_get(data, p), str)]
    path = draw.draw(st.sampled_from(paths))
    original = _get(data, path)
    alphabet = st.sampled_from("AZaz09-/. _\n\u00e9\u0130IO")
    edited = draw.draw(st.one_of(
        st.just(original + draw.draw(st.text(alphabet, min_size=1, max_size=3))),
        st.just(draw.draw(st.text(alphabet, max_size=3)) + original),
        st.just(original[:-1]),
        st.text(alphabet, max_size=40),
    ))
    _mutate(data, path, "set", edited)
    outcome(json.dumps(data).encode())


def _get(data, path):
    for step in path:
        data = data[step]
    return data


@pytest.mark.parametrize("payload", [
    b'{"type": "torque_event", "torque_nm": [[[[1]]]]}',
    b'{"type": "torque_event", "torque_nm": 1e999999999999}',
    b'{"type": "torque_event", "torque_nm": -1e-999999999999}',
    b'{"type": "torque_event", "tightening_id": 123456789012345678901234567890}',
    b'{"occurred_at": "\\ud800"}',
    b'{"a": "\\u0000"}',
    b'{"schema": "mro.record/1", "schema": "mro.record/2"}',
    b"{" + b'"a":1,' * 5000 + b'"b":2}',
])
def test_awkward_payloads(payload):
    assert isinstance(outcome(payload), list)
