"""Contract versions: delta definitions, their checks, and the dry run's arithmetic."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from mro_edge.simulator.records import valid_record
from shared.compliance import BASE, DefinitionError, compile_version, dry_run
from shared.compliance.versions import read_definition
from shared.contract import decode_record, normalize

T0 = datetime(2024, 5, 20, 14, 30, tzinfo=UTC)


def v2(**rules) -> dict:
    return {"version": "mro.record/2", "title": "test delta", **rules}


def body(record_type="maintenance_action", seed=1, **fields) -> dict:
    import json

    data = valid_record(random.Random(seed), station="HGR1", device_kind="tablet", device_id="T",
                        record_type=record_type, occurred_at=T0)
    for name, value in fields.items():
        if value is ...:
            data.pop(name, None)
        else:
            data[name] = value
    return normalize(decode_record(json.dumps(data).encode(), station="HGR1", device_kind="tablet", device_id="T"))


def rules(version, b):
    return [(e.path, e.rule) for e in version.check(b)]


def test_require():
    version = compile_version(v2(require=[{"field": "aircraft_hours", "types": ["maintenance_action"]}]))
    assert rules(version, body(aircraft_hours=1234.5)) == []
    assert rules(version, body(aircraft_hours=...)) == [("$.aircraft_hours", "schema_required")]
    assert rules(version, body("torque_event")) == []  # other types untouched
    error = version.check(body(aircraft_hours=...))[0]
    assert "mro.record/2" in error.expected


def test_require_nested_field_on_every_type_that_has_it():
    version = compile_version(v2(require=[{"field": "aircraft.type", "types": ["*"]}]))
    assert set(version.checks) == {"maintenance_action", "inspection", "part_removal", "part_installation",
                                   "part_receipt", "torque_event"}
    b = body()
    del b["aircraft"]["type"]
    assert rules(version, b) == [("$.aircraft.type", "schema_required")]


def test_pattern_enum_and_length():
    version = compile_version(v2(
        pattern=[{"field": "work_order_id", "types": ["*"], "regex": "^WO-[0-9]{4}-[0-9]{6}$",
                  "description": "WO-YYYY-NNNNNN"}],
        allow=[{"field": "action", "types": ["maintenance_action"], "values": ["REPAIR", "REPLACE"]}],
        max_length=[{"field": "notes", "types": ["*"], "max": 10}],
    ))
    b = body(work_order_id="WO-2024-000001", action="REPAIR", notes="short")
    assert rules(version, b) == []
    b = body(work_order_id="TLB/123456/1", action="SERVICE", notes="a much longer note")
    assert rules(version, b) == [("$.work_order_id", "schema_pattern"), ("$.action", "schema_enum"),
                                 ("$.notes", "schema_max_length")]
    assert "WO-YYYY-NNNNNN" in version.check(b)[0].expected
    assert "redacted" in version.check(b)[2].received  # free text stays out of reports


@pytest.mark.parametrize(("definition", "message"), [
    ({"title": "x", "require": [{"field": "notes"}]}, "version"),
    (v2(), "no rule"),
    ({"version": "mro.record/1", "title": "x", "require": [{"field": "notes"}]}, "base"),
    ({"version": "record-2", "title": "x", "require": [{"field": "notes"}]}, "mro.record/2"),
    ({"version": "mro.record/2", "require": [{"field": "notes"}]}, "title"),
    (v2(require=[{"field": "colour"}]), "no record type"),
    (v2(require=[{"field": "aircraft_hours", "types": ["torque_event"]}]), "may only tighten"),
    (v2(require=[{"field": "notes", "types": ["engine_run"]}]), "unknown record type"),
    (v2(pattern=[{"field": "aircraft_hours", "types": ["maintenance_action"], "regex": "x"}]), "text fields"),
    (v2(pattern=[{"field": "notes", "regex": "("}]), "does not compile"),
    (v2(allow=[{"field": "action", "types": ["maintenance_action"], "values": ["FIX"]}]), "only narrow"),
    (v2(allow=[{"field": "notes", "values": ["x"]}]), "enumerated"),
    (v2(max_length=[{"field": "notes", "max": -1}]), "integer"),
    (v2(require=[{"field": "notes", "why": "x"}]), "unknown key"),
    ({**v2(require=[{"field": "notes"}]), "loosen": []}, "unknown key"),
])
def test_bad_definitions_are_refused_with_a_reason(definition, message):
    with pytest.raises(DefinitionError, match=message):
        compile_version(definition)


def test_definition_files(tmp_path):
    toml = tmp_path / "v2.toml"
    toml.write_text('version = "mro.record/2"\ntitle = "t"\n[[require]]\nfield = "aircraft.type"\ntypes = ["*"]\n')
    assert compile_version(read_definition(toml)).version == "mro.record/2"
    bad = tmp_path / "v2.json"
    bad.write_text("{not json")
    with pytest.raises(DefinitionError):
        read_definition(bad)
    with pytest.raises(DefinitionError, match="cannot read"):
        read_definition(tmp_path / "missing.toml")


def test_base_version_checks_nothing():
    assert BASE.check(body()) == []
    assert BASE.number == 1


def test_sha256_is_of_the_canonical_definition():
    a = compile_version(v2(require=[{"field": "notes", "types": ["*"]}]))
    b = compile_version({"require": [{"types": ["*"], "field": "notes"}], "title": "test delta",
                         "version": "mro.record/2"})
    assert a.sha256 == b.sha256


def test_dry_run_counts_records_once_per_rule_and_rounds_up():
    version = compile_version(v2(require=[{"field": "aircraft_hours", "types": ["maintenance_action"]},
                                          {"field": "aircraft_cycles", "types": ["maintenance_action"]}]))
    good, bad = body(aircraft_hours=10, aircraft_cycles=5), body(aircraft_hours=..., aircraft_cycles=...)
    report = dry_run(version, [good] * 98 + [bad] * 2, tolerance_ppm=20_000)
    assert (report.sample, report.failed, report.failed_ppm) == (100, 2, 20_000)
    assert report.within_tolerance  # exactly the tolerance is still within it
    assert report.by_rule == {"schema_required": 2}
    assert report.by_field == {"$.aircraft_hours": 2, "$.aircraft_cycles": 2}
    report = dry_run(version, [good] * 97 + [bad] * 3, tolerance_ppm=20_000)
    assert not report.within_tolerance
    report = dry_run(version, [good] * 2999 + [bad] * 61, tolerance_ppm=20_000)  # 1.9935 % -> 19935 ppm
    assert report.within_tolerance and report.failed_ppm == 19_935
    report = dry_run(version, [], tolerance_ppm=20_000)
    assert (report.sample, report.failed_ppm, report.within_tolerance) == (0, 0, True)
    assert "0 of 0" in report.summary()
