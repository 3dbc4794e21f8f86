"""What the embedded broker promises beyond Mosquitto's semantics (services/broker/core.py):
PUBACK on an `in` topic means committed, the ingest session is fed from the durable spool,
nothing unacknowledged is ever dropped, and sessions cannot be taken over or wiped.

Every test runs the real broker process (`python -m services.broker`) and real MQTT clients,
stock `mosquitto_pub` included.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest

from shared.runtime.topics import Topics
from tests.brokers import BrokerProc, start_broker
from tests.mqttclient import Client

STATION = "HGR1"
T = Topics(STATION)
WELL_KNOWN_INGEST_ID = f"mro-{STATION}-ingest"  # what ingest's id looked like before it carried a tag


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProc]:
    proc = start_broker("embedded", tmp_path / "data", STATION)
    yield proc
    proc.kill()


def device(broker: BrokerProc, device_id: str, kind: str = "tablet") -> tuple[str, str]:
    login = broker.credentials.add_device(device_id, kind)
    time.sleep(1.2)  # the broker re-reads its files every second
    return login


def mosquitto_pub(broker: BrokerProc, login: tuple[str, str], topic: str, lines: list[str],
                  qos: int = 1) -> str:
    """Stock mosquitto_pub: one connection, every line a message, exits after the last PUBACK."""
    done = subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-u", login[0], "-P", login[1],
                           "-q", str(qos), "-l", "-t", topic, "-d"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


class ManualConsumer:
    """A persistent-session consumer that acks only when told, like a stage before its commit."""

    def __init__(self, broker: BrokerProc, service: str, topic_filter: str, client_id: str | None = None) -> None:
        """As `service` (its login), under its own client id unless `client_id` is given."""
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or broker.client_id(service),
                                  clean_session=False, manual_ack=True)
        self.client.username_pw_set(*broker.login(service))
        self.client.max_inflight_messages_set(0)
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.session_present: bool | None = None
        self.acked = 0
        self.client.on_message = lambda _c, _u, m: self._got(m)
        self.client.on_connect = self._connected
        self.topic_filter = topic_filter
        self.port = broker.port

    def _connected(self, client, _u, flags, reason, _p) -> None:
        self.session_present = flags.session_present
        client.subscribe(self.topic_filter, 1)

    def _got(self, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def start(self) -> ManualConsumer:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self

    def wait(self, count: int, timeout: float = 15) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        with self.lock:
            raise AssertionError(f"got {len(self.messages)} of {count} messages")

    def ack_all(self) -> None:
        """Ack every message not acked yet (a packet id may be reused once acked)."""
        with self.lock:
            for message in self.messages[self.acked:]:
                self.client.ack(message.mid, message.qos)
            self.acked = len(self.messages)

    def drop(self) -> None:
        """Vanish without DISCONNECT and without acking."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_pubacked_device_messages_survive_kill_9_of_the_broker_with_no_consumer(broker: BrokerProc) -> None:
    login = device(broker, "TAB-1")
    topic = T.device_in("tablet", "TAB-1")
    debug = mosquitto_pub(broker, login, topic, [f'{{"n":{i}}}' for i in range(1000)])
    assert debug.count("received PUBACK") == 1000
    broker.kill()
    broker.start()
    consumer = ManualConsumer(broker, "ingest", T.device_in_all).start()
    got = consumer.wait(1000)
    assert sorted(m.payload for m in got) == sorted(f'{{"n":{i}}}'.encode() for i in range(1000))
    assert [m.payload for m in got] == [f'{{"n":{i}}}'.encode() for i in range(1000)], "spool order is kept"
    consumer.ack_all()
    consumer.close()


def test_unacknowledged_intake_is_redelivered_with_dup_and_acked_intake_is_not(broker: BrokerProc) -> None:
    login = device(broker, "TAB-2")
    topic = T.device_in("tablet", "TAB-2")
    first = ManualConsumer(broker, "ingest", T.device_in_all).start()
    mosquitto_pub(broker, login, topic, [f"a{i}" for i in range(10)])
    first.wait(10)
    with first.lock:
        for message in first.messages[:4]:
            first.client.ack(message.mid, 1)
        first.acked = 4
    time.sleep(0.3)
    first.drop()
    time.sleep(0.3)
    again = ManualConsumer(broker, "ingest", T.device_in_all).start()
    got = again.wait(6)
    time.sleep(0.5)
    assert again.session_present
    assert [m.payload for m in again.messages] == [f"a{i}".encode() for i in range(4, 10)]
    assert all(m.dup for m in again.messages)
    again.ack_all()
    again.close()
    assert len(got) == 6


def test_intake_survives_a_broker_kill_while_delivered_but_unacknowledged(broker: BrokerProc) -> None:
    """Delivered to ingest but not yet acknowledged (ingest had not committed): the spool still has it."""
    login = device(broker, "TAB-3")
    consumer = ManualConsumer(broker, "ingest", T.device_in_all).start()
    mosquitto_pub(broker, login, T.device_in("tablet", "TAB-3"), [f"b{i}" for i in range(50)])
    consumer.wait(50)
    consumer.drop()
    broker.kill()
    broker.start()
    back = ManualConsumer(broker, "ingest", T.device_in_all).start()
    assert sorted(m.payload for m in back.wait(50)) == sorted(f"b{i}".encode() for i in range(50))
    back.ack_all()
    back.close()


def test_qos2_publishes_are_spooled_once(broker: BrokerProc) -> None:
    login = device(broker, "TAB-4")
    consumer = ManualConsumer(broker, "ingest", T.device_in_all).start()
    mosquitto_pub(broker, login, T.device_in("tablet", "TAB-4"), [f"q{i}" for i in range(20)], qos=2)
    got = consumer.wait(20)
    time.sleep(0.3)
    assert [m.payload for m in consumer.messages] == [f"q{i}".encode() for i in range(20)]
    assert len(got) == 20
    consumer.ack_all()
    consumer.close()


def test_an_unacknowledged_delivery_is_kept_past_any_timeout(broker: BrokerProc) -> None:
    """amqtt dropped a QoS 1 message after 5 s without PUBACK; here it waits for its PUBACK and is
    sent again (DUP) on reconnect, however long that takes."""
    topic = T.stage_input("validate")
    consumer = ManualConsumer(broker, "validate", topic).start()
    publisher = Client(broker, broker.login("ingest"))  # validate's one legitimate sender
    assert publisher.connect() == 0
    time.sleep(0.2)
    publisher.publish(topic, b"owed")
    consumer.wait(1)
    time.sleep(6.5)
    consumer.drop()
    back = ManualConsumer(broker, "validate", topic).start()
    [message] = back.wait(1)
    assert message.payload == b"owed" and message.dup
    back.ack_all()
    back.close()
    publisher.close()


def test_a_refused_connect_with_a_service_client_id_leaves_the_session_alone(broker: BrokerProc) -> None:
    login = device(broker, "TAB-5")
    consumer = ManualConsumer(broker, "ingest", T.device_in_all).start()
    consumer.wait(0)
    time.sleep(0.2)
    for attacker in (None, ("TAB-5", "wrong"), login, broker.login("sign"), broker.service_user):
        for client_id in (broker.client_id("ingest"), WELL_KNOWN_INGEST_ID):
            intruder = Client(broker, attacker, client_id=client_id, clean_session=True)
            assert intruder.connect() != 0, f"{attacker and attacker[0]} took over the ingest client id"
    mosquitto_pub(broker, login, T.device_in("tablet", "TAB-5"), ["still flowing"])
    [message] = consumer.wait(1)
    assert message.payload == b"still flowing"
    consumer.ack_all()
    consumer.close()


def test_another_user_cannot_take_over_or_read_a_devices_session(broker: BrokerProc) -> None:
    owner_login = device(broker, "TAB-6")
    other_login = device(broker, "TAB-7")
    owner = Client(broker, owner_login, client_id="tablet-six", clean_session=False)
    assert owner.connect() == 0
    assert not owner.subscribe(T.receipt("TAB-6")).is_failure
    owner.drop()
    time.sleep(0.2)
    services = Client(broker, broker.login("ingest"))  # a stage that sends receipts
    assert services.connect() == 0
    services.publish(T.receipt("TAB-6"), b"for six only")
    thief = Client(broker, other_login, client_id="tablet-six", clean_session=False)
    assert thief.connect() != 0
    back = Client(broker, owner_login, client_id="tablet-six", clean_session=False)
    assert back.connect() == 0 and back.session_present
    back.wait_for(T.receipt("TAB-6"), b"for six only")
    back.close()
    services.close()


def test_a_queued_session_gets_only_what_its_acl_lets_it_read(broker: BrokerProc) -> None:
    login = device(broker, "TAB-8")
    other = device(broker, "TAB-9")
    spy = Client(broker, login, client_id="spy", clean_session=False)
    assert spy.connect() == 0
    spy.subscribe("mro/#")
    spy.drop()
    services = Client(broker, broker.login("ingest"))  # a stage that sends receipts
    assert services.connect() == 0
    nine = Client(broker, other)
    assert nine.connect() == 0
    services.publish(T.receipt("TAB-9"), b"not yours")
    nine.publish(T.device_in("tablet", "TAB-9"), b"free text of another device")
    nine.close()
    services.publish(T.receipt("TAB-8"), b"yours")
    back = Client(broker, login, client_id="spy", clean_session=False)
    assert back.connect() == 0
    back.wait_for(T.receipt("TAB-8"), b"yours")
    time.sleep(0.5)
    assert back.seen() == [(T.receipt("TAB-8"), b"yours")]
    back.close()
    services.close()


def test_a_slow_consumer_pushes_back_on_the_publisher_and_nothing_is_dropped(tmp_path: Path) -> None:
    """A consumer that stops reading: the broker's queue for it stops at its bound, then the
    publisher's socket is no longer read; once the consumer reads again everything arrives."""
    broker = start_broker("embedded", tmp_path / "data", STATION)
    try:
        topic = "mro/HGR1/pipeline/validate"
        consumer = ManualConsumer(broker, "validate", topic, client_id="slow-consumer").start()
        consumer.wait(0)
        time.sleep(0.2)
        consumer.client.loop_stop()  # stops reading its socket, like SIGSTOP
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fast-publisher")
        publisher.username_pw_set(*broker.login("ingest"))
        publisher.max_inflight_messages_set(100)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        payload = b"x" * 20_000
        total = 6000  # 120 MB: more than the 64 MiB queue bound
        infos = [publisher.publish(topic, payload, qos=1) for _ in range(total)]
        time.sleep(8)
        acked = sum(info.is_published() for info in infos)
        rss = psutil.Process(broker.pid).memory_info().rss
        assert acked < total, "the publisher was never slowed down"
        assert rss < 400 << 20, f"broker RSS {rss >> 20} MiB: the queue is not bounded"
        consumer.client.loop_start()
        deadline = time.monotonic() + 60
        while len(consumer.messages) < total and time.monotonic() < deadline:
            consumer.ack_all()
            time.sleep(0.2)
        assert len(consumer.messages) >= total
        assert all(info.is_published() for info in infos)
        publisher.loop_stop()
        consumer.close()
    finally:
        broker.kill()


def test_a_full_spool_withholds_pubacks_and_resumes_once_ingest_drains_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool that cannot grow (its LMDB map is 1 MB and capped there; a full disk fails the same way):
    publishes are not acknowledged, nothing acknowledged is lost, and intake resumes by itself
    once ingest has taken (and acknowledged) what the spool held."""
    monkeypatch.setenv("MRO_STAGE_MAP_SIZE_MB", "1")
    monkeypatch.setenv("MRO_STAGE_SPOOL_MAP_MAX_MB", "1")
    broker = start_broker("embedded", tmp_path / "data", STATION)
    try:
        login = device(broker, "TAB-10")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tab-ten")
        publisher.username_pw_set(*login)
        publisher.max_inflight_messages_set(50)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        total = 2000
        infos = [publisher.publish(T.device_in("tablet", "TAB-10"), f"{i:06d}".encode() + b"x" * 1000, qos=1)
                 for i in range(total)]
        time.sleep(4)
        acked_while_full = sum(info.is_published() for info in infos)
        assert 0 < acked_while_full < total, f"{acked_while_full} of {total} acknowledged with a 1 MB spool"
        consumer = ManualConsumer(broker, "ingest", T.device_in_all).start()
        deadline = time.monotonic() + 120
        while not all(info.is_published() for info in infos) or len(consumer.messages) < total:
            assert time.monotonic() < deadline, f"{len(consumer.messages)} delivered, " \
                f"{sum(i.is_published() for i in infos)} acknowledged of {total}"
            consumer.ack_all()
            time.sleep(0.1)
        delivered = {m.payload[:6] for m in consumer.messages}
        assert delivered == {f"{i:06d}".encode() for i in range(total)}
        assert "SPOOL_COMMIT_FAILED" in broker.log_tail(200)
        publisher.loop_stop()
        consumer.close()
    finally:
        broker.kill()


def test_the_spool_grows_from_a_1_mb_map_and_acknowledges_everything_before_ingest_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same flood with room to grow (cap 64 MiB): every publish is acknowledged with no consumer."""
    monkeypatch.setenv("MRO_STAGE_MAP_SIZE_MB", "1")
    monkeypatch.setenv("MRO_STAGE_SPOOL_MAP_MAX_MB", "64")
    broker = start_broker("embedded", tmp_path / "data", STATION)
    try:
        login = device(broker, "TAB-11")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tab-eleven")
        publisher.username_pw_set(*login)
        publisher.max_inflight_messages_set(50)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        total = 2000
        infos = [publisher.publish(T.device_in("tablet", "TAB-11"), f"{i:06d}".encode() + b"x" * 1000, qos=1)
                 for i in range(total)]
        deadline = time.monotonic() + 60
        while not all(info.is_published() for info in infos):
            assert time.monotonic() < deadline, f"{sum(i.is_published() for i in infos)} acknowledged of {total}"
            time.sleep(0.1)
        assert "SPOOL_COMMIT_FAILED" not in broker.log_tail(200)
        assert (tmp_path / "data" / "spool" / "data.mdb").stat().st_size > 1 << 20
        consumer = ManualConsumer(broker, "ingest", T.device_in_all).start()
        deadline = time.monotonic() + 60
        while len(consumer.messages) < total:
            assert time.monotonic() < deadline, f"{len(consumer.messages)} delivered of {total}"
            consumer.ack_all()
            time.sleep(0.1)
        assert {m.payload[:6] for m in consumer.messages} == {f"{i:06d}".encode() for i in range(total)}
        publisher.loop_stop()
        consumer.close()
    finally:
        broker.kill()
