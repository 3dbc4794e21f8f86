"""Broker credentials without a broker: ids matched whole, the per-service ACL as written to the
file, client-id ownership, the $7$ hash format and the embedded broker's verification cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.broker.credentials import (
    CLIENT_OWNERS,
    ID_RE,
    PBKDF2_ITERATIONS,
    SERVICE_ACL,
    SERVICE_NAMES,
    Acl,
    BrokerCredentials,
    ClientIdOwners,
    CredentialsError,
    client_id_owners,
    hash_password,
    service_client_id,
    service_user,
    topic_matches,
    verify_password,
)
from shared.runtime.topics import Topics

STATION = "HGR1"
T = Topics(STATION)
valid_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.]{0,40}\Z")


@pytest.fixture
def creds(tmp_path: Path) -> BrokerCredentials:
    credentials = BrokerCredentials(tmp_path / "broker", STATION)
    credentials.ensure_service_users()
    return credentials


@given(valid_ids, st.sampled_from(["\n", "\r\n", " ", "\0", "/", "+", "#", "\n#"]))
def test_an_id_is_matched_whole(device_id: str, tail: str) -> None:
    assert ID_RE.fullmatch(device_id)
    assert not ID_RE.fullmatch(device_id + tail)
    assert ID_RE.match(device_id + tail)  # what `re.match` with `$` let through


def test_devices_add_refuses_a_trailing_newline_and_reserved_ids(creds: BrokerCredentials) -> None:
    before = (creds.passwd_path.read_text(), creds.acl_path.read_text())
    for bad in ("EVIL\n", "EVIL\nuser mro-ingest", "mro-ingest", "mro-x", "", "a" * 65, "a b"):
        with pytest.raises(CredentialsError, match="is not valid"):
            creds.add_device(bad, "tablet")
    assert (creds.passwd_path.read_text(), creds.acl_path.read_text()) == before
    with pytest.raises(CredentialsError):
        BrokerCredentials(creds.broker_dir, "HGR1\n")


PROBED = [T.device_in("tablet", "TAB-1"), T.receipt("TAB-1"), *(T.stage_input(s) for s in
          ("validate", "sign", "uplink")), *(T.stage_receipt(s) for s in ("ingest", "validate", "sign")),
          T.outcomes, T.control("sign"), T.schema, T.registry, T.schema_reply("x"), T.registry_reply("x"),
          T.dlq("sign"), T.status("sign"), T.status("connectivity"), T.status("supervisor"), T.alarm,
          "mro/OTHER/pipeline/sign", "$SYS/broker/clients"]


def test_the_written_acl_gives_each_service_exactly_its_topics(creds: BrokerCredentials) -> None:
    creds.add_device("TAB-1", "tablet")
    acl = Acl.parse(creds.acl_path.read_text())
    for name in SERVICE_NAMES:
        reads, writes = SERVICE_ACL[name]
        for topic in PROBED:
            wanted = any(topic_matches(f"{T.root}/{p}", topic) for p in writes)
            assert creds.may_publish(service_user(name), topic) == wanted, (name, topic)
            readable = any(topic_matches(f"{T.root}/{p}", topic) for p in reads)
            assert creds.may_receive(service_user(name), topic) == readable, (name, topic)
    assert [t for t in PROBED if creds.may_publish("TAB-1", t)] == [T.device_in("tablet", "TAB-1")]
    assert [t for t in PROBED if creds.may_receive("TAB-1", t)] == [T.receipt("TAB-1")]
    assert {u for u in acl.users if u and creds.may_publish(u, T.stage_input("sign"))} == {"mro-validate"}
    assert acl.devices == {"TAB-1": "tablet"}


def test_a_service_id_belongs_to_its_own_user_alone(creds: BrokerCredentials) -> None:
    for client, owner in CLIENT_OWNERS.items():
        _, password = creds.service_login(owner)
        for client_id in (service_client_id(STATION, client, password), f"mro-{STATION}-{client}"):
            assert creds.owns_client_id(service_user(owner), client_id), client_id
            others = [service_user(n) for n in SERVICE_NAMES if n != owner] + ["TAB-1", "mro-services"]
            assert not any(creds.owns_client_id(user, client_id) for user in others), client_id
    assert creds.owns_client_id("mro-operator", "mro-status-123")
    assert not creds.owns_client_id("TAB-1", "mro-status-123")
    assert creds.owns_client_id("TAB-1", "mosq-abcdef")


def test_client_ids_are_stable_and_unknowable_without_the_password() -> None:
    a = service_client_id(STATION, "ingest", "pw-one")
    assert a == service_client_id(STATION, "ingest", "pw-one")
    assert a.startswith(f"mro-{STATION}-ingest-") and len(a) == len(f"mro-{STATION}-ingest-") + 16
    assert a != service_client_id(STATION, "ingest", "pw-two")
    assert a != service_client_id("HGR2", "ingest", "pw-one")


def test_each_service_has_its_own_password_file(creds: BrokerCredentials) -> None:
    passwords = {name: creds.service_login(name)[1] for name in SERVICE_NAMES}
    assert len(set(passwords.values())) == len(SERVICE_NAMES)
    assert creds.secrets_dir.stat().st_mode & 0o777 == 0o700
    for name in SERVICE_NAMES:
        assert creds.secret_path(name).stat().st_mode & 0o777 == 0o600
        assert creds.check(service_user(name), passwords[name])
        assert not creds.check(service_user(name), passwords["operator" if name != "operator" else "ingest"])
    assert "mro-services" not in creds.passwd_path.read_text()


def test_hashes_are_mosquitto_7_at_a_modern_cost() -> None:
    stored = hash_password("correct horse")
    _, scheme, rounds, _, _ = stored.split("$")
    assert scheme == "7" and int(rounds) == PBKDF2_ITERATIONS >= 50_000
    assert verify_password("correct horse", stored) and not verify_password("correct horse!", stored)
    # what mosquitto_passwd 2.0 writes (101 rounds) still verifies
    assert verify_password("x", hash_password("x", iterations=101))


def test_a_successful_check_is_remembered_and_a_failed_one_is_not(creds: BrokerCredentials) -> None:
    user, password = creds.service_login("ingest")
    creds._verified.clear()
    started = time.perf_counter()
    assert creds.check(user, password)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(100):
        assert creds.check(user, password)
    again = (time.perf_counter() - started) / 100
    print(f"CONNECT password check: {first * 1000:.1f} ms first, {again * 1e6:.1f} us remembered")
    assert again * 20 < first
    assert not creds.check(user, password + "x")
    assert len(creds._verified) == 1
    device, device_password = creds.add_device("TAB-2", "tablet")
    assert creds.check(device, device_password)
    creds.add_device("TAB-2", "tablet")  # a new password: the remembered check no longer applies
    assert not creds.check(device, device_password)


def test_the_clientids_file_binds_each_service_id_to_its_owner(creds: BrokerCredentials) -> None:
    """What credentials.py writes for the embedded broker and Mosquitto's plugin: every service
    user, and each `mro-<station>-<client>` with its owner; the longest matching line decides."""
    creds.ensure_service_users()
    owners = ClientIdOwners.parse(creds.clientids_path.read_text())
    assert owners.services == {service_user(name) for name in SERVICE_NAMES}
    assert dict(owners.owners) == client_id_owners(STATION)
    assert dict(owners.owners)[f"mro-{STATION}-sign-alarm"] == "mro-sign"
    nested = ClientIdOwners.parse("service a\nservice b\nclient mro-X-s a\nclient mro-X-s-alarm b\n")
    assert nested.allows("b", "mro-X-s-alarm-tag") and not nested.allows("a", "mro-X-s-alarm-tag")
    assert nested.allows("a", "mro-X-s-tag") and not nested.allows("b", "mro-X-s")
    assert nested.allows("a", "mro-X-sx") and nested.allows("b", "mro-X-sx"), "no '-' after it: nobody's own id"
    assert not nested.allows(None, "mro-X-sx") and not nested.allows("c", "mro-X-sx") and nested.allows("c", "X")
    assert not ClientIdOwners().allows("a", "mro-X-s"), "no file: every reserved id refused"


@pytest.mark.parametrize("line", ["service", "service a b", "client mro-X-s", "owner mro-X-s a", "client a b c"])
def test_a_malformed_clientids_line_is_an_error_naming_it(line: str) -> None:
    with pytest.raises(CredentialsError, match=r"clientids:2: expected"):
        ClientIdOwners.parse(f"# comment\n{line}\n")
