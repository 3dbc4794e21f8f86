"""Open Protocol codec: header and field round trips for every MID revision we speak, the frame
splitter under arbitrary chunking, lying length headers, and the torque_event mapping."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.torque.codec import (
    HEADER_LEN,
    DecodeError,
    FrameSplitter,
    FramingError,
    Header,
    Kind,
    decode_header,
    encode_frame,
    encode_header,
    split_frame,
)
from services.torque.mids import BODIES, LAYOUTS, Body, CommandError, TighteningResult, ToolData, decode, encode
from services.torque.results import MappingError, last_calibration_date, to_torque_fields
from shared.contract.scalars import Quantity, parse_quantity

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def text_of(width: int) -> st.SearchStrategy[str]:
    """Field text as a controller sends it: printable ASCII, no trailing blank (padding)."""
    return st.text(PRINTABLE, max_size=width).filter(lambda s: not s.endswith(" "))


def revisions() -> list[tuple[int, int]]:
    cases = [(mid, rev) for mid, by_rev in LAYOUTS.items() for rev in by_rev]
    return cases + [(mid, 1) for mid in BODIES if mid not in LAYOUTS]


@st.composite
def bodies(draw, mid: int, revision: int) -> Body:
    values: dict[str, object] = {}
    for field in LAYOUTS.get(mid, {}).get(revision, ()):
        values[field.name] = (draw(st.integers(0, 10**field.width - 1)) if field.kind is Kind.NUM
                              else draw(text_of(field.width)))
    if mid != CommandError.MID:
        values["extra"] = draw(st.text(PRINTABLE, max_size=30))
    return BODIES[mid](**values)


@pytest.mark.parametrize(("mid", "revision"), revisions())
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_supported_mid_round_trips(mid, revision, data):
    body = data.draw(bodies(mid, revision))
    no_ack = data.draw(st.booleans())
    frame = encode(body, revision, no_ack=no_ack)
    assert frame.endswith(b"\x00") and int(frame[:4]) == len(frame) - 1
    message = decode(frame[:-1])
    assert message.body == body
    assert message.header.mid == mid and message.header.revision == revision and message.header.no_ack is no_ack
    assert message.raw == frame[:-1].decode("ascii")


def test_mid_0061_revision_1_is_231_bytes_and_revision_2_is_385():
    """Lengths the user guide states, from the widths of the layout tables."""
    result = decode(encode(sample_result(), 1)[:-1]).body
    assert isinstance(result, TighteningResult)
    assert len(encode(result, 1)) - 1 == 231
    assert len(encode(sample_result(), 2)) - 1 == 385


optional = st.one_of(st.none(), st.integers(0, 99))


@given(mid=st.integers(0, 9999), revision=st.integers(1, 999), no_ack=st.booleans(), station=optional,
       spindle=optional, sequence=optional, parts=st.one_of(st.none(), st.integers(0, 9)),
       part=st.one_of(st.none(), st.integers(0, 9)), data_len=st.integers(0, 9999 - HEADER_LEN))
def test_header_round_trips(mid, revision, no_ack, station, spindle, sequence, parts, part, data_len):
    header = Header(mid=mid, revision=revision, no_ack=no_ack, station=station, spindle=spindle,
                    sequence=sequence, parts=parts, part=part)
    text = encode_header(header, data_len)
    assert len(text) == HEADER_LEN and int(text[:4]) == HEADER_LEN + data_len
    assert decode_header(text) == header


@pytest.mark.parametrize("revision_field", ["   ", "000", "001"])
def test_blank_or_zero_revision_means_revision_1(revision_field):
    assert decode_header("00209999" + revision_field + " " + " " * 8).revision == 1


def frames_strategy() -> st.SearchStrategy[list[bytes]]:
    """Frames with arbitrary printable data, including text that looks like headers and NUL-free
    look-alikes of terminators and lengths."""
    tricky = st.sampled_from(["0020999900100000000000", "9999", "0000", "\\x00", "00", " " * 40, "0061001"])
    data = st.lists(st.one_of(tricky, st.text(PRINTABLE, max_size=60)), max_size=6).map("".join)
    header = st.builds(Header, mid=st.integers(0, 9999), revision=st.integers(1, 999), no_ack=st.booleans())
    return st.lists(st.builds(encode_frame, header, data), min_size=1, max_size=8)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@settings(max_examples=300)
@given(frames=frames_strategy(), cuts=st.lists(st.integers(0, 10**6), max_size=40))
def test_splitter_yields_the_frames_under_any_chunking(frames, cuts):
    splitter = FrameSplitter()
    out: list[bytes] = []
    for chunk in chunked(b"".join(frames), cuts):
        out.extend(splitter.feed(chunk))
    splitter.finish()
    assert out == [f[:-1] for f in frames]
    assert [split_frame(f)[1] for f in out] == [f[HEADER_LEN:-1].decode() for f in frames]


@settings(max_examples=300)
@given(frames=frames_strategy(), data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=20))
def test_a_lying_length_header_is_refused_never_waited_on(frames, data, cuts):
    liar = data.draw(st.integers(0, len(frames) - 1))
    true_length = len(frames[liar]) - 1
    lie = data.draw(st.integers(0, 9999).filter(lambda n: n != true_length))
    frames[liar] = str(lie).zfill(4).encode() + frames[liar][4:]
    splitter = FrameSplitter()
    out: list[bytes] = []
    with pytest.raises(FramingError):
        for chunk in chunked(b"".join(frames), cuts):
            for frame in splitter.feed(chunk):
                out.append(frame)
        splitter.finish()
    assert out == [f[:-1] for f in frames[:liar]]


@pytest.mark.parametrize(("stream", "reason"), [
    (b"00x0000100100000000000\x00", "not 4 ASCII digits"),
    (b"0019000100100000000\x00", "shorter than the 20-byte header"),
    (b"0025000100100000000000ABCD\x00", "not the NUL terminator"),
    (b"0030000100100000000000AB\x00", "the length header lies"),
])
def test_framing_errors_say_what_was_wrong(stream, reason):
    with pytest.raises(FramingError, match=reason):
        list(FrameSplitter().feed(stream))


def test_a_stream_that_ends_inside_a_frame_is_truncated():
    splitter = FrameSplitter()
    assert list(splitter.feed(b"00240001001")) == []
    with pytest.raises(FramingError, match="stream ended inside a telegram"):
        splitter.finish()


def test_a_wrong_parameter_id_is_a_decode_error_naming_the_field():
    frame = encode(sample_result(), 2)[:-1].replace(b"41" + b"0000000042", b"99" + b"0000000042")
    with pytest.raises(DecodeError, match="tightening_id: expected parameter id 41"):
        decode(frame)


def test_unsupported_revision_and_mid_are_decode_errors():
    with pytest.raises(DecodeError, match="revision 8 is not supported"):
        decode(encode(sample_result(), 7)[:-1].replace(b"0061007", b"0061008", 1))
    with pytest.raises(DecodeError, match="MID 0070 is not supported"):
        decode(encode_frame(Header(mid=70))[:-1])


def sample_result(**changes) -> TighteningResult:
    base = dict(
        cell_id=1, channel_id=1, controller_name="PF6000-HANGAR2", identifier="WO-2026-0042", job_id=1,
        parameter_set_id=3, batch_size=4, batch_counter=1, tightening_status=1, torque_status=1, angle_status=1,
        torque_min=2200, torque_max=2700, torque_target=2450, torque=2455, angle_min=90, angle_max=360,
        angle_target=180, angle=182, timestamp="2026-01-20:14:30:05", parameter_set_changed="2026-01-10:07:30:00",
        batch_status=0, tightening_id=42, strategy=1, strategy_options=0, rundown_angle_status=1,
        current_monitoring_status=1, selftap_status=1, prevail_torque_monitoring_status=1,
        prevail_torque_compensate_status=1, tightening_error_status=0, rundown_angle_min=0, rundown_angle_max=999,
        rundown_angle=540, current_monitoring_min=0, current_monitoring_max=999, current_monitoring_value=250,
        selftap_min=0, selftap_max=0, selftap_torque=0, prevail_torque_monitoring_min=0,
        prevail_torque_monitoring_max=0, prevail_torque=0, job_sequence_number=1, sync_tightening_id=0,
        tool_serial_number="B0742134", parameter_set_name="WHEEL NUT M14", torque_unit=1, result_type=1,
        identifier_part2="", identifier_part3="", identifier_part4="", customer_error_code="",
        prevail_torque_compensate_value=0, tightening_error_status2=0, compensated_angle="0000000",
        final_angle_decimal="0018200")
    base.update(changes)
    return TighteningResult(**base)  # type: ignore[arg-type]


@given(centi=st.integers(0, 999_999))
def test_torque_is_exact_hundredths_of_a_newton_metre(centi):
    fields = to_torque_fields(sample_result(torque=centi, torque_min=0, torque_max=centi), "UTC")
    assert fields.torque_nm * 100 == centi and fields.torque_max_nm == fields.torque_nm
    assert isinstance(fields.torque_nm, Quantity) and "E" not in str(fields.torque_nm)
    assert parse_quantity(Decimal(str(fields.torque_nm))) == fields.torque_nm  # the contract's canonical form


@pytest.mark.parametrize("revision", range(1, 8))
def test_every_revision_maps_to_the_same_torque_event_fields(revision):
    result = decode(encode(sample_result(), revision)[:-1]).body
    assert isinstance(result, TighteningResult)
    fields = to_torque_fields(result, "Europe/Berlin")
    assert fields.torque_nm == Decimal("24.55") and fields.torque_min_nm == Decimal(22)
    assert fields.torque_max_nm == Decimal(27) and fields.angle_deg == 182
    assert fields.result == "OK" and fields.tightening_id == 42 and fields.identifier == "WO-2026-0042"
    assert fields.occurred_at == datetime(2026, 1, 20, 13, 30, 5, tzinfo=UTC)  # CET = UTC+1
    assert fields.tool_serial_number == (None if revision == 1 else "B0742134")


def test_the_zone_comes_from_the_controller_configuration():
    summer = sample_result(timestamp="2026-07-01:12:00:00")
    assert to_torque_fields(summer, "Europe/Berlin").occurred_at == datetime(2026, 7, 1, 10, tzinfo=UTC)
    assert to_torque_fields(summer, "America/Chicago").occurred_at == datetime(2026, 7, 1, 17, tzinfo=UTC)
    assert to_torque_fields(summer, "UTC").occurred_at == datetime(2026, 7, 1, 12, tzinfo=UTC)


def test_clock_changes_gap_refused_overlap_flagged():
    with pytest.raises(MappingError, match="does not exist in Europe/Berlin"):
        to_torque_fields(sample_result(timestamp="2026-03-29:02:30:00"), "Europe/Berlin")
    fields = to_torque_fields(sample_result(timestamp="2026-10-25:02:30:00"), "Europe/Berlin")
    assert fields.ambiguous_time and fields.occurred_at == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert not to_torque_fields(sample_result(), "Europe/Berlin").ambiguous_time


@pytest.mark.parametrize(("changes", "zone", "reason"), [
    ({}, "Mars/Olympus", "not an IANA time zone"),
    ({"timestamp": "2026-01-20 14:30:05"}, "UTC", "is not YYYY-MM-DD:HH:MM:SS"),
    ({"timestamp": "2026-02-30:14:30:05"}, "UTC", "day is out of range"),
    ({"torque_unit": 2}, "UTC", "torque unit lbf.ft is not N·m"),
    ({"tightening_status": 5}, "UTC", "neither 0"),
])
def test_unmappable_results_say_why(changes, zone, reason):
    with pytest.raises(MappingError, match=reason):
        to_torque_fields(sample_result(**changes), zone)


def test_newton_centimetres_convert_exactly_and_nok_maps():
    fields = to_torque_fields(sample_result(torque_unit=8, torque=2455, tightening_status=0), "UTC")
    assert fields.torque_nm == Decimal("0.2455") and fields.result == "NOK"


def test_last_calibration_date_is_the_controllers_local_day():
    tool = ToolData(tool_serial_number="B0742134", tightenings=10, last_calibration="2026-01-15:00:30:00",
                    controller_serial_number="C1234567")
    assert last_calibration_date(tool, "Europe/Berlin") == date(2026, 1, 15)
