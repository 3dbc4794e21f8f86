"""Part marks: ISO/IEC 15434 envelopes, MH10.8.2 DIs, ATA TEIs, loose nameplate text, lost framing."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.devices.malformed import Malformed
from services.devices.profiles.partmark_15434.parser import EOT, FIELD_OF, GS, RS, PartMark, envelope, parse_partmark

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "devices" / "partmarks.json").read_text())["vectors"]
NAMED = ("cage", "part_number", "original_part_number", "serial", "uii")


def _scan(text: str) -> str:
    return text.replace("<RS>", RS).replace("<GS>", GS).replace("<EOT>", EOT)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vectors(vector):
    scan = _scan(vector["scan"])
    mark = parse_partmark(scan)
    assert isinstance(mark, PartMark), mark
    assert mark.raw == scan
    for key, value in vector["expect"].items():
        assert getattr(mark, key) == value, key


def test_part_mark_crosses_a_process_boundary_unchanged():
    mark = parse_partmark(_scan(VECTORS[1]["scan"]))
    assert msgspec.json.decode(msgspec.json.encode(mark), type=PartMark) == mark


# ---------------------------------------------------------------- envelopes built at random

values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20)
cage_values = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=5, max_size=5)
other_dis = st.from_regex(r"[0-9]{0,3}[A-Z]", fullmatch=True).filter(lambda d: d not in FIELD_OF)
other_teis = st.from_regex(r"[A-Z]{3}", fullmatch=True).filter(lambda t: t not in FIELD_OF)
NAMED_IDS = {"06": {"cage": ["17V"], "part_number": ["1P"], "serial": ["S"], "uii": ["18S", "25S"]},
             "TEI": {"cage": ["MFR", "CAG"], "part_number": ["PNR"], "original_part_number": ["PNO"],
                     "serial": ["SER", "SEQ"], "uii": ["UCN"]}}


@st.composite
def envelopes(draw):
    """`(segments, elements, named)`: a valid message, every element in it, the fields it names."""
    formats = draw(st.lists(st.sampled_from(["06", "12", "DD"]), min_size=1, max_size=3))
    segments: list[tuple[str, list[tuple[str, str]]]] = [(f, []) for f in formats]
    elements: dict[str, str] = {}
    named: dict[str, str] = {}
    for name in NAMED:
        if not draw(st.booleans()):
            continue
        options = [(i, ident) for i, f in enumerate(formats)
                   for ident in NAMED_IDS["06" if f == "06" else "TEI"].get(name, [])]
        if not options:
            continue
        i, ident = draw(st.sampled_from(options))
        value = draw(cage_values if name == "cage" else values)
        segments[i][1].append((ident, value))
        elements[ident], named[name] = value, value
    for i, fmt in enumerate(formats):
        for ident in draw(st.lists(other_dis if fmt == "06" else other_teis, max_size=4)):
            if ident not in elements:
                value = draw(values)
                segments[i][1].append((ident, value))
                elements[ident] = value
        if not segments[i][1]:
            ident = draw(other_dis if fmt == "06" else other_teis)
            spare = (f"{n}Z" for n in range(100, 110)) if fmt == "06" else (f"ZZ{c}" for c in "ABCDEFGHIJ")
            while ident in elements:
                ident = next(spare)
            value = draw(values)
            segments[i][1].append((ident, value))
            elements[ident] = value
        segments[i] = (fmt, draw(st.permutations(segments[i][1])))
    return segments, elements, named


prefixes = st.sampled_from(["", "]d1", "]d2", "]Q1"])
suffixes = st.sampled_from(["", "\r\n", "\n"])


@settings(max_examples=300, deadline=None)
@given(envelopes(), prefixes, suffixes)
def test_envelope_build_parse_round_trip(built, prefix, suffix):
    segments, elements, named = built
    scan = prefix + envelope(segments) + suffix
    mark = parse_partmark(scan)
    assert isinstance(mark, PartMark), mark
    assert not mark.framing_lost
    assert mark.elements == elements
    assert mark.envelope_formats == [fmt for fmt, _ in segments]
    assert {name: getattr(mark, name) for name in NAMED} == {name: named.get(name) for name in NAMED}
    assert mark.symbology == (prefix or None)
    assert mark.raw == scan


FRAMING = (GS, RS, EOT)
SUBSETS = [set(c) for n in (1, 2, 3) for c in combinations(FRAMING, n)]


@settings(max_examples=300, deadline=None)
@given(envelopes(), st.sampled_from(SUBSETS), prefixes, suffixes)
def test_stripping_any_kind_of_framing_is_flagged_never_parsed(built, dropped, prefix, suffix):
    """A keyboard-wedge bridge drops a kind of control character wherever it occurs."""
    scan = prefix + "".join(c for c in envelope(built[0]) if c not in dropped) + suffix
    mark = parse_partmark(scan)
    assert isinstance(mark, PartMark)
    assert mark.framing_lost
    assert (mark.elements, mark.envelope_formats) == ({}, [])
    assert all(getattr(mark, name) is None for name in NAMED)
    assert mark.raw == scan


@settings(max_examples=200, deadline=None)
@given(envelopes(), st.data())
def test_losing_any_one_header_or_trailer_character_is_flagged(built, data):
    text = envelope(built[0])
    framing = [3, len(text) - 2, len(text) - 1]
    framing += [i + 3 for i, c in enumerate(text) if c == RS and i + 3 < len(text) and text[i + 3] == GS]
    at = data.draw(st.sampled_from(framing))
    mark = parse_partmark(text[:at] + text[at + 1:])
    assert isinstance(mark, PartMark) and mark.framing_lost


def test_a_gs_lost_after_a_cage_element_is_caught_by_the_cage_rule():
    text = envelope([("06", [("17V", "81205"), ("1P", "12345-01"), ("S", "ABC123")])])
    result = parse_partmark(text.replace(GS + "1P", "1P"))
    assert isinstance(result, Malformed)
    assert [e.rule for e in result.errors] == ["cage.format"]


# ---------------------------------------------------------------- refusals

def _env(*fields: str, fmt: str = "06") -> str:
    return "[)>" + RS + fmt + GS + GS.join(fields) + RS + EOT


@pytest.mark.parametrize("scan, path, rule", [
    (_env("17V81205", fmt="05"), "$.segments[0].format", "envelope.format"),
    (_env("17V81205", "p123"), "$.segments[0].fields[1]", "di.syntax"),
    (_env("17V81205", ""), "$.segments[0].fields[1]", "di.syntax"),
    (_env("MFR81205", fmt="12"), "$.segments[0].fields[0]", "tei.syntax"),
    (_env("S123", "S124"), "$.segments[0].fields[1]", "element.duplicate"),
    (_env("S123", "25SUN123"), None, None),
    (_env("17V8120"), "$.segments[0].fields[0]", "cage.format"),
    (_env("17V81205", "1PAB\tC"), "$.segments[0].fields[1]", "value.charset"),
    (_env("MFR 81205", "CAG 81206", fmt="12"), "$.segments[0].fields[1]", "element.conflict"),
    (_env("SER 1", "SEQ 2", fmt="DD"), "$.segments[0].fields[1]", "element.conflict"),
    ("17V81205" + GS + "1P12345", "$", "envelope.header"),
    ("hello world", "$", "partmark.format"),
    ("", "$", "partmark.format"),
    ("MFR 81205*PNR", "$.elements[1]", "tei.syntax"),
    ("MFR 81205 PNR", "$.elements[1]", "tei.syntax"),
    ("MFR 81205*pnr 1", "$.elements[1]", "tei.syntax"),
    ("MFR 8120*SER 1", "$.elements[0]", "cage.format"),
    ("x" * 5000, "$", "payload.size"),
])
def test_refusals_name_path_and_rule(scan, path, rule):
    result = parse_partmark(scan)
    if rule is None:
        assert isinstance(result, PartMark) and result.serial == "123" and result.uii == "UN123"
        return
    assert isinstance(result, Malformed), result
    assert (path, rule) in {(e.path, e.rule) for e in result.errors}
    report = result.report(received_at="2026-12-06T00:00:00.000Z")
    assert report["stage"] == "devices.partmark"


def test_a_repeated_identical_element_is_one_element():
    mark = parse_partmark(_env("S123", "S123"))
    assert isinstance(mark, PartMark) and mark.elements == {"S": "123"}


def test_the_same_field_from_two_formats_must_agree():
    text = envelope([("06", [("17V", "81205")]), ("12", [("MFR", "81206")])])
    result = parse_partmark(text)
    assert isinstance(result, Malformed) and result.errors[0].rule == "element.conflict"


def test_bytes_must_be_ascii():
    result = parse_partmark("MFR 81205*SER É1".encode())
    assert isinstance(result, Malformed) and result.errors[0].rule == "encoding"
    mark = parse_partmark(b"MFR 81205*SER 1")
    assert isinstance(mark, PartMark) and mark.serial == "1"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["[)>", RS, GS, EOT, "06", "12", "DD", "17V", "MFR ", "SER ", "*", " ", "]d1",
                                 "81205", "A", "1", "\r\n", "\x00", "é"]), max_size=25).map("".join))
def test_hostile_scans_give_a_mark_or_field_errors_never_an_exception(scan):
    result = parse_partmark(scan)
    assert isinstance(result, PartMark | Malformed)
    if isinstance(result, Malformed):
        assert result.errors and all(e.path.startswith("$") and e.rule for e in result.errors)
    elif not result.framing_lost:
        assert result.envelope_formats
