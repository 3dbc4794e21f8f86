"""ADI-var (GS1 EPC TDS, aviation part tags): the TDS examples, round trips, and hostile bits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.devices.epc import (
    ADI_ALPHABET,
    MAX_PART_NUMBER,
    MAX_SERIAL,
    AviationPart,
    decode_adi_var,
    encode_adi_var,
    is_adi_var,
)
from shared.contract.errors import FieldError

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "devices" / "adi_var.json").read_text())["vectors"]

alphabet = "".join(sorted(ADI_ALPHABET))
cages = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=5, max_size=6)
part_numbers = st.text(alphabet, max_size=MAX_PART_NUMBER)
serials = st.one_of(st.text(alphabet, min_size=1, max_size=MAX_SERIAL),
                    st.text(alphabet, min_size=1, max_size=MAX_SERIAL - 1).map(lambda s: "#" + s))


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_tds_vectors(vector):
    expected = vector["expect"]["part"]
    if expected is None:
        assert not is_adi_var(vector["epc_hex"])
        return
    part = decode_adi_var(vector["epc_hex"])
    assert isinstance(part, AviationPart)
    assert part == AviationPart(**expected)


def test_encoder_writes_the_tds_example_bits():
    """The E.3 hex is 146 bits padded to a hex digit; ours is padded to a 16-bit word."""
    hexed = encode_adi_var(3, "35962", "PQ7VZ4", "M37GXB92")
    assert hexed == "3B0E0CF5E76C9047759AD00373DC7602E7200000"
    assert len(hexed) % 4 == 0


def test_fields_are_split_on_character_boundaries_not_on_zero_runs():
    """'P' (010000) then 'A' (000001) holds six zero bits across two characters: not a terminator."""
    part = decode_adi_var(encode_adi_var(0, "81205", "PA", "P1"))
    assert isinstance(part, AviationPart)
    assert (part.part_number, part.serial) == ("PA", "P1")


def test_uri_escapes_slash_and_hash():
    part = decode_adi_var(encode_adi_var(1, "1ABC2", "AB/12", "#S-1"))
    assert isinstance(part, AviationPart)
    assert part.tag_uri == "urn:epc:tag:adi-var:1.1ABC2.AB%2F12.%23S-1"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 63), cages, part_numbers, serials)
def test_encode_decode_round_trip(filter_value, cage, part_number, serial):
    hexed = encode_adi_var(filter_value, cage, part_number, serial)
    part = decode_adi_var(hexed)
    assert isinstance(part, AviationPart)
    assert (part.filter, part.cage, part.part_number, part.serial) == (filter_value, cage, part_number, serial)
    assert len(hexed) * 4 <= 434 + 15


@settings(max_examples=300, deadline=None)
@given(st.text("0123456789ABCDEFabcdefXYZ -", max_size=140))
def test_any_text_gives_a_part_or_field_errors(text):
    result = decode_adi_var(text)
    assert isinstance(result, AviationPart) or (result and all(isinstance(e, FieldError) for e in result))


@pytest.mark.parametrize("hexed, rule", [
    ("3B", "adi_var.length"),
    ("3074257BF7194E4000001A85", "adi_var.header"),
    ("3B0E0CF5E76C9047759AD00373DC7602E7201", "adi_var.padding"),
    ("3B0E0CF5E76C9047759AD00373DC7602E7", "adi_var.terminator"),
    ("3B" + "F" * 60, "adi_var.cage"),
    ("3B" + "0" * 60, "adi_var.cage"),
])
def test_malformed_adi_var_names_the_rule(hexed, rule):
    result = decode_adi_var(hexed)
    assert isinstance(result, list)
    assert rule in {e.rule for e in result}
    assert all(e.path.startswith("epc_hex") for e in result)


def test_encoder_refuses_what_the_scheme_cannot_hold():
    for args in [(64, "81205", "", "1"), (0, "8120", "", "1"), (0, "81205", "a", "1"), (0, "81205", "", ""),
                 (0, "81205", "X" * 33, "1"), (0, "81205", "", "1#")]:
        with pytest.raises(ValueError):
            encode_adi_var(*args)
