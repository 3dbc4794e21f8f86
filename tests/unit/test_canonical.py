"""RFC 8785 canonical JSON: the public JCS vectors, the ledger profile, and a reference encoder."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ledger.canonical import MAX_SAFE_INTEGER, CanonicalError, canonical_json, sha256_hex

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "jcs"  # provenance: tests/vectors/README.md
VECTOR_NAMES = sorted(p.name for p in (VECTORS / "input").glob("*.json"))

# Vectors with floats are outside the DESIGN.md section 6 profile (no floats in anything signed).
# For each: the member holding the floats, and the bytes it contributes to the expected output;
# the encoder must refuse the whole vector, and canonicalize the rest exactly.
FLOAT_MEMBERS = {
    "structures.json": (("1", "\n"), b'"\\n":56,'),
    "values.json": (("numbers",), b'"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'),
}
# Vectors whose keys are not ASCII are outside the profile too, but their float-free content
# is tested in full with `ascii_keys=False`, which is where UTF-16 key order matters.
NON_ASCII_KEYS = {"french.json", "weird.json"}


def _vector(name: str) -> tuple[object, bytes]:
    value = json.loads((VECTORS / "input" / name).read_bytes())
    expected = (VECTORS / "output" / name).read_bytes()
    hex_text = (VECTORS / "outhex" / name.replace(".json", ".txt")).read_text()
    assert bytes.fromhex(hex_text) == expected, "output and outhex of a vector must agree"
    return value, expected


def test_all_vectors_are_accounted_for():
    assert len(VECTOR_NAMES) == 6
    assert set(FLOAT_MEMBERS) | NON_ASCII_KEYS <= set(VECTOR_NAMES)


@pytest.mark.parametrize("name", [n for n in VECTOR_NAMES if n not in FLOAT_MEMBERS])
def test_float_free_vector(name):
    value, expected = _vector(name)
    assert canonical_json(value, ascii_keys=False) == expected
    if name in NON_ASCII_KEYS:
        with pytest.raises(CanonicalError, match="not ASCII"):
            canonical_json(value)
    else:
        assert canonical_json(value) == expected


@pytest.mark.parametrize("name", sorted(FLOAT_MEMBERS), ids=lambda n: f"{n}-floats-are-outside-the-profile")
def test_float_vector_is_refused_and_its_float_free_part_matches(name):
    value, expected = _vector(name)
    with pytest.raises(CanonicalError, match="float"):
        canonical_json(value)
    path, float_bytes = FLOAT_MEMBERS[name]
    holder = value
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    assert expected.count(float_bytes) == 1
    assert canonical_json(value) == expected.replace(float_bytes, b"")


@pytest.mark.parametrize(("text", "encoded"), [
    ("\u2028\u2029", "\"\u2028\u2029\""),
    ("\x7f", "\"\x7f\""),
    ("</script>", "\"</script>\""),
    ("a/b", "\"a/b\""),
    ("\x00\x01\x1f", "\"\\u0000\\u0001\\u001f\""),
    ("\b\t\n\f\r", "\"\\b\\t\\n\\f\\r\""),
    ("\x0b", "\"\\u000b\""),
    ("\"\\", "\"\\\"\\\\\""),
    ("é€😂", "\"é€😂\""),
])
def test_string_escaping_follows_rfc8785(text, encoded):
    assert canonical_json(text) == encoded.encode()


def test_integer_range_is_inclusive():
    assert canonical_json([MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER]) == b"[9007199254740991,-9007199254740991]"
    for bad in (MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1, 10**30):
        with pytest.raises(CanonicalError, match="outside"):
            canonical_json({"n": bad})


@pytest.mark.parametrize("value", [
    1.0, {"a": [0.5]}, {1: "x"}, {("a",): 1}, {"ключ": 1}, Decimal("1.5"), b"bytes", {"s": {1, 2}},
    "\ud800", {"k": "x\udfffy"}, {"\ud800": 1},
], ids=["float", "nested-float", "int-key", "tuple-key", "non-ascii-key", "decimal", "bytes", "set",
        "lone-surrogate", "nested-lone-surrogate", "surrogate-key"])
def test_values_outside_the_profile_are_refused(value):
    with pytest.raises(CanonicalError):
        canonical_json(value)


def test_deep_nesting_is_refused_cleanly():
    value: list = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(CanonicalError):
        canonical_json(value)


def test_bool_and_null_and_tuple():
    value = {"t": True, "f": False, "n": None, "a": (1, "x")}
    assert canonical_json(value) == b'{"a":[1,"x"],"f":false,"n":null,"t":true}'


def test_sha256_hex():
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _reference(value, *, utf16_order: bool = True) -> str:
    """RFC 8785 written out the obvious way, for comparison (profile values only)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        named = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
        out = []
        for ch in value:
            if ch in named:
                out.append(named[ch])
            elif ord(ch) < 0x20:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ",".join(_reference(v) for v in value) + "]"
    keys = sorted(value, key=_utf16_units)
    return "{" + ",".join(_reference(k) + ":" + _reference(value[k]) for k in keys) + "}"


def _utf16_units(key: str) -> list[int]:
    units = []
    for ch in key:
        point = ord(ch)
        if point > 0xFFFF:
            point -= 0x10000
            units += [0xD800 + (point >> 10), 0xDC00 + (point & 0x3FF)]
        else:
            units.append(point)
    return units


_ints = st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
_scalars = st.none() | st.booleans() | _ints | st.text()


def _json(keys: st.SearchStrategy[str]) -> st.SearchStrategy:
    def containers(inner):
        return st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5)

    return st.recursive(_scalars, containers, max_leaves=25)


profile_values = _json(st.text(st.characters(max_codepoint=0x7F), max_size=8))
unicode_values = _json(st.text(max_size=8))


def _reordered(value, rng: random.Random):
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _reordered(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_reordered(v, rng) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(profile_values)
def test_round_trip_and_idempotent(value):
    encoded = canonical_json(value)
    assert json.loads(encoded) == value
    assert canonical_json(json.loads(encoded)) == encoded


@settings(max_examples=200, deadline=None)
@given(profile_values, st.randoms(use_true_random=False))
def test_key_order_does_not_matter(value, rng):
    assert canonical_json(_reordered(value, rng)) == canonical_json(value)


@settings(max_examples=300, deadline=None)
@given(profile_values)
def test_matches_reference_implementation(value):
    assert canonical_json(value) == _reference(value).encode()


@settings(max_examples=300, deadline=None)
@given(unicode_values)
def test_matches_reference_with_any_unicode_keys(value):
    assert canonical_json(value, ascii_keys=False) == _reference(value).encode()


def test_utf16_order_differs_from_code_point_order_where_rfc8785_says():
    # U+1F602 (surrogates D83D DE02) sorts before U+FB33 in UTF-16 units, after it in code points.
    encoded = canonical_json({"\ufb33": 1, "\U0001f602": 2}, ascii_keys=False)
    assert encoded == '{"\U0001f602":2,"\ufb33":1}'.encode()
