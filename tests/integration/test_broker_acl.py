"""Access control and session behaviour, identical on the embedded broker and on Mosquitto.

Every test runs against both real brokers, which read the same password and ACL files written
by services.broker.credentials. Where the brokers differ (persistence across a broker crash) the test
pins down what each one actually does.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.broker.credentials import (
    CLIENT_OWNERS,
    LEGACY_SERVICE_USER,
    PBKDF2_ITERATIONS,
    SERVICE_ACL,
    SERVICE_NAMES,
    BrokerCredentials,
    service_user,
    topic_matches,
)
from services.broker.service import PortInUseError, run_broker
from shared.runtime.config import load_config
from shared.runtime.files import write_atomic
from shared.runtime.topics import Topics
from tests.brokers import KINDS, BrokerProc, mqtt_connack, start_broker
from tests.mqttclient import Client

STATION = "HGR1"
T = Topics(STATION)
QUIET_S = 0.4
_ids = itertools.count(1)


@pytest.fixture(scope="module", params=KINDS)
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProc]:
    proc = start_broker(request.param, tmp_path_factory.mktemp(request.param), STATION)
    yield proc
    proc.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: BrokerProc, login: tuple[str, str] | None, **kwargs: object) -> Client:
        made.append(Client(broker, login, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for client in made:
        client.close()


def wait_login(broker: BrokerProc, login: tuple[str, str], accepted: bool = True, timeout: float = 5) -> None:
    """Until the broker has (re)read its files: the login is accepted, or refused."""
    deadline = time.monotonic() + timeout
    while (mqtt_connack(broker.port, *login, timeout=5) == 0) != accepted:
        assert time.monotonic() < deadline, f"{broker.kind} did not pick up the change for {login[0]}"
        time.sleep(0.05)


def new_device(broker: BrokerProc, kind: str = "torque_wrench") -> tuple[str, str]:
    login = broker.credentials.add_device(f"dev{next(_ids)}", kind)
    broker.reload()
    wait_login(broker, login)
    return login


class Sink:
    """Every service user subscribed to one filter: together they read whatever the box reads
    (no user reads everything any more), so a message nobody gets was dropped by the broker."""

    def __init__(self, members: list[Client]) -> None:
        self.members = members

    def wait_for(self, topic: str, payload: bytes, timeout: float = 5):
        deadline = time.monotonic() + timeout
        while True:
            for member in self.members:
                for message in list(member.messages):
                    if message.topic == topic and message.payload == payload:
                        return message
            assert time.monotonic() < deadline, f"no service user got {payload!r} on {topic}: {self.seen()}"
            time.sleep(0.02)

    def seen(self) -> list[tuple[str, bytes]]:
        return [item for member in self.members for item in member.seen()]


def services(broker: BrokerProc, clients: Callable[..., Client], topic_filter: str = "mro/#") -> Sink:
    members = []
    for name in SERVICE_NAMES:
        client = clients(broker, broker.login(name))
        assert client.connect() == 0
        assert not client.subscribe(topic_filter).is_failure
        members.append(client)
    return Sink(members)


def publisher(broker: BrokerProc, clients: Callable[..., Client], service: str) -> Client:
    client = clients(broker, broker.login(service))
    assert client.connect() == 0
    return client


def test_anonymous_and_wrong_passwords_are_refused(broker: BrokerProc,
                                                   clients: Callable[..., Client]) -> None:
    device, password = new_device(broker)
    assert mqtt_connack(broker.port, None, None) != 0
    assert mqtt_connack(broker.port, device, None) != 0
    assert mqtt_connack(broker.port, device, password + "x") != 0
    assert mqtt_connack(broker.port, LEGACY_SERVICE_USER, password) != 0
    assert mqtt_connack(broker.port, LEGACY_SERVICE_USER, broker.login("ingest")[1]) != 0
    for name in SERVICE_NAMES:  # each service has its own password: no other one opens it
        assert mqtt_connack(broker.port, service_user(name), password) != 0
        other = "ingest" if name != "ingest" else "sign"
        assert mqtt_connack(broker.port, service_user(name), broker.login(other)[1]) != 0
    assert mqtt_connack(broker.port, "nobody", password) != 0
    assert clients(broker, None).connect().is_failure
    assert clients(broker, (device, "wrong")).connect().is_failure
    assert clients(broker, (device, password)).connect() == 0


def test_device_publishes_only_to_its_own_in_topic(broker: BrokerProc,
                                                   clients: Callable[..., Client]) -> None:
    sink = services(broker, clients)
    login = new_device(broker, "torque_wrench")
    other, _ = new_device(broker, "tablet")
    device = clients(broker, login)
    assert device.connect() == 0
    me = login[0]
    forbidden = [
        T.device_in("torque_wrench", other),  # another device's topic
        T.device_in("tablet", other),
        T.device_in("tablet", me),  # its own id under another kind
        T.device_in("torque_wrench", me) + "/extra",
        T.receipt(me),
        T.stage_input("validate"),
        T.status("ingest"),
        T.alarm,
        f"mro/OTHER/in/torque_wrench/{me}",
        "elsewhere",
    ]
    for topic in forbidden:
        device.publish(topic, b"forged")
    device.publish(T.device_in("torque_wrench", me), b"genuine")
    sink.wait_for(T.device_in("torque_wrench", me), b"genuine")
    time.sleep(QUIET_S)
    assert [m for m in sink.seen() if m[1] == b"forged"] == []


def test_device_reads_only_its_own_receipts(broker: BrokerProc, clients: Callable[..., Client]) -> None:
    ops = publisher(broker, clients, "ingest")
    ops.publish(T.status("ingest"), b"retained status", retain=True)
    me, other = new_device(broker), new_device(broker)
    spy = clients(broker, me)
    assert spy.connect() == 0
    time.sleep(QUIET_S)
    assert spy.seen() == [], "a client that subscribed to nothing must get nothing (not even retained)"
    # Mosquitto 2.0 grants every SUBSCRIBE and filters each delivery by the read ACL; so do we.
    for topic_filter in (T.receipt(other[0]), f"{T.root}/receipt/+", T.status_all, "#"):
        assert not spy.subscribe(topic_filter).is_failure
    ops.publish(T.receipt(other[0]), b"not yours")
    publisher(broker, clients, "validate").publish(T.stage_input("sign"), b"internal")
    ops.publish(T.receipt(me[0]), b"yours")
    spy.wait_for(T.receipt(me[0]), b"yours")
    time.sleep(QUIET_S)
    assert {topic for topic, _ in spy.seen()} == {T.receipt(me[0])}


# Every topic the box uses, each read by at least one service user (so the Sink sees it if the
# broker lets it through).
PROBED = [T.device_in("tablet", "any"), T.device_in("torque_controller", "any"), T.receipt("any"),
          T.stage_input("validate"), T.stage_input("sign"),
          T.stage_input("uplink"), T.stage_receipt("ingest"), T.stage_receipt("validate"),
          T.stage_receipt("sign"), T.stage_receipt("uplink"), T.outcomes, T.control("ingest"),
          T.control("sign"), T.schema, T.registry, T.schema_reply("c1"), T.registry_reply("c1"),
          T.dlq("ingest"), T.dlq("validate"), T.status("sign"), T.status("connectivity"),
          T.status("supervisor"), T.alarm]
# who may publish where, said outright (SERVICE_ACL must agree; the test checks both)
ONLY = {
    T.stage_input("sign"): {"validate"},
    T.stage_input("validate"): {"ingest"},
    T.stage_input("uplink"): {"sign"},
    T.receipt("any"): {"ingest", "validate", "sign"},
    T.outcomes: {"validate", "sign"},
    T.control("sign"): {"operator"},
    T.schema: {"operator"},
    T.registry: {"operator"},
    T.schema_reply("c1"): {"validate"},
    T.status("connectivity"): {"heartbeat"},
    T.device_in("tablet", "any"): set(),
    T.device_in("torque_controller", "any"): set(),  # the bridge: only its configured controllers
}


def allowed(service: str, topic: str) -> bool:
    return any(topic_matches(f"{T.root}/{pattern}", topic) for pattern in SERVICE_ACL[service][1])


def test_acl_table_gives_each_topic_only_its_legitimate_senders() -> None:
    for topic, senders in ONLY.items():
        assert {name for name in SERVICE_NAMES if allowed(name, topic)} == senders, topic


def test_each_service_user_publishes_exactly_its_own_topics(broker: BrokerProc,
                                                            clients: Callable[..., Client]) -> None:
    """Forged stage traffic: each service's credentials (and a device's) publish on every topic of
    the box; only the ACL's own topics get through. On MQTT 3.1.1 Mosquitto PUBACKs a denied
    publish and drops it, so the proof is that no service user ever receives it."""
    sink = services(broker, clients)
    device = clients(broker, new_device(broker))
    assert device.connect() == 0
    writers = {name: publisher(broker, clients, name) for name in SERVICE_NAMES} | {"device": device}
    expected = []
    for name, writer in writers.items():
        for topic in PROBED:
            payload = f"from {name}".encode()
            writer.publish(topic, payload)
            if name != "device" and allowed(name, topic):
                expected.append((topic, payload))
    for topic, payload in expected:
        sink.wait_for(topic, payload)
    time.sleep(QUIET_S)
    got = {(topic, payload) for topic, payload in sink.seen() if payload.startswith(b"from ")}
    assert got == set(expected), sorted(got ^ set(expected))
    assert (T.stage_input("sign"), b"from validate") in got
    for name in ("ingest", "uplink", "heartbeat", "sign", "supervisor", "operator", "health", "device"):
        assert (T.stage_input("sign"), f"from {name}".encode()) not in got, name


def test_the_bridge_publishes_and_reads_receipts_for_its_configured_controllers_only(
        broker: BrokerProc, clients: Callable[..., Client]) -> None:
    assert broker.credentials.set_bridged("torque", ["TQC-01"])
    assert not broker.credentials.set_bridged("torque", ["TQC-01"])  # unchanged: no rewrite, no SIGHUP
    broker.reload()
    try:
        sink = services(broker, clients)
        bridge = publisher(broker, clients, "torque")
        assert not bridge.subscribe(T.receipt("+")).is_failure
        for controller in ("TQC-01", "TQC-02"):
            bridge.publish(T.device_in("torque_controller", controller), b"from torque")
            publisher(broker, clients, "ingest").publish(T.receipt(controller), b"receipt")
        sink.wait_for(T.device_in("torque_controller", "TQC-01"), b"from torque")
        bridge.wait_for(T.receipt("TQC-01"), b"receipt")
        time.sleep(QUIET_S)
        assert (T.device_in("torque_controller", "TQC-02"), b"from torque") not in sink.seen()
        assert (T.receipt("TQC-02"), b"receipt") not in bridge.seen()
        assert broker.credentials.devices().get("TQC-01") is None  # a controller is no device login
    finally:
        broker.credentials.set_bridged("torque", [])
        broker.reload()


def test_retained_status_reaches_late_subscribers(broker: BrokerProc, clients: Callable[..., Client]) -> None:
    publisher(broker, clients, "sign").publish(T.status("sign"), b"up", retain=True)
    late = services(broker, clients, T.status_all)
    assert late.wait_for(T.status("sign"), b"up").retain


def test_will_cannot_bypass_the_acl(broker: BrokerProc, clients: Callable[..., Client]) -> None:
    sink = services(broker, clients)
    login = new_device(broker)
    own = T.device_in("torque_wrench", login[0])
    sneaky = clients(broker, login, will=(T.stage_input("sign"), b"forged will"))
    assert sneaky.connect() == 0
    sneaky.drop()
    honest = clients(broker, login, will=(own, b"honest will"))
    assert honest.connect() == 0
    honest.drop()
    sink.wait_for(own, b"honest will")
    time.sleep(QUIET_S)
    assert (T.stage_input("sign"), b"forged will") not in sink.seen()


def test_devices_come_and_go_without_a_broker_restart(broker: BrokerProc,
                                                      clients: Callable[..., Client]) -> None:
    sink = services(broker, clients)
    device_id = f"dev{next(_ids)}"
    first = broker.credentials.add_device(device_id, "rfid_reader")
    broker.reload()
    wait_login(broker, first)
    device = clients(broker, first)
    assert device.connect() == 0
    device.publish(T.device_in("rfid_reader", device_id), b"hello")
    sink.wait_for(T.device_in("rfid_reader", device_id), b"hello")

    rotated = broker.credentials.add_device(device_id, "rfid_reader")
    assert rotated[1] != first[1]
    broker.reload()
    wait_login(broker, first, accepted=False)
    assert device.disconnected.wait(5), "a client whose password was rotated must be disconnected"
    wait_login(broker, rotated)

    broker.credentials.remove_device(device_id)
    broker.reload()
    wait_login(broker, rotated, accepted=False)
    assert device_id not in broker.credentials.devices()


# What a broker answers a CONNECT with a client id that is not the user's: MQTT 3.1.1 CONNACK
# "not authorised" (Mosquitto's plugin, the embedded broker) or "identifier rejected".
REFUSED_ID = (5, 2)


def connack(broker: BrokerProc, login: tuple[str, str] | None, client_id: str, clean_session: bool = True) -> int:
    """The CONNACK code a login with `client_id` gets (a raw CONNECT, then DISCONNECT if accepted)."""
    return mqtt_connack(broker.port, *(login or (None, None)), timeout=5, client_id=client_id,
                        clean_session=clean_session)


def test_a_service_client_id_belongs_to_its_own_user_alone(broker: BrokerProc,
                                                           clients: Callable[..., Client]) -> None:
    """Every service client id, tagged as the service connects with it (Mosquitto logs it) and
    bare as an attacker guesses it, clean and persistent: a device's and every other service's
    valid login is refused with "not authorised" on both brokers, and the service connection
    holding the id is never dropped; the owner's own login is accepted."""
    device = new_device(broker)
    for client, owner in CLIENT_OWNERS.items():
        tagged = broker.client_id(client)
        holder = clients(broker, broker.login(owner), client_id=tagged, clean_session=False)
        assert holder.connect() == 0, client
        own_receipts = T.receipt(service_user(owner))  # every user reads its own receipts
        assert not holder.subscribe(own_receipts).is_failure
        others = [device] + [broker.login(name) for name in SERVICE_NAMES if name != owner]
        for client_id in (tagged, f"mro-{STATION}-{client}"):
            for login in others:
                for clean in (True, False):
                    code = connack(broker, login, client_id, clean)
                    assert code in REFUSED_ID, f"{broker.kind}: {login[0]} as {client_id}: {code}"
        time.sleep(QUIET_S)
        assert not holder.disconnected.is_set(), f"{broker.kind}: {client} was kicked off"
        publisher(broker, clients, "validate").publish(own_receipts, f"still {client}".encode())
        holder.wait_for(own_receipts, f"still {client}".encode())
        holder.close()
        assert connack(broker, broker.login(owner), tagged, clean_session=False) == 0
        assert connack(broker, broker.login(owner), f"mro-{STATION}-{client}") == 0
    # other reserved ids are the services' (the operator's commands), other ids are anyone's
    assert connack(broker, broker.service_user, f"mro-status-{next(_ids)}") == 0
    assert connack(broker, device, f"mro-status-{next(_ids)}") in REFUSED_ID
    assert connack(broker, device, f"tablet-{next(_ids)}") == 0
    assert connack(broker, device, device[0]) == 0
    assert connack(broker, (device[0], "wrong"), f"tablet-{next(_ids)}") != 0


def test_the_client_id_file_is_followed_without_a_restart(broker: BrokerProc) -> None:
    """`clientids` (written by credentials.py beside passwd and acl) is re-read when it changes:
    a new owner takes effect at the next CONNECT (and on SIGHUP), a malformed or missing file
    refuses every `mro-` id, even a service's own, until a good one is back."""
    path = broker.credentials.clientids_path
    original = path.read_text()
    validate, sign = broker.login("validate"), broker.login("sign")
    spare = f"mro-{STATION}-spare"
    try:
        assert connack(broker, validate, f"{spare}-1") == 0, "an id nobody owns"
        write_atomic(path, (original + f"client {spare} {service_user('sign')}\n").encode())
        assert connack(broker, validate, f"{spare}-1") in REFUSED_ID
        assert connack(broker, sign, f"{spare}-1") == 0
        write_atomic(path, (original + f"client {spare} {service_user('validate')}\n").encode())
        broker.reload()
        time.sleep(QUIET_S)
        assert connack(broker, validate, f"{spare}-1") == 0
        assert connack(broker, sign, f"{spare}-1") in REFUSED_ID
        write_atomic(path, (original + "owner of everything\n").encode())
        assert connack(broker, validate, broker.client_id("validate")) in REFUSED_ID, "a malformed file"
        path.unlink()
        assert connack(broker, validate, broker.client_id("validate")) in REFUSED_ID, "no file"
        assert connack(broker, validate, "validate-anything") == 0
    finally:
        write_atomic(path, original.encode())
        broker.reload()
    time.sleep(QUIET_S)
    assert connack(broker, validate, broker.client_id("validate")) == 0
    assert connack(broker, validate, f"{spare}-1") == 0


def offline_subscriber(broker: BrokerProc, clients: Callable[..., Client], client_id: str) -> Client:
    subscriber = clients(broker, broker.service_user, client_id=client_id, clean_session=False)
    assert subscriber.connect() == 0
    assert not subscriber.subscribe(T.device_in_all).is_failure
    subscriber.close()
    return subscriber


def test_persistent_session_gets_what_was_published_while_offline(
    broker: BrokerProc, clients: Callable[..., Client]
) -> None:
    client_id = f"stage-{next(_ids)}"
    offline_subscriber(broker, clients, client_id)
    login = new_device(broker, "barcode_scanner")
    device = clients(broker, login)
    assert device.connect() == 0
    topic = T.device_in("barcode_scanner", login[0])
    payloads = [f"r{i}".encode() for i in range(5)]
    for payload in payloads:
        device.publish(topic, payload)
    back = clients(broker, broker.service_user, client_id=client_id, clean_session=False)
    assert back.connect() == 0
    assert back.session_present
    for payload in payloads:
        assert back.wait_for(topic, payload).retain is False  # queued, not retained
    assert [p for _, p in back.seen()] == payloads


@pytest.fixture(params=KINDS)
def own_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProc]:
    proc = start_broker(request.param, tmp_path, STATION)
    yield proc
    proc.kill()


def test_persistent_session_after_broker_kill(own_broker: BrokerProc, clients: Callable[..., Client]) -> None:
    """Mosquitto restores sessions and queued messages from its last snapshot. The embedded broker
    keeps sessions in memory only: what survives its crash is the intake spool, which only the ingest
    session reads (tests/integration/test_embedded_broker.py)."""
    broker = own_broker
    client_id = "stage-ingest"
    offline_subscriber(broker, clients, client_id)
    login = new_device(broker)
    device = clients(broker, login)
    assert device.connect() == 0
    topic = T.device_in("torque_wrench", login[0])
    published_at = time.time_ns()
    for payload in (b"a", b"b", b"c"):
        device.publish(topic, payload)
    device.close()
    if broker.kind == "mosquitto":
        # mosquitto.conf saves every 250 changes; the compose launcher adds SIGUSR1 ("save
        # now") every 15 s, which is what bounds a trickle like this one
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGUSR1)
        snapshot = broker.data_dir / "mosquitto" / "mosquitto.db"
        deadline = time.monotonic() + 10
        while not (snapshot.exists() and snapshot.stat().st_mtime_ns >= published_at):
            assert time.monotonic() < deadline, "mosquitto never saved its database"
            time.sleep(0.1)
    broker.kill()
    broker.restart()
    back = clients(broker, broker.service_user, client_id=client_id, clean_session=False)
    assert back.connect() == 0
    if broker.kind == "mosquitto":
        assert back.session_present
        for payload in (b"a", b"b", b"c"):
            back.wait_for(topic, payload)
    else:
        assert not back.session_present
        time.sleep(QUIET_S)
        assert back.seen() == []


def test_embedded_broker_names_the_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(env={"MRO_MQTT_URL": f"mqtt://127.0.0.1:{port}", "MRO_DATA_DIR": str(tmp_path)})
        with pytest.raises(PortInUseError) as error:
            run_broker(config)
    message = str(error.value)
    assert "is taken (probably Mosquitto)" in message
    assert "MRO_MQTT_URL=mqtt://127.0.0.1:1884" in message and "--no-broker" in message


def test_modern_hashes_are_accepted_by_both_brokers(broker: BrokerProc) -> None:
    """The $7$ hashes we write (PBKDF2-SHA512 at PBKDF2_ITERATIONS rounds) log in on a real
    Mosquitto as on the embedded broker; prints what a CONNECT costs on each."""
    device, password = new_device(broker)
    line = next(li for li in broker.credentials.passwd_path.read_text().splitlines() if li.startswith(device + ":"))
    assert line.split(":", 1)[1].startswith(f"$7${PBKDF2_ITERATIONS}$")
    costs = []
    for _ in range(5):
        started = time.perf_counter()
        assert mqtt_connack(broker.port, device, password, timeout=10) == 0
        costs.append(time.perf_counter() - started)
    assert mqtt_connack(broker.port, device, password + "x", timeout=10) != 0
    print(f"{broker.kind}: CONNECT with a {PBKDF2_ITERATIONS}-round hash: "
          f"{', '.join(f'{c * 1000:.0f}' for c in costs)} ms")


def test_password_file_interoperates_with_mosquitto_passwd(tmp_path: Path) -> None:
    """A user added by an operator with mosquitto_passwd logs in to the embedded broker and survives
    our rewrites."""
    credentials = BrokerCredentials(tmp_path / "broker", STATION)
    credentials.ensure_service_users()
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd (Debian package mosquitto) is required"
    subprocess.run([tool, "-b", str(credentials.passwd_path), "mcc-console", "s3cret pass"], check=True)
    device, password = credentials.add_device("dev-interop", "tablet")
    assert credentials.check("mcc-console", "s3cret pass")
    assert not credentials.check("mcc-console", "s3cret")
    assert credentials.check(device, password)
    assert credentials.passwd_path.stat().st_mode & 0o777 == 0o600
    assert credentials.acl_path.stat().st_mode & 0o777 == 0o600
    assert credentials.broker_dir.stat().st_mode & 0o777 == 0o700
