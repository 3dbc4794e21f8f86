"""Input hygiene (`shared.contract.hygiene`): refused code points in text, duplicate JSON keys,
identifiers matched whole. Properties over generated text and records, not a list of examples."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mro_edge.simulator.records import valid_record
from shared.contract import RECORD_TYPES, ContractError, FieldError, decode_record
from shared.contract.errors import describe
from shared.contract.hygiene import FORBIDDEN, colons_differ, duplicate_keys, first_forbidden
from shared.contract.types import (
    ATA_PATTERN,
    REGISTRATION_PATTERN,
    UUID_PATTERN,
    DeviceId,
)

STATION, KIND, DEVICE = "HGR1", "tablet", "tab-01"
T0 = datetime(2024, 5, 20, 14, 30, tzinfo=UTC)
FORBIDDEN_POINTS = [chr(c) for first, last, _ in FORBIDDEN for c in range(first, last + 1)]
# free-text fields, by record type, as (path in the record, JSONPath in a report)
FREE_TEXT = {
    "maintenance_action": [(("description",), "$.description"), (("data_reference",), "$.data_reference"),
                           (("notes",), "$.notes")],
    "inspection": [(("notes",), "$.notes")],
    "part_removal": [(("notes",), "$.notes")],
    "torque_event": [(("notes",), "$.notes")],
}


def _record(seed: int, record_type: str) -> dict:
    return valid_record(random.Random(seed), station=STATION, device_kind=KIND, device_id=DEVICE,
                        record_type=record_type, occurred_at=T0)


def _decode(payload: bytes):
    return decode_record(payload, station=STATION, device_kind=KIND, device_id=DEVICE)


def _errors(payload: bytes) -> list[FieldError]:
    with pytest.raises(ContractError) as caught:
        _decode(payload)
    return caught.value.errors


def _put(data: dict, path: tuple, value) -> None:
    for step in path[:-1]:
        data = data[step]
    data[path[-1]] = value


clean_text = st.text(st.characters(codec="utf-8", exclude_characters="".join(FORBIDDEN_POINTS) + "\r",
                                   exclude_categories=("Cs",)) | st.sampled_from("\n\t"), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(sorted(FREE_TEXT)), st.data(), clean_text,
       st.sampled_from(FORBIDDEN_POINTS), st.booleans())
def test_a_refused_code_point_in_free_text_is_named_not_quoted(seed, record_type, data, text, bad, ascii_only):
    """Anywhere in any free-text field, on either spelling (raw UTF-8 or a \\u escape)."""
    path, json_path = data.draw(st.sampled_from(FREE_TEXT[record_type]))
    at = data.draw(st.integers(0, len(text)))
    value = text[:at] + bad + text[at:]
    record = _record(seed, record_type)
    _put(record, path, value)
    found = _errors(json.dumps(record, ensure_ascii=ascii_only).encode())
    assert [(e.path, e.rule) for e in found] == [(json_path, "text_control_char")]
    index, code_point = first_forbidden(value) or (-1, -1)
    kind = next(kind for first, last, kind in FORBIDDEN if first <= code_point <= last)
    assert found[0].received == f"U+{code_point:04X} ({kind}) at character {index + 1} of {len(value)}"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(sorted(FREE_TEXT)), st.data(), clean_text)
def test_clean_text_passes_unchanged(seed, record_type, data, text):
    path, _ = data.draw(st.sampled_from(FREE_TEXT[record_type]))
    record = _record(seed, record_type)
    _put(record, path, text)
    decoded = _decode(json.dumps(record, ensure_ascii=False).encode())
    assert getattr(decoded, path[-1]) == text


def test_lf_and_tab_are_text_cr_esc_nul_are_not():
    record = _record(1, "inspection")
    record["notes"] = "line one\n\tline two"
    assert _decode(json.dumps(record).encode()).notes == "line one\n\tline two"
    for bad, name in (("\r", "U+000D (control)"), ("\x1b[31m", "U+001B (control)"), ("\x00", "U+0000 (control)"),
                      ("\x9b", "U+009B (control)"), ("\ufeff", "U+FEFF (zero-width)"),
                      ("\u061c", "U+061C (bidi control)")):
        record["notes"] = f"ok{bad}"
        assert [(e.rule, e.received) for e in _errors(json.dumps(record).encode())] == [
            ("text_control_char", f"{name} at character 3 of {2 + len(bad)}")]


@pytest.mark.parametrize("field", ["work_order_id", "ata", "event_id", "station"])
@pytest.mark.parametrize("bad", ["\x00", "\u202e", "\u200b"])
def test_identifiers_and_enums_refuse_them_too(field, bad):
    record = _record(3, "torque_event")
    record[field] = record[field][:2] + bad + record[field][2:]
    assert [e.rule for e in _errors(json.dumps(record).encode())][0] == "text_control_char"
    record = _record(3, "torque_event")
    record["result"] = "OK" + bad
    assert [(e.path, e.rule) for e in _errors(json.dumps(record).encode())] == [("$.result", "text_control_char")]


def test_a_key_with_a_refused_code_point_is_reported_escaped():
    payload = json.dumps(_record(4, "inspection")).encode()[:-1] + b', "no\\u202ete": 1}'
    found = _errors(payload)
    assert [(e.path, e.rule) for e in found] == [('$["no\\u202ete"]', "text_control_char")]
    assert first_forbidden(found[0].path) is None


@given(st.text(max_size=100))
def test_received_never_carries_a_refused_code_point(text):
    assert first_forbidden(describe(text)) is None


# identifiers: matched whole, a trailing newline is not "the end"
@pytest.mark.parametrize("pattern,value", [(REGISTRATION_PATTERN, "N123AB"), (ATA_PATTERN, "32-41"),
                                           (UUID_PATTERN, "0b6e4c1a-8d2f-4e5b-9c7a-1f2e3d4c5b6a")])
def test_patterns_do_not_end_before_a_newline(pattern, value):
    import re

    assert re.search(pattern, value)
    assert not re.search(pattern, value + "\n")


@pytest.mark.parametrize("field", ["work_order_id", "station", "event_id", "ata"])
def test_trailing_newline_on_an_identifier_is_refused(field):
    record = _record(5, "torque_event")
    record[field] += "\n"
    assert _errors(json.dumps(record).encode())


@pytest.mark.parametrize("topic,parsed", [
    ("mro/HGR1/in/tablet/TAB-01", ("tablet", "TAB-01")),
    ("mro/HGR1/in/tablet/TAB-01\n", None),
    ("mro/HGR1/in/tablet/TAB\u202e01", None),
    ("mro/HGR1/in/toaster/TAB-01", None),
    ("mro/HGR1/in/tablet/", None),
    ("mro/HGR2/in/tablet/TAB-01", None),
])
def test_topics_match_device_ids_whole(topic, parsed):
    from shared.runtime.topics import Topics

    assert Topics("HGR1").parse_device_in(topic) == parsed


def test_device_id_type_is_the_topics_pattern():
    from shared.runtime.topics import DEVICE_ID_PATTERN

    assert DeviceId.__metadata__[0].pattern == DEVICE_ID_PATTERN


# duplicate keys
def _dump_with_duplicate(value, target: tuple, path: tuple = ()) -> str:
    """JSON of `value`, the object at `target` naming its first key a second time."""
    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {_dump_with_duplicate(v, target, (*path, k))}" for k, v in value.items()]
        if path == target:
            key = next(iter(value))
            items.append(f"{json.dumps(key)}: {json.dumps(value[key])}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dump_with_duplicate(v, target, (*path, i)) for i, v in enumerate(value)) + "]"
    return json.dumps(value)


def _objects(value, path=()):
    if isinstance(value, dict) and value:
        yield path
        for key, item in value.items():
            yield from _objects(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _objects(item, (*path, index))


def _json_path(steps) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.sampled_from(RECORD_TYPES), st.data())
def test_a_duplicate_key_at_any_depth_is_found(seed, record_type, data):
    record = _record(seed, record_type)
    target = data.draw(st.sampled_from(list(_objects(record))))
    payload = _dump_with_duplicate(record, target).encode()
    first_key = next(iter(_get(record, target)))
    found = _errors(payload)
    assert [(e.path, e.rule) for e in found] == [(_json_path((*target, first_key)), "duplicate_key")]


def _get(value, path):
    for step in path:
        value = value[step]
    return value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(st.tuples(st.sampled_from(["a", "b", "c:", "\u003a"]), inner), max_size=4).map(
        lambda pairs: ("pairs", pairs)),
    max_leaves=15,
)


def _render(value) -> str:
    if isinstance(value, tuple):
        return "{" + ", ".join(f"{json.dumps(k)}: {_render(v)}" for k, v in value[1]) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return json.dumps(value)


def _expected_duplicates(value, path=()):
    if isinstance(value, tuple):
        seen = set()
        for key, item in value[1]:
            if key in seen:
                yield (*path, key)
            seen.add(key)
            yield from _expected_duplicates(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _expected_duplicates(item, (*path, index))


@given(json_values)
def test_duplicate_keys_matches_a_plain_walk(value):
    assert duplicate_keys(_render(value)) == list(_expected_duplicates(value))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(RECORD_TYPES), st.booleans())
def test_the_fast_check_never_cries_wolf_on_a_clean_record(seed, record_type, indent):
    from shared.contract.decode import _reencode

    payload = json.dumps(_record(seed, record_type), indent=2 if indent else None).encode()
    assert not colons_differ(payload, _reencode(_decode(payload)))


def test_an_escaped_colon_cannot_hide_a_duplicate():
    record = _record(6, "inspection")
    record["notes"] = "a:b"
    payload = json.dumps(record).encode().replace(b"a:b", b"a\\u003ab")[:-1]
    payload += b', "station": "HGR1"}'  # one colon more, one escaped: the counts agree
    assert [(e.path, e.rule) for e in _errors(payload)] == [("$.station", "duplicate_key")]
