"""Device profiles (services/devices/profiles): the one registry, and each profile's simulator ->
parser -> mapping round trip, down to the contract decoder and the raw payload's SHA-256 in the
record's notes. Hypothesis drives the vendor encoders against the parsers."""

from __future__ import annotations

import hashlib
import json
import random
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.devices.epc import ADI_ALPHABET
from services.devices.malformed import Malformed
from services.devices.profiles import base
from services.devices.profiles.impinj_r700 import simulator as impinj
from services.devices.profiles.impinj_r700.parser import parse_impinj
from services.devices.profiles.open_protocol import simulator as controller
from services.devices.profiles.open_protocol.mapping import telegram_bytes
from services.devices.profiles.partmark_15434 import simulator as scanner
from services.devices.profiles.partmark_15434.parser import parse_partmark
from services.devices.profiles.registry import CONTRACT_KIND, DEVICE_ROLE, PROFILES, profile_of_kind
from services.devices.profiles.zebra_iot_connector import simulator as zebra
from services.devices.profiles.zebra_iot_connector.parser import parse_zebra
from services.devices.rfid import TagReads
from services.ingest import sessions as book
from services.torque.telegram import ToolCalibration, tightening_of
from shared.contract import decode_record
from shared.runtime.config import PlaceConfig
from shared.runtime.topics import BRIDGED_DEVICE_KINDS, DEVICE_KINDS, RAW_DEVICE_KINDS

PROFILES_DIR = Path(base.__file__).parent
STATION = "HGR1"
NOW = "2026-12-06T04:00:00.000Z"
PLACES = {"BAY1": PlaceConfig(readers=["RD-1"], scanners=["SC-1"], controllers=["TQ-1"])}
RAW_NOTE = re.compile(r"raw sha256 ([0-9a-f]{64}) \((\w+) (event|scan)\)")
TELEGRAM_NOTE = re.compile(r"telegram SHA-256 ([0-9a-f]{64})")

cages = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=5, max_size=5)
part_numbers = st.text(sorted(ADI_ALPHABET), min_size=1, max_size=32)
serials = st.text(sorted(ADI_ALPHABET), min_size=1, max_size=30)
as_json = msgspec.json.Encoder(decimal_format="number").encode  # quantities as JSON numbers, as devices send
moments = st.datetimes(datetime(2020, 1, 1), datetime(2035, 1, 1), timezones=st.just(UTC))


def session(action: str = "receive"):
    command = {"command": "open", "id": f"c-{action}", "operator": "tester", "place": "BAY1",
               "work_order_id": "WO-1001", "aircraft": {"registration": "N327HA", "serial_number": "4521"},
               "ata": "32", "technician": {"cert_no": "3512874", "cert_kind": "FAA-AP"}, "part_action": action}
    if action == "remove":
        command["removal_reason"] = "SCHEDULED"
    return book.opened_entry(command, station=STATION, places=PLACES, at=NOW, operator="tester")


# --- the registry ------------------------------------------------------------------------------


def test_every_profile_folder_is_in_the_registry_under_its_folder_name() -> None:
    folders = {p.name for p in PROFILES_DIR.iterdir() if (p / "profile.py").exists()}
    assert folders == set(PROFILES) and len(folders) == 4
    for name, profile in PROFILES.items():
        assert profile.name == name
        for part in ("parser.py", "simulator.py", "mapping.py"):
            assert (PROFILES_DIR / name / part).exists(), (name, part)


def test_the_registry_covers_exactly_the_topic_kinds_of_raw_and_bridged_devices() -> None:
    registered = {p.device_kind for p in PROFILES.values() if p.registered}
    bridged = {p.device_kind for p in PROFILES.values() if not p.registered}
    assert registered == set(RAW_DEVICE_KINDS) and bridged == set(BRIDGED_DEVICE_KINDS)
    assert set(CONTRACT_KIND.values()) <= set(DEVICE_KINDS)
    assert set(DEVICE_ROLE.values()) <= set(PlaceConfig.__struct_fields__)
    assert profile_of_kind("rfid_zebra").name == "zebra_iot_connector"
    with pytest.raises(KeyError):
        profile_of_kind("rfid_reader")  # a contract kind has no profile


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_each_profile_simulates_what_its_parser_reads_and_maps_to_a_valid_record(name: str) -> None:
    profile = PROFILES[name]
    device_id = {"readers": "RD-1", "scanners": "SC-1", "controllers": "TQ-1"}[profile.role]
    assert book.place_of(PLACES, profile.device_kind, device_id) == "BAY1"
    rng = random.Random(11)
    for _ in range(20):
        payload = profile.simulate(rng)
        reads = profile.reads(device_id, payload, NOW)
        assert isinstance(reads, list) and reads, (name, reads)
        for read in reads:
            assert read.problem is None and read.device_kind == profile.device_kind
            body = profile.record(session(), read)
            record = decode_record(as_json(body), station=STATION,
                                   device_kind=profile.contract_kind, device_id=device_id)
            assert record.event_id == body["event_id"]
            if name == "open_protocol":
                telegram = json.loads(payload)["telegram"]
                [named] = TELEGRAM_NOTE.findall(record.notes)
                assert named == read.raw_sha256 == hashlib.sha256(telegram_bytes(telegram)).hexdigest()
            else:
                [(named, profile_name, _)] = RAW_NOTE.findall(record.notes)
                assert named == read.raw_sha256 == hashlib.sha256(payload).hexdigest() and profile_name == name
                assert (record.part.cage, record.part.part_number, record.part.serial_number) == (
                    read.cage, read.part_number, read.serial)


def test_a_zebra_array_is_one_payload_whose_hash_every_record_names() -> None:
    at = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)
    payload = zebra.payload([zebra.part_event("35962", "PQ7VZ4", f"SER{i}", at + timedelta(seconds=i))
                             for i in range(3)])
    reads = PROFILES["zebra_iot_connector"].reads("RD-1", payload, NOW)
    assert isinstance(reads, list) and len(reads) == 3
    notes = {PROFILES["zebra_iot_connector"].record(session(), r)["notes"] for r in reads}
    assert notes == {f"raw sha256 {hashlib.sha256(payload).hexdigest()} (zebra_iot_connector event)"}


def test_a_read_kept_before_raw_bytes_were_kept_makes_a_record_without_the_note() -> None:
    [read] = PROFILES["partmark_15434"].reads("SC-1", scanner.scan("0CVA5", "4202435-01", "674A36458"), NOW)
    old = base.RawRead(**{f: getattr(read, f) for f in read.__struct_fields__ if f != "raw_sha256"})
    assert "notes" not in PROFILES["partmark_15434"].record(session(), old)


# --- vendor encoders against the parsers (hypothesis) ------------------------------------------


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.tuples(cages, part_numbers, serials), min_size=1, max_size=4), at=moments,
       antenna=st.one_of(st.none(), st.integers(1, 255)), rssi=st.one_of(st.none(), st.integers(-200, 50)),
       reads=st.one_of(st.none(), st.integers(0, 2**31 - 1)), offset=st.integers(-12 * 60, 14 * 60),
       array=st.booleans())
def test_zebra_events_round_trip(parts, at, antenna, rssi, reads, offset, array) -> None:
    if not array:
        parts = parts[:1]
    events = [zebra.part_event(*p, at, antenna=antenna, peak_rssi=rssi, reads=reads, event_num=i,
                               offset_minutes=offset) for i, p in enumerate(parts)]
    parsed = parse_zebra(zebra.payload(events, array=array))
    assert isinstance(parsed, TagReads), parsed
    assert [(r.part.cage, r.part.part_number, r.part.serial) for r in parsed.reads if r.part] == parts
    for read in parsed.reads:
        assert read.reader_kind == "zebra_iotc" and read.epc_scheme == "adi-var" and not read.part_errors
        assert read.read_at == at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
        assert (read.antenna, read.reads) == (antenna, reads)
        assert read.rssi_dbm == (None if rssi is None else Decimal(rssi))


@settings(max_examples=150, deadline=None)
@given(part=st.tuples(cages, part_numbers, serials), at=moments, antenna=st.one_of(st.none(), st.integers(1, 255)),
       rssi=st.one_of(st.none(), st.integers(-20000, 5000)), epc_as=st.sampled_from(["base64", "hex", "both"]),
       tid=st.one_of(st.none(), st.binary(min_size=1, max_size=12).map(lambda b: b.hex().upper())),
       status_first=st.booleans())
def test_impinj_events_round_trip(part, at, antenna, rssi, epc_as, tid, status_first) -> None:
    events = [impinj.part_event(*part, at, antenna_port=antenna, peak_rssi_cdbm=rssi, tid_hex=tid, epc_as=epc_as)]
    if status_first:
        events.insert(0, impinj.status_event(at))
    parsed = parse_impinj(impinj.payload(events, array=status_first))
    assert isinstance(parsed, TagReads), parsed
    [read] = parsed.reads
    assert parsed.skipped == int(status_first)
    assert read.part is not None and (read.part.cage, read.part.part_number, read.part.serial) == part
    assert read.reader_id == "impinj-14-2b-3c" and read.tid_hex == tid and read.antenna == antenna
    assert read.rssi_dbm == (None if rssi is None else Decimal(rssi) / 100)
    assert read.read_at == at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


@settings(max_examples=200, deadline=None)
@given(part=st.tuples(cages, part_numbers, serials), fmt=st.sampled_from(sorted(scanner.IDENTIFIERS)),
       aim=st.sampled_from([None, "]d1", "]Q1", "]C0"]), suffix=st.sampled_from(["", "\r\n", "\r"]))
def test_partmark_envelopes_round_trip_with_and_without_aim_prefix(part, fmt, aim, suffix) -> None:
    raw = scanner.scan(*part, fmt=fmt, aim=aim, suffix=suffix)
    mark = parse_partmark(raw)
    assert not isinstance(mark, Malformed), mark
    assert (mark.cage, mark.part_number, mark.serial) == part
    assert mark.envelope_formats == [fmt] and mark.symbology == aim and not mark.framing_lost
    assert mark.raw == raw.decode()


@settings(max_examples=60, deadline=None)
@given(tightening_id=st.integers(1, 65535), torque_centi=st.integers(0, 99999), angle=st.integers(0, 99999),
       revision=st.integers(1, 7), zone=st.sampled_from(["UTC", "Europe/Berlin", "America/Chicago"]),
       at=st.datetimes(datetime(2024, 1, 1), datetime(2030, 1, 1), timezones=st.just(UTC)),
       identifier=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", max_size=25))
def test_open_protocol_results_round_trip_to_a_torque_read(tightening_id, torque_centi, angle, revision, zone,
                                                           at, identifier) -> None:
    torque = Decimal(torque_centi) / 100
    result = controller.tightening_result(tightening_id, zone=ZoneInfo(zone), torque_nm=torque, angle_deg=angle,
                                          identifier=identifier, at=at.replace(microsecond=0))
    telegram = controller.telegram(result, revision)
    back = tightening_of(telegram)
    assert back is not None and back.tightening_id == tightening_id and back.torque == torque_centi
    assert back.timestamp == result.timestamp and back.identifier.strip() == identifier
    tool = ToolCalibration(serial_number="B0742134", last_calibration=at.date(), calibration_due=at.date())
    payload = controller.op_result(telegram, zone=zone, tool=tool if revision >= 2 else None, received_at=NOW)
    reads = PROFILES["open_protocol"].reads("TQ-1", payload, NOW)
    assert isinstance(reads, list), reads
    [read] = reads
    assert read.raw_sha256 == hashlib.sha256(telegram.encode()).hexdigest()
    assert read.occurred_at == at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert read.source.tightening_id == tightening_id  # type: ignore[union-attr]


# --- mro-edge devices add --profile ---------------------------------------------------------------


def test_devices_add_takes_a_profile_and_says_which_exist(tmp_path, monkeypatch, capsys) -> None:
    from mro_edge.cli import main

    monkeypatch.setenv("MRO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MRO_STATION", STATION)
    monkeypatch.setenv("MRO_MQTT_URL", "mqtt://127.0.0.1:1")
    with pytest.raises(SystemExit):
        main(["devices", "add", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(f"{p.name} ({p.device_kind}:" in help_text for p in PROFILES.values() if p.registered)
    assert main(["devices", "add", "ZB-9", "--profile", "zebra_iot_connector", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["publishes_to"] == f"mro/{STATION}/in/rfid_zebra/ZB-9"
    assert main(["devices", "add", "SC-9", "--kind", "partmark_scanner", "--json"]) == 0  # --kind still works
    assert json.loads(capsys.readouterr().out)["publishes_to"].endswith("/in/partmark_scanner/SC-9")
    assert main(["devices", "add", "X-1", "--profile", "zebra"]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'zebra'" in err and all(name in err for name in PROFILES)
    assert main(["devices", "add", "TQ-9", "--profile", "open_protocol"]) == 2
    assert "[torque.controllers.<id>]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["devices", "add", "X-2", "--profile", "impinj_r700", "--kind", "rfid_impinj"])
