"""Zebra IoT Connector and Impinj IoT device interface events, and the read window."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.devices.dedupe import ReadWindow
from services.devices.epc import encode_adi_var
from services.devices.malformed import MAX_PAYLOAD, Malformed
from services.devices.profiles.impinj_r700.parser import parse_impinj
from services.devices.profiles.zebra_iot_connector.parser import parse_zebra
from services.devices.rfid import TagRead, TagReads, parse_reader_time

VECTORS = Path(__file__).parents[1] / "vectors" / "devices"
ZEBRA = json.loads((VECTORS / "zebra_iotc.json").read_text())["vectors"]
IMPINJ = json.loads((VECTORS / "impinj_iot.json").read_text())["vectors"]


def _view(read: TagRead, keys) -> dict:
    view = {"epc_hex": read.epc_hex, "antenna": read.antenna, "reads": read.reads, "read_at": read.read_at,
            "rssi_dbm": None if read.rssi_dbm is None else str(read.rssi_dbm), "epc_scheme": read.epc_scheme,
            "cage": read.part and read.part.cage, "part_number": read.part and read.part.part_number,
            "serial": read.part and read.part.serial, "tid_hex": read.tid_hex, "user_hex": read.user_hex,
            "reader_id": read.reader_id}
    return {k: view[k] for k in keys}


@pytest.mark.parametrize("vector", ZEBRA, ids=[v["name"] for v in ZEBRA])
def test_zebra_vectors(vector):
    result = parse_zebra(json.dumps(vector["payload"]).encode())
    assert isinstance(result, TagReads), result
    assert [_view(r, e) for r, e in zip(result.reads, vector["expect"], strict=True)] == vector["expect"]
    assert all(r.reader_kind == "zebra_iotc" and r.reader_id is None for r in result.reads)


@pytest.mark.parametrize("vector", IMPINJ, ids=[v["name"] for v in IMPINJ])
def test_impinj_vectors(vector):
    result = parse_impinj(json.dumps(vector["payload"]).encode())
    assert isinstance(result, TagReads), result
    assert result.skipped == vector["skipped"]
    assert [_view(r, e) for r, e in zip(result.reads, vector["expect"], strict=True)] == vector["expect"]
    assert all(r.reader_kind == "impinj_iot" for r in result.reads)


def test_tag_read_crosses_a_process_boundary_unchanged():
    result = parse_zebra(json.dumps(ZEBRA[0]["payload"]).encode())
    assert isinstance(result, TagReads)
    wire = msgspec.json.encode(result)
    assert msgspec.json.decode(wire, type=TagReads) == result
    assert b"-61" in wire and b'"rssi_dbm":-61.' not in wire


@pytest.mark.parametrize("text, utc", [
    ("2021-03-01T10:15:30.125-0600", "2021-03-01T16:15:30.125"),
    ("2021-03-01T10:15:30-06:00", "2021-03-01T16:15:30"),
    ("2025-05-17T16:03:13.944189383Z", "2025-05-17T16:03:13.944189"),
    ("2021-03-01T00:30:00+0100", "2021-02-28T23:30:00"),
])
def test_reader_time_keeps_the_offset(text, utc):
    moment = parse_reader_time(text)
    assert moment is not None
    assert moment.astimezone().utctimetuple()[:6] == parse_reader_time(utc + "Z").utctimetuple()[:6]


@pytest.mark.parametrize("text", ["2021-03-01T10:15:30", "2021-03-01 10:15:30Z", "2021-13-01T10:15:30Z",
                                  "2021-03-01T10:15:30+2500", "yesterday", ""])
def test_reader_time_without_a_usable_offset_is_refused(text):
    assert parse_reader_time(text) is None


def _zebra(**data) -> bytes:
    body = {"idHex": "E2801191A5030065F26CCBFF", "antenna": 1, "peakRssi": -50, **data}
    return json.dumps({"data": body, "timestamp": "2021-03-01T10:15:30.125-0600", "type": "SIMPLE"}).encode()


@pytest.mark.parametrize("payload, path, rule", [
    (b"not json", "$", "json"),
    (b'"a string"', "$", "type"),
    (b"[1]", "$[0]", "type"),
    (b'{"timestamp": "2021-03-01T10:15:30Z"}', "$.data", "required"),
    (b'{"data": {"idHex": "AB"}}', "$.timestamp", "required"),
    (b'{"data": {"idHex": "AB"}, "timestamp": "2021-03-01T10:15:30"}', "$.timestamp", "timestamp"),
    (_zebra(idHex="XYZ"), "$.data.idHex", "hex"),
    (_zebra(idHex="ABC"), "$.data.idHex", "hex"),
    (_zebra(idHex="AB" * 63), "$.data.idHex", "hex"),
    (_zebra(antenna=True), "$.data.antenna", "range"),
    (_zebra(antenna=0), "$.data.antenna", "range"),
    (_zebra(peakRssi="-50"), "$.data.peakRssi", "range"),
    (_zebra(peakRssi=-999), "$.data.peakRssi", "range"),
    (_zebra(format="tid"), "$.data.format", "zebra.format"),
    (_zebra(USER="zz"), "$.data.USER", "hex"),
    (b"[" + b",".join([_zebra()] * 1001) + b"]", "$", "events.count"),
    (b" " * (MAX_PAYLOAD + 1), "$", "payload.size"),
])
def test_malformed_zebra_events_name_path_and_rule(payload, path, rule):
    result = parse_zebra(payload)
    assert isinstance(result, Malformed)
    assert (path, rule) in {(e.path, e.rule) for e in result.errors}
    report = result.report(received_at="2021-03-01T16:15:30.125Z", raw=payload)
    assert report["stage"] == "devices.zebra" and report["errors"][0]["path"]


def test_one_bad_event_refuses_the_whole_batch():
    good = json.loads(_zebra())
    result = parse_zebra(json.dumps([good, {**good, "timestamp": "never"}, good]).encode())
    assert isinstance(result, Malformed)
    assert [e.path for e in result.errors] == ["$[1].timestamp"]


def _impinj(**tag) -> bytes:
    event = {"epcHex": "E2801191A5030065F26CCBFF", "antennaPort": 1, "peakRssiCdbm": -5000, **tag}
    return json.dumps({"timestamp": "2023-01-01T00:00:00Z", "hostname": "r700", "eventType": "tagInventory",
                       "tagInventoryEvent": event}).encode()


@pytest.mark.parametrize("payload, path, rule", [
    (_impinj(epcHex="E28G"), "$.tagInventoryEvent.epcHex", "hex"),
    (_impinj(epc="***"), "$.tagInventoryEvent.epc", "base64"),
    (_impinj(epc=base64.b64encode(b"\x01\x02").decode()), "$.tagInventoryEvent.epc", "impinj.mismatch"),
    (json.dumps({"timestamp": "2023-01-01T00:00:00Z", "tagInventoryEvent": {"antennaPort": 1}}).encode(),
     "$.tagInventoryEvent.epcHex", "required"),
    (json.dumps({"timestamp": "2023-01-01T00:00:00Z", "eventType": "tagInventory"}).encode(),
     "$.tagInventoryEvent", "required"),
    (_impinj(peakRssiCdbm=-53.5), "$.tagInventoryEvent.peakRssiCdbm", "range"),
    (_impinj(antennaPort="1"), "$.tagInventoryEvent.antennaPort", "range"),
    (_impinj(tidHex=7), "$.tagInventoryEvent.tidHex", "type"),
])
def test_malformed_impinj_events_name_path_and_rule(payload, path, rule):
    result = parse_impinj(payload)
    assert isinstance(result, Malformed)
    assert (path, rule) in {(e.path, e.rule) for e in result.errors}


def test_impinj_other_events_are_skipped_not_refused():
    events = [{"timestamp": "2023-01-01T00:00:00Z", "eventType": kind, "x": {}} for kind in ("gpi", "keepalive")]
    result = parse_impinj(json.dumps(events).encode())
    assert result == TagReads(reads=[], skipped=2)


def test_a_malformed_adi_var_epc_is_kept_raw_with_its_errors():
    broken = encode_adi_var(3, "35962", "PQ7VZ4", "M37GXB92")[:-4] + "0001"
    result = parse_zebra(_zebra(idHex=broken))
    assert isinstance(result, TagReads)
    read = result.reads[0]
    assert (read.epc_hex, read.epc_scheme, read.part) == (broken, "adi-var", None)
    assert [e.rule for e in read.part_errors] == ["adi_var.padding"]


def test_impinj_centi_dbm_becomes_exact_dbm():
    result = parse_impinj(_impinj(peakRssiCdbm=-5325))
    assert isinstance(result, TagReads)
    assert result.reads[0].rssi_dbm == Decimal("-53.25")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["E2801191A5030065F26CCBFF", "2021-03-01T10:15:30.125-0600", "epc", "tagInventory", "4oAR"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["data", "idHex", "timestamp", "antenna", "peakRssi", "TID", "USER", "format",
                         "tagInventoryEvent", "epc", "epcHex", "tidHex", "antennaPort", "peakRssiCdbm",
                         "eventType", "hostname", "type", "reads"]) | st.text(max_size=6), inner, max_size=5),
    max_leaves=15,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_hostile_json_gives_reads_or_field_errors_never_an_exception(document):
    payload = json.dumps(document).encode()
    for parse in (parse_zebra, parse_impinj):
        result = parse(payload)
        assert isinstance(result, TagReads | Malformed)
        if isinstance(result, Malformed):
            assert result.errors and all(e.path.startswith("$") and e.rule for e in result.errors)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_never_raise(payload):
    assert isinstance(parse_zebra(payload), TagReads | Malformed)
    assert isinstance(parse_impinj(payload), TagReads | Malformed)


def test_deeply_nested_json_is_refused_not_raised():
    payload = b"[" * 100000 + b"]" * 100000
    assert isinstance(parse_zebra(payload), Malformed)


# ---------------------------------------------------------------- read window

def test_window_emits_once_per_window_per_reader_and_tag():
    window = ReadWindow(5.0)
    assert window.admit("r1", "aa01", 0.0)
    assert not window.admit("r1", "AA01", 4.9)
    assert window.admit("r2", "AA01", 4.9)
    assert window.admit("r1", "AA02", 4.9)
    assert window.admit("r1", "AA01", 5.0)


def test_window_forgets_what_is_older_than_the_window():
    window = ReadWindow(1.0)
    for i in range(1000):
        window.admit("r1", f"{i:04X}", i * 0.01)
    assert len(window) <= 101


def test_a_reader_clock_stepping_back_does_not_reopen_the_window():
    window = ReadWindow(5.0)
    assert window.admit("r1", "AA01", 100.0)
    assert not window.admit("r1", "AA01", 50.0)
    assert not window.admit("r1", "AA01", 104.0)


reads = st.lists(st.tuples(st.sampled_from(["r1", "r2"]), st.sampled_from([f"{i:02X}" for i in range(12)]),
                           st.floats(0, 3, allow_nan=False)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(reads, st.floats(0.5, 10), st.integers(1, 40))
def test_window_never_emits_a_tag_twice_within_the_window_and_stays_bounded(steps, window_s, cap):
    window = ReadWindow(window_s, max_entries=cap)
    now = 0.0
    emitted: dict[tuple[str, str], float] = {}
    distinct = 2 * 12
    for reader, epc, gap in steps:
        now += gap
        if window.admit(reader, epc, now):
            last = emitted.get((reader, epc))
            if cap >= distinct:
                assert last is None or now - last >= window_s
            emitted[(reader, epc)] = now
        else:
            assert now - emitted[(reader, epc)] < window_s
        assert len(window) <= cap


def test_read_window_admits_the_emitted_read_again_but_not_another_within_the_window():
    window = ReadWindow(5.0)
    assert window.admit("r1", "AA01", 0.0, "read-1")
    assert window.admit("r1", "AA01", 1.0, "read-1")  # the same read, processed again (a retried batch)
    assert not window.admit("r1", "AA01", 1.0, "read-2")
    assert not window.admit("r1", "AA01", 1.0)
