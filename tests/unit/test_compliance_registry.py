"""Registries: files, reload without restart, signed updates from the registry authority."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time

import pytest

from shared.compliance import RegistryError, RegistrySource, load_registry
from shared.compliance.esign import simulator_seed
from shared.compliance.registry import merge, read_file_entries
from shared.compliance.settings import DEFAULT_REGISTRIES, compliance_settings
from shared.compliance.updates import UpdateRefused, apply_update, sign_update, verify_update
from shared.ledger.keys import SigningKey
from shared.runtime.config import load_config

AUTHORITY = SigningKey(bytes(range(32)))


def update(serial=1, **changes):
    return {"serial": serial, "issued_at": "2026-11-23T10:00:00Z", "reason": "test", **changes}


def new_tech(cert_no="TEST-900", status="active"):
    key = base64.b64encode(SigningKey(simulator_seed(cert_no)).public_bytes).decode()
    return {"cert_no": cert_no, "status": status, "public_key": key,
            "certificates": [{"kind": "FAA-AP", "issued": "2015-01-01"}],
            "authorisations": [{"chapters": ["*"], "privileges": ["maintain"]}]}


def payload(message: dict) -> bytes:
    return json.dumps(message).encode()


# --- files ---------------------------------------------------------------------------------------

def test_checked_in_registries_load():
    registry = load_registry(DEFAULT_REGISTRIES)
    assert {"3512874", "2847193", "1198305"} <= set(registry.technicians)
    assert registry.technicians["9043377"].public_key is None
    assert registry.aircraft["N771CD"].airworthiness_review_expires.isoformat() == "2023-08-31"
    assert registry.life_limited_parts["D23189000-7"].limit_cycles == 20_000


def test_simulator_fleet_keys_are_the_documented_test_keys():
    registry = load_registry(DEFAULT_REGISTRIES)
    for cert_no, technician in registry.technicians.items():
        if technician.public_key is not None:
            assert technician.public_key == SigningKey(simulator_seed(cert_no)).public_bytes, cert_no


@pytest.fixture
def regdir(tmp_path):
    target = tmp_path / "registries"
    shutil.copytree(DEFAULT_REGISTRIES, target)
    return target


def test_json_registry_files_work_too(regdir):
    entries = read_file_entries(regdir)
    (regdir / "tools.toml").unlink()
    (regdir / "tools.json").write_text(json.dumps({"tool": list(entries["tools"].values())}))
    assert load_registry(regdir).tools.keys() == entries["tools"].keys()


@pytest.mark.parametrize(("text", "message"), [
    ('[[technician]]\ncert_no = "X1"\ncertificates = 3\n', "X1"),
    ('[[technician]]\nname = "no number"\n', "no cert_no"),
    ('[[technician]]\ncert_no = "X123"\n[[technician]]\ncert_no = "X123"\n', "twice"),
    ('[[technician]]\ncert_no = "X123"\npublic_key = "abc"\n', "public_key"),
    ('[[technician]]\ncert_no = "X123"\nauthorisations = [{ chapters = ["99"], privileges = ["maintain"] }]\n',
     "ATA chapter"),
    ('[[technician]\n', "technicians.toml"),
])
def test_broken_registry_files_are_refused(regdir, text, message):
    (regdir / "technicians.toml").write_text(text)
    with pytest.raises(RegistryError, match=message):
        load_registry(regdir)


def test_missing_directory(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "nowhere")


def _touch(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_on_change_without_restart(regdir):
    source = RegistrySource(regdir, check_every_s=0.0)
    first = source.load(None)
    assert source.current(0, lambda: None) == (first, None)  # unchanged: the same object
    path = regdir / "technicians.toml"
    path.write_text(path.read_text().replace('cert_no = "3512874"\nname = "M. Alvarez"\nstatus = "active"',
                                             'cert_no = "3512874"\nname = "M. Alvarez"\nstatus = "suspended"'))
    _touch(path)
    second, error = source.current(0, lambda: None)
    assert error is None and second is not first
    assert second.technicians["3512874"].entry.status == "suspended"


def test_a_broken_edit_keeps_the_previous_registry(regdir):
    source = RegistrySource(regdir, check_every_s=0.0)
    first = source.load(None)
    (regdir / "aircraft.toml").write_text("[[aircraft]\n")
    registry, error = source.current(0, lambda: None)
    assert registry is first and "aircraft.toml" in error


def test_reload_is_checked_at_most_every_interval(regdir):
    source = RegistrySource(regdir, check_every_s=60.0)
    first = source.load(None)
    (regdir / "aircraft.toml").write_text("[[aircraft]\n")
    _touch(regdir / "aircraft.toml")
    started = time.perf_counter()
    for _ in range(10_000):
        assert source.current(0, lambda: None)[0] is first
    assert time.perf_counter() - started < 0.5  # a clock read per call, no stat


def test_overlay_replaces_and_removes(regdir):
    overlay = apply_update(None, update(technicians={"upsert": [new_tech()], "remove": ["3512874"]}))
    registry = load_registry(regdir, overlay)
    assert "TEST-900" in registry.technicians and "3512874" not in registry.technicians
    source = RegistrySource(regdir, check_every_s=0.0)
    source.load(None)
    registry, _ = source.current(1, lambda: overlay)
    assert "TEST-900" in registry.technicians
    assert merge({"tools": {}}, None) == {"tools": {}}


# --- signed updates ------------------------------------------------------------------------------

def test_a_signed_update_verifies():
    message = sign_update(update(technicians={"upsert": [new_tech()]}), AUTHORITY)
    verified = verify_update(payload(message), AUTHORITY.public_bytes, last_serial=0)
    assert verified["technicians"]["upsert"][0]["cert_no"] == "TEST-900"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda m: m.pop("signature"), "no signature"),
    (lambda m: m.update(signature="%%%"), "not base64"),
    (lambda m: m.update(signature=base64.b64encode(b"x" * 64).decode()), "does not verify"),
    (lambda m: m["update"]["technicians"]["upsert"][0].update(status="suspended"), "does not verify"),
    (lambda m: m["update"].update(serial=2), "does not verify"),
    (lambda m: m.update(kid="0123456789abcdef"), "not the configured authority key"),
    (lambda m: m.update(update="x"), "expected"),
])
def test_updates_without_a_valid_authority_signature_are_refused(mutate, message):
    signed = sign_update(update(technicians={"upsert": [new_tech()]}), AUTHORITY)
    mutate(signed)
    with pytest.raises(UpdateRefused, match=message):
        verify_update(payload(signed), AUTHORITY.public_bytes, last_serial=0)


def test_update_signed_by_another_key_is_refused():
    impostor = SigningKey.generate()
    signed = sign_update(update(technicians={"upsert": [new_tech()]}), impostor)
    signed.pop("kid")
    with pytest.raises(UpdateRefused, match="does not verify"):
        verify_update(payload(signed), AUTHORITY.public_bytes, last_serial=0)


def test_no_authority_key_no_update():
    signed = sign_update(update(), AUTHORITY)
    with pytest.raises(UpdateRefused, match="no registry authority key"):
        verify_update(payload(signed), None, last_serial=0)


def test_replayed_update_is_refused():
    signed = sign_update(update(serial=5, technicians={"upsert": [new_tech()]}), AUTHORITY)
    verify_update(payload(signed), AUTHORITY.public_bytes, last_serial=4)
    with pytest.raises(UpdateRefused, match="replayed"):
        verify_update(payload(signed), AUTHORITY.public_bytes, last_serial=5)


@pytest.mark.parametrize("changes", [
    {"technicians": {"upsert": [{"cert_no": "TEST-900", "status": "retired"}]}},
    {"tools": {"upsert": [{"serial_number": "T-1"}]}},
    {"tools": {"replace": []}},
    {"fleet": {}},
    {"aircraft": {"remove": [1]}},
])
def test_updates_with_invalid_entries_are_refused(changes):
    signed = sign_update(update(**changes), AUTHORITY)
    with pytest.raises(UpdateRefused):
        verify_update(payload(signed), AUTHORITY.public_bytes, last_serial=0)


def test_floats_are_outside_the_signed_form():
    signed = {"update": {"serial": 1, "ratio": 0.5}, "signature": base64.b64encode(b"x" * 64).decode()}
    with pytest.raises(UpdateRefused, match="canonical"):
        verify_update(payload(signed), AUTHORITY.public_bytes, last_serial=0)


# --- settings ------------------------------------------------------------------------------------

def test_settings_default_and_from_the_environment(tmp_path):
    config = load_config(env={"MRO_DATA_DIR": str(tmp_path)})
    settings = compliance_settings(config)
    assert settings.registries_dir == DEFAULT_REGISTRIES
    assert settings.authority_public_key == tmp_path / "keys" / "registry-authority.pub.pem"
    assert (settings.schema_tolerance, settings.tolerance_ppm, settings.dry_run_sample) == (0.02, 20_000, 10_000)
    config = load_config(env={"MRO_DATA_DIR": str(tmp_path), "MRO_COMPLIANCE_SCHEMA_TOLERANCE": "0.05",
                              "MRO_COMPLIANCE_DRY_RUN_SAMPLE": "500", "MRO_COMPLIANCE_REGISTRIES_DIR": str(tmp_path)})
    settings = compliance_settings(config)
    assert (settings.tolerance_ppm, settings.dry_run_sample, settings.registries_dir) == (50_000, 500, tmp_path)
