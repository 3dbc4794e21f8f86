"""Hop authentication (`shared.runtime.hopauth`): every forgery of a pipeline message is refused."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sign.stage import ENTRY_SOURCE_RULE, entry_source_error
from services.validate.changes import CONTROL_DEVICE
from shared.runtime.config import load_config
from shared.runtime.hopauth import (
    CHAIN,
    HopAuth,
    HopAuthError,
    HopKeyError,
    HopKeys,
    ensure_hop_keys,
    hop_digest,
)
from shared.runtime.messages import (
    DeviceRef,
    Outcome,
    Outcomes,
    SchemaChange,
    StageReceipt,
    ValidatedRecord,
    encode_envelope,
    envelope_decoder,
    item_encoder,
    json_encode,
)
from shared.runtime.mqtt import Inbound
from shared.runtime.stage import StageRefused, StageRuntime
from shared.runtime.testing import STATION
from shared.runtime.topics import Topics
from tests.support.sign import record_item

TOPICS = Topics(STATION)
SIGN_IN = TOPICS.stage_input("sign")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hop")
    ensure_hop_keys(path)
    return path


def auth(data_path: Path, service: str) -> HopAuth:
    """`service`'s side, listening on every sealed topic (so it holds every sender's public key)."""
    listens = (*(TOPICS.stage_input(s) for s in CHAIN), *(TOPICS.stage_receipt(s) for s in CHAIN), TOPICS.outcomes)
    return HopAuth.for_service(data_path, TOPICS, service, listens)


def forged_seal(body: bytes, source: str, sig: bytes) -> bytes:
    """A sealed/1 message written by hand, `body` byte for byte."""
    return b'{"type":"sealed/1","source":' + json_encode(source) + b',"body":' + body + b',"sig":"' + \
        sig.hex().encode() + b'"}'


item_dicts = st.lists(
    st.fixed_dictionaries({"type": st.just("validated/1"), "key": st.text(min_size=1, max_size=64),
                           "n": st.integers(), "text": st.text(max_size=200)}),
    min_size=1, max_size=20,
)


def encoded(items: list[dict]) -> list[bytes]:
    return [json.dumps(item, ensure_ascii=False).encode() for item in items]


@settings(max_examples=60, deadline=None)
@given(items=item_dicts.map(encoded))
def test_a_sealed_envelope_opens_to_its_exact_bytes(data_path, items):
    validate, sign = auth(data_path, "validate"), auth(data_path, "sign")
    body = encode_envelope("validate", items)
    sealed = validate.seal(SIGN_IN, body)
    source, opened = sign.open(SIGN_IN, sealed)
    assert (source, opened) == ("validate", body)
    assert [json.loads(i) for i in items] == json.loads(opened)["items"]


@settings(max_examples=60, deadline=None)
@given(items=item_dicts, flip=st.integers(min_value=0))
def test_any_change_to_the_items_breaks_the_seal(data_path, items, flip):
    validate, sign = auth(data_path, "validate"), auth(data_path, "sign")
    body = encode_envelope("validate", encoded(items))
    sealed = validate.seal(SIGN_IN, body)
    changed = [dict(item) for item in items]
    changed[flip % len(items)]["n"] += 1  # e.g. a torque of 24.6 Nm made 99999 Nm
    tampered = sealed.replace(body, encode_envelope("validate", encoded(changed)))
    assert sign.open(SIGN_IN, sealed)[1] == body
    with pytest.raises(HopAuthError, match="does not verify"):
        sign.open(SIGN_IN, tampered)


def test_an_unsealed_batch_is_refused(data_path):
    """What the red team did: the bare `{source, items}` with the services' broker password."""
    body = encode_envelope("validate", [item_encoder.encode(record_item(1))])
    with pytest.raises(HopAuthError, match="no hop seal"):
        auth(data_path, "sign").open(SIGN_IN, body)


def test_a_seal_by_a_service_not_entitled_to_the_hop_is_refused(data_path):
    """ingest's genuine seal, but ingest never sends to sign: a compromised ingest cannot skip validate."""
    body = encode_envelope("ingest", [item_encoder.encode(record_item(1))])
    ingest = HopKeys.of(data_path).signing_key("ingest")
    sealed = forged_seal(body, "ingest", ingest.sign_raw(hop_digest(SIGN_IN, "ingest", body)))
    with pytest.raises(HopAuthError, match="may not send on this topic"):
        auth(data_path, "sign").open(SIGN_IN, sealed)


def test_a_seal_by_the_wrong_key_is_refused(data_path, tmp_path):
    """Claims validate, signed by another key (an attacker's, or sign's own: a compromised
    downstream cannot forge its upstream)."""
    body = encode_envelope("validate", [item_encoder.encode(record_item(1))])
    for key in (HopKeys.of(data_path).signing_key("sign"), HopKeys.of(_other_keys(tmp_path)).signing_key("validate")):
        sealed = forged_seal(body, "validate", key.sign_raw(hop_digest(SIGN_IN, "validate", body)))
        with pytest.raises(HopAuthError, match="does not verify"):
            auth(data_path, "sign").open(SIGN_IN, sealed)


def _other_keys(tmp_path: Path) -> Path:
    ensure_hop_keys(tmp_path / "other")
    return tmp_path / "other"


def test_a_seal_replayed_onto_another_hop_is_refused(data_path):
    """validate's genuine messages replayed onto other hops: the topic is part of what is signed."""
    validate = auth(data_path, "validate")
    receipt = json_encode(StageReceipt("validate", ["k1"]))
    sealed = validate.seal(TOPICS.stage_receipt("ingest"), receipt)
    auth(data_path, "ingest").open(TOPICS.stage_receipt("ingest"), sealed)
    with pytest.raises(HopAuthError):
        auth(data_path, "sign").open(TOPICS.stage_receipt("sign"), sealed)  # not validate's to send
    batch = validate.seal(SIGN_IN, encode_envelope("validate", [item_encoder.encode(record_item(1))]))
    with pytest.raises(HopAuthError, match="does not verify"):
        # a topic validate may send on too (its outcomes): the signature names pipeline/sign
        auth(data_path, "ingest").open(TOPICS.outcomes, batch)


def test_a_bad_signature_field_is_refused(data_path):
    sealed = json.loads(auth(data_path, "validate").seal(SIGN_IN, encode_envelope("validate", [])))
    for sig in ("", "zz" * 64, sealed["sig"][:-2], sealed["sig"] + "00"):
        with pytest.raises(HopAuthError, match="does not verify"):
            auth(data_path, "sign").open(SIGN_IN, json.dumps(dict(sealed, sig=sig)).encode())


def test_only_sign_may_say_recorded(data_path):
    """A forged `recorded` outcome would make ingest answer devices that their record is in the ledger."""
    recorded = json_encode(Outcomes([Outcome("k", "recorded", seq=0)]))
    rejected = json_encode(Outcomes([Outcome("k", "rejected")]))
    ingest = auth(data_path, "ingest")
    assert ingest.open(TOPICS.outcomes, auth(data_path, "sign").seal(TOPICS.outcomes, recorded))[0] == "sign"
    assert ingest.open(TOPICS.outcomes, auth(data_path, "validate").seal(TOPICS.outcomes, rejected))[0] == "validate"
    with pytest.raises(HopAuthError, match="only sign records"):
        ingest.open(TOPICS.outcomes, auth(data_path, "validate").seal(TOPICS.outcomes, recorded))


def test_a_service_may_seal_only_its_own_hops(data_path):
    with pytest.raises(HopKeyError):
        auth(data_path, "sign").seal(SIGN_IN, b"{}")
    assert auth(data_path, "sign").seal(TOPICS.dlq("sign"), b"{}") == b"{}"  # not a hop: as it is


def test_provisioning_is_private_and_idempotent(tmp_path):
    assert ensure_hop_keys(tmp_path) == list(CHAIN)
    keys = HopKeys.of(tmp_path)
    publics = {s: keys.public_path(s).read_bytes() for s in CHAIN}
    assert ensure_hop_keys(tmp_path) == []
    assert publics == {s: keys.public_path(s).read_bytes() for s in CHAIN}
    for service in CHAIN:
        assert stat.S_IMODE(keys.private_path(service).stat().st_mode) == 0o600
        assert stat.S_IMODE(keys.private_path(service).parent.stat().st_mode) == 0o700
    keys.public_path("validate").unlink()
    ensure_hop_keys(tmp_path)  # a lost public key is written again from the service's own key
    assert keys.public_path("validate").read_bytes() == publics["validate"]


@pytest.mark.parametrize("missing", ["own", "sender"])
def test_a_stage_without_its_keys_refuses_to_start(tmp_path, missing):
    from services.sign.stage import Sign

    ensure_hop_keys(tmp_path)
    keys = HopKeys.of(tmp_path)
    (keys.private_path("sign") if missing == "own" else keys.public_path("validate")).unlink()
    config = load_config(env={"MRO_DATA_DIR": str(tmp_path), "MRO_STATION": STATION,
                              "MRO_MQTT_URL": "mqtt://127.0.0.1:9"})
    with pytest.raises(StageRefused, match="hop-init") as refused:
        StageRuntime(Sign(), config)
    assert refused.value.kind == "hop_key"


def test_sign_signs_schema_changes_only_from_the_control_plane_and_records_only_for_their_device():
    item = record_item(1)
    assert entry_source_error(item) is None
    for device in (DeviceRef("torque_wrench", "TQW-99"), DeviceRef("tablet", "TQW-01"), CONTROL_DEVICE):
        error = entry_source_error(ValidatedRecord(item.key, item.record, device))
        assert error is not None and error.rule == ENTRY_SOURCE_RULE and error.path == "$.device"
    change = msgspec.convert({"type": "schema_change", "schema": "mro.schema-change/1", "event_id": "e",
                              "station": STATION, "action": "activate", "version": "v", "previous": "p",
                              "at": "2026-01-01T00:00:00Z", "command_id": "c", "operator": "o"}, SchemaChange)
    assert entry_source_error(ValidatedRecord("k", change, CONTROL_DEVICE)) is None
    error = entry_source_error(ValidatedRecord("k", change, DeviceRef("torque_wrench", "TQW-01")))
    assert error is not None and error.rule == ENTRY_SOURCE_RULE


def test_the_envelope_inside_stays_the_hop_format(data_path):
    """The body is the versioned hop message, unchanged: the seal only wraps it."""
    body = encode_envelope("validate", [item_encoder.encode(record_item(1))])
    sealed = json.loads(auth(data_path, "validate").seal(SIGN_IN, body))
    assert sealed["type"] == "sealed/1" and sealed["source"] == "validate"
    inner = envelope_decoder(ValidatedRecord).decode(json.dumps(sealed["body"]).encode())
    assert inner.items == [record_item(1)]


def test_keys_hop_init_makes_the_keys_once(tmp_path, monkeypatch, capsys):
    from mro_edge.cli import main

    monkeypatch.setenv("MRO_DATA_DIR", str(tmp_path / "data"))
    assert main(["keys", "hop-init"]) == 0
    assert f"new: {', '.join(CHAIN)}" in capsys.readouterr().out
    assert all(HopKeys.of(tmp_path / "data").private_path(s).exists() for s in CHAIN)
    assert main(["keys", "hop-init"]) == 0
    assert "new:" not in capsys.readouterr().out


@pytest.fixture
def sign_runtime(data_path):
    """sign's runtime on the module's keys; nothing connects (decode only)."""
    from services.sign.stage import Sign

    runtime = StageRuntime(Sign(), load_config(env={"MRO_DATA_DIR": str(data_path), "MRO_STATION": STATION,
                                                    "MRO_MQTT_URL": "mqtt://127.0.0.1:9"}))
    yield runtime
    runtime.store.close()


def _forgeries(data_path: Path, tmp_path: Path) -> dict[str, tuple[str, bytes]]:
    body = encode_envelope("validate", [item_encoder.encode(record_item(1))])
    validate, uplink = auth(data_path, "validate"), auth(data_path, "uplink")
    sealed = validate.seal(SIGN_IN, body)
    other = HopKeys.of(_other_keys(tmp_path)).signing_key("validate")
    receipt = json_encode(StageReceipt("uplink", ["k"]))
    return {
        "missing": (SIGN_IN, body),
        "tampered": (SIGN_IN, sealed.replace(b'"24.6"', b'"99999"')),
        "wrong source": (SIGN_IN, forged_seal(body, "uplink", HopKeys.of(data_path).signing_key("uplink").sign_raw(
            hop_digest(SIGN_IN, "uplink", body)))),
        "wrong hop": (SIGN_IN, validate.seal(TOPICS.outcomes, body)),
        "wrong key": (SIGN_IN, forged_seal(body, "validate", other.sign_raw(hop_digest(SIGN_IN, "validate", body)))),
        "inner source": (SIGN_IN, validate.seal(SIGN_IN, encode_envelope("ingest", [item_encoder.encode(
            record_item(1))]))),
        "receipt unsealed": (TOPICS.stage_receipt("sign"), receipt),
        "receipt by another": (TOPICS.stage_receipt("sign"), uplink.seal(TOPICS.stage_receipt("sign"), json_encode(
            StageReceipt("validate", ["k"])))),
    }


def test_every_forgery_decodes_to_a_hop_auth_report_and_nothing_else(data_path, tmp_path, sign_runtime):
    runtime = sign_runtime
    forgeries = _forgeries(data_path, tmp_path)
    assert b'"24.6"' in forgeries["missing"][1]  # the tampering below really changes the torque
    for name, (topic, payload) in forgeries.items():
        batch = runtime.decode([Inbound(topic, payload, 1, 0, 0)])
        assert not batch.inputs and not batch.receipted and not batch.upstream and not batch.broken, name
        [report] = batch.forged
        assert [e["rule"] for e in report["errors"]] == ["hop_auth"], name
        assert report["stage"] == "sign" and topic in report["errors"][0]["expected"], name
    good = runtime.decode([Inbound(SIGN_IN, auth(data_path, "validate").seal(
        SIGN_IN, encode_envelope("validate", [item_encoder.encode(record_item(1))])), 1, 0, 0)])
    assert good.inputs == [record_item(1)] and not good.forged and good.upstream == {"validate": [record_item(1).key]}


def test_the_chain_is_the_registry_s_stages_and_their_downstreams():
    """hopauth.CHAIN (shared cannot import services) must stay what the stages say they feed."""
    from importlib import import_module

    from services.registry import SERVICES, Kind

    stages = [s for s in SERVICES if s.kind is Kind.STAGE]
    assert tuple(s.name for s in stages) == CHAIN
    for service in stages:
        module, _, name = service.entry.partition(":")
        downstream = getattr(import_module(module), name).downstream
        position = CHAIN.index(service.name)
        assert downstream == (CHAIN[position + 1] if position + 1 < len(CHAIN) else None), service.name
