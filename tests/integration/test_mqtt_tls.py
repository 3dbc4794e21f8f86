"""MQTT over TLS on both real brokers: the embedded broker's TLS listener and Mosquitto's 8883
listener from the shipped mosquitto.conf, with certificates made by `mro-edge certs`' own code
(shared.runtime.pki).

A device with the station CA and its password is recorded in the ledger; a client that trusts
another CA, a broker whose certificate expired or names another host, a plain-text client on
the TLS port, and (client certificates required) a device without a certificate, with an
expired one or with one of another CA are all refused, each with a message that says what to do.
"""

from __future__ import annotations

import datetime
import json
import random
import ssl
from pathlib import Path

import pytest

from mro_edge.preflight import BrokerProblem, check_login
from mro_edge.simulator.devices import SimulatedDevice
from mro_edge.simulator.records import valid_record
from shared.runtime import pki
from shared.runtime.config import Config, load_config
from shared.runtime.mqtt import BrokerUnavailable, MqttLink, mqtt_connack
from shared.runtime.tls import client_context, explain
from tests.brokers import KINDS, BrokerProc, BrokerTls, free_port, start_broker
from tests.pipeline import Pipeline, wait_until
from tests.runstack import RunProc, cli, cli_env

STATION = "HGR1"
LONG_AGO = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)


@pytest.fixture(scope="module")
def station_pki(tmp_path_factory) -> Path:
    """The station CA with a broker certificate for localhost / 127.0.0.1."""
    out = tmp_path_factory.mktemp("pki")
    pki.make_ca(out, "test station CA")
    pki.issue_broker(out, ["localhost"], ["127.0.0.1"])
    return out


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Path:
    """Somebody else's CA, with its own broker certificate for the same names."""
    out = tmp_path_factory.mktemp("other-pki")
    pki.make_ca(out, "another CA")
    pki.issue_broker(out, ["localhost"], ["127.0.0.1"])
    return out


@pytest.fixture(params=KINDS)
def tls_broker(request, station_pki, tmp_path):
    broker = start_broker(request.param, tmp_path / "data", STATION, tls=BrokerTls(station_pki))
    yield broker
    broker.stop()


def client_config(broker: BrokerProc, **env: str) -> Config:
    return load_config(env={**broker.client_env, "MRO_DATA_DIR": str(broker.data_dir), "MRO_STATION": STATION,
                            **env})


def refusal(config: Config, login: tuple[str, str]) -> BaseException:
    """The exception of a CONNECT over TLS that must fail."""
    with pytest.raises(OSError) as refused:
        code = mqtt_connack(config.mqtt.port, *login, timeout=5, host=config.mqtt.host,
                            tls=client_context(config.mqtt))
        raise AssertionError(f"the broker answered CONNACK {code} where the TLS connection must fail")
    return refused.value


def test_device_publishes_over_tls_with_its_password_and_is_recorded(tls_broker, tmp_path):
    """The pipeline's services and a device all on mqtts:// with the station CA; the device logs
    in with its password and its record reaches the signed ledger."""
    pipeline = Pipeline(tls_broker, tmp_path / "data", STATION)
    try:
        assert pipeline.config.mqtt.tls and pipeline.config.mqtt.port == tls_broker.tls.port
        pipeline.start()
        device = pipeline.device("rfid_reader", "RFID-01")
        record = valid_record(random.Random(13), station=STATION, device_kind="rfid_reader", device_id="RFID-01")
        device.send(record["event_id"], json.dumps(record).encode())

        def recorded():
            device.resend_unreceipted()
            final = device.sent[record["event_id"]].final
            return final if final and final["status"] == "recorded" else None

        receipt = wait_until(recorded, 60, 0.2, "the `recorded` receipt over TLS")
        ledger = pipeline.ledger()
        assert [e.seq for e in ledger] == [receipt["seq"]]
        assert record["event_id"].encode() in ledger[0].entry
    finally:
        pipeline.stop()


def test_device_with_a_wrong_password_is_still_refused_over_tls(tls_broker):
    login = tls_broker.credentials.add_device("TQW-07", "torque_wrench")
    tls_broker.reload()
    config = client_config(tls_broker)
    tls = client_context(config.mqtt)
    wait_until(lambda: mqtt_connack(config.mqtt.port, *login, host=config.mqtt.host, tls=tls) == 0, 20, 0.2,
               "the new device login to be accepted")
    assert mqtt_connack(config.mqtt.port, login[0], "not-its-password", host=config.mqtt.host, tls=tls) in (4, 5)


def test_a_client_trusting_another_ca_is_refused(tls_broker, other_pki):
    config = client_config(tls_broker, MRO_MQTT_CA_FILE=str(other_pki / "ca.pem"))
    exc = refusal(config, tls_broker.service_user)
    assert isinstance(exc, ssl.SSLCertVerificationError), exc
    message = explain(exc, config.mqtt)
    assert "certificate verify failed" in message and "MRO_MQTT_CA_FILE" in message, message
    link = MqttLink(config, "test-wrong-ca", credentials=tls_broker.service_user, persistent=False)
    with pytest.raises(BrokerUnavailable, match="certificate verify failed: .*set MRO_MQTT_CA_FILE"):
        link.start(wait_s=2)


def test_a_plain_client_on_the_tls_port_is_refused(tls_broker):
    with pytest.raises(OSError):
        code = mqtt_connack(tls_broker.tls.port, *tls_broker.service_user, timeout=5)
        raise AssertionError(f"plain MQTT on the TLS port got CONNACK {code}")


def test_a_tls_client_on_the_plain_port_is_told_so(tls_broker):
    config = client_config(tls_broker, MRO_MQTT_URL=f"mqtts://127.0.0.1:{tls_broker.port}")
    message = explain(refusal(config, tls_broker.service_user), config.mqtt)
    assert "plain MQTT" in message and "8883" in message, message


@pytest.mark.parametrize("kind", KINDS)
def test_an_expired_broker_certificate_is_refused(kind, tmp_path):
    out = tmp_path / "pki"
    pki.make_ca(out, "test CA")
    pki.issue_broker(out, ["localhost"], ["127.0.0.1"], days=1, now=LONG_AGO)
    broker = start_broker(kind, tmp_path / "data", STATION, tls=BrokerTls(out))
    try:
        config = client_config(broker)
        exc = refusal(config, broker.service_user)
        assert isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code == 10, exc
        assert "has expired" in explain(exc, config.mqtt)
    finally:
        broker.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_the_host_name_is_verified(kind, tmp_path):
    out = tmp_path / "pki"
    pki.make_ca(out, "test CA")
    pki.issue_broker(out, ["edge.hangar.example"], [])
    broker = start_broker(kind, tmp_path / "data", STATION, tls=BrokerTls(out))
    try:
        config = client_config(broker)  # 127.0.0.1, which the certificate does not name
        exc = refusal(config, broker.service_user)
        assert isinstance(exc, ssl.SSLCertVerificationError), exc
        assert "does not name 127.0.0.1" in explain(exc, config.mqtt)
    finally:
        broker.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_client_certificates_when_required(kind, station_pki, other_pki, tmp_path):
    """Mutual TLS: a device's own certificate AND its password; no certificate, an expired one
    or one of another CA never reaches the login. The services present a certificate too."""
    devices = tmp_path / "devices"
    pki.make_ca(devices, "device CA")
    good = pki.issue_device(devices, "RFID-01")
    service = pki.issue_device(devices, "mro-services")
    expired = pki.issue_device(devices, "OLD-01", days=1, now=LONG_AGO)
    foreign = pki.issue_device(other_pki, "RFID-01")
    broker = start_broker(kind, tmp_path / "data", STATION,
                          tls=BrokerTls(station_pki, client_ca=devices / "ca.pem"))
    try:
        login = broker.credentials.add_device("RFID-01", "rfid_reader")
        broker.reload()

        def with_cert(issued: pki.Issued | None) -> Config:
            if issued is None:
                return client_config(broker)
            return client_config(broker, MRO_MQTT_CERT_FILE=str(issued.cert), MRO_MQTT_KEY_FILE=str(issued.key))

        config = with_cert(good)
        tls = client_context(config.mqtt)
        wait_until(lambda: mqtt_connack(config.mqtt.port, *login, host=config.mqtt.host, tls=tls) == 0, 20, 0.2,
                   "the device with its certificate and password to be accepted")
        assert mqtt_connack(config.mqtt.port, login[0], "wrong", host=config.mqtt.host, tls=tls) in (4, 5), \
            "a certificate must not replace the password"
        for issued in (None, expired, foreign):
            exc = refusal(with_cert(issued), login)
            assert "certificate" in explain(exc, config.mqtt) or isinstance(exc, ConnectionError), exc

        # a real device publishing through paho with its certificate, and a service link
        device = SimulatedDevice(config, "rfid_reader", "RFID-01", login)
        device.start(wait_s=20)
        device.stop()
        link = MqttLink(with_cert(service), "test-mtls-service", credentials=broker.service_user, persistent=False)
        link.start(wait_s=20)
        link.stop()
        refused = MqttLink(with_cert(None), "test-mtls-nocert", credentials=broker.service_user, persistent=False)
        with pytest.raises(BrokerUnavailable, match="client certificate"):
            refused.start(wait_s=2)
        with pytest.raises(BrokerProblem, match="client certificate"):  # what `mro-edge` commands say
            check_login(with_cert(None), *broker.service_user)
        check_login(with_cert(service), *broker.service_user)
    finally:
        broker.stop()


def test_run_with_tls_on_the_embedded_broker(station_pki, tmp_path):
    """`mro-edge run` over mqtts://: the supervisor's CONNACK wait, the login check and every
    service verify the embedded broker's certificate; no plain listener unless asked for;
    `mro-edge status` finds the CA through run.json; a missing CA file stops `run` before
    anything starts, with what to do."""
    data_dir = tmp_path / "data"
    port = free_port()
    tls = {"MRO_MQTT_CA_FILE": str(station_pki / "ca.pem"),
           "MRO_BROKER_TLS_CERT_FILE": str(station_pki / "broker.pem"),
           "MRO_BROKER_TLS_KEY_FILE": str(station_pki / "broker.key")}
    missing = cli("run", env=cli_env(data_dir, f"mqtts://localhost:{port}",
                                     **dict(tls, MRO_MQTT_CA_FILE=str(tmp_path / "absent.pem"))))
    assert missing.returncode == 2, missing.stderr
    assert "absent.pem does not exist" in missing.stderr and "mro-edge certs init" in missing.stderr
    assert "Traceback" not in missing.stderr
    run = RunProc(data_dir, f"mqtts://localhost:{port}", **tls).start()
    try:
        assert "[alarm]" not in run.console(), run.console()
        env = {k: v for k, v in run.env.items() if k not in ("MRO_MQTT_URL", "MRO_MQTT_CA_FILE")}
        status = cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        assert {"ingest", "validate", "sign"} <= set(json.loads(status.stdout)), status.stdout
        with pytest.raises(OSError):
            mqtt_connack(port, None, None, timeout=3)  # the port speaks TLS only
    finally:
        assert run.stop() == 0, run.console()
