"""TLS settings without a broker: mqtts:// config round trips, settings that cannot work refused at
load with what to do, client and server contexts from `mro-edge certs` files, the embedded
broker's listeners, and `mro-edge certs` output that `openssl verify` accepts."""

from __future__ import annotations

import datetime
import ssl
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mro_edge.cli import main
from services.broker.service import listeners
from shared.runtime import pki
from shared.runtime.config import ConfigError, load_config
from shared.runtime.tls import TlsProblem, client_context, explain, server_context


def config(tmp_path: Path, **env: str):
    return load_config(tmp_path / "absent.toml", env={"MRO_DATA_DIR": str(tmp_path / "data"), **env})


@pytest.fixture(scope="module")
def issued(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    pki.make_ca(out, "unit CA")
    pki.issue_broker(out, ["edge.hangar.example", "localhost"], ["127.0.0.1", "::1"])
    pki.issue_device(out, "RFID-01")
    return out


@given(host=st.sampled_from(["127.0.0.1", "edge.hangar.example", "localhost", "10.20.30.40"]),
       port=st.integers(1, 65535))
def test_mqtts_url_round_trip(host: str, port: int) -> None:
    loaded = load_config(Path("/nonexistent.toml"), env={"MRO_MQTT_URL": f"mqtts://{host}:{port}"})
    assert (loaded.mqtt.host, loaded.mqtt.port, loaded.mqtt.tls) == (host, port, True)
    plain = load_config(Path("/nonexistent.toml"), env={"MRO_MQTT_URL": f"mqtt://{host}:{port}"})
    assert (plain.mqtt.host, plain.mqtt.port, plain.mqtt.tls) == (host, port, False)


def test_tls_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "edge.toml"
    toml.write_text('[mqtt]\nurl = "mqtts://edge.hangar.example:8883"\nca_file = "/etc/mro/ca.pem"\n'
                    '[broker]\nlisten = "0.0.0.0:8883"\nplain_listen = "127.0.0.1:1883"\n'
                    'tls_cert_file = "/etc/mro/broker.pem"\ntls_key_file = "/etc/mro/broker.key"\n')
    loaded = load_config(toml, env={"MRO_MQTT_CERT_FILE": "/etc/mro/me.pem", "MRO_MQTT_KEY_FILE": "/etc/mro/me.key",
                                    "MRO_BROKER_TLS_CLIENT_CA_FILE": "/etc/mro/devices-ca.pem"})
    assert loaded.mqtt.tls and loaded.mqtt.port == 8883 and loaded.mqtt.ca_file == "/etc/mro/ca.pem"
    assert (loaded.mqtt.cert_file, loaded.mqtt.key_file) == ("/etc/mro/me.pem", "/etc/mro/me.key")
    assert loaded.broker.listen == "0.0.0.0:8883" and loaded.broker.plain_listen == "127.0.0.1:1883"
    assert loaded.broker.tls_client_ca_file == "/etc/mro/devices-ca.pem"


@pytest.mark.parametrize(("env", "says"), [
    ({"MRO_MQTT_URL": "mqttx://h:1"}, "mqtts://HOST:PORT"),
    ({"MRO_MQTT_URL": "mqtts://h"}, "mqtts://HOST:PORT"),
    ({"MRO_MQTT_URL": "mqtts://h:8883", "MRO_MQTT_CERT_FILE": "/c.pem"}, "go together"),
    ({"MRO_BROKER_TLS_KEY_FILE": "/k.pem"}, "go together"),
    ({"MRO_MQTT_URL": "mqtts://h:8883", "MRO_BROKER_PLAIN_LISTEN": "0.0.0.0:1883"}, "loopback addresses only"),
    ({"MRO_BROKER_LISTEN": "8883"}, "HOST:PORT"),
])
def test_settings_that_cannot_work_are_refused_at_load(tmp_path: Path, env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        config(tmp_path, **env)


def test_a_missing_ca_file_is_told_with_what_to_do(tmp_path: Path) -> None:
    loaded = config(tmp_path, MRO_MQTT_URL="mqtts://localhost:8883", MRO_MQTT_CA_FILE=str(tmp_path / "nope.pem"))
    with pytest.raises(TlsProblem, match=r"MRO_MQTT_CA_FILE .*nope.pem does not exist.*mro-edge certs init"):
        client_context(loaded.mqtt)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    garbage = config(tmp_path, MRO_MQTT_URL="mqtts://localhost:8883", MRO_MQTT_CA_FILE=str(tmp_path / "garbage.pem"))
    with pytest.raises(TlsProblem, match="not a PEM CA certificate"):
        client_context(garbage.mqtt)


def test_the_client_context_verifies_certificate_and_host_name(tmp_path: Path, issued: Path) -> None:
    assert client_context(config(tmp_path).mqtt) is None, "plain mqtt:// has no TLS"
    device = pki.device_paths(issued, "RFID-01")
    context = client_context(config(tmp_path, MRO_MQTT_URL="mqtts://localhost:8883",
                                    MRO_MQTT_CA_FILE=str(issued / "ca.pem"), MRO_MQTT_CERT_FILE=str(device.cert),
                                    MRO_MQTT_KEY_FILE=str(device.key)).mqtt)
    assert context is not None
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    mismatched = config(tmp_path, MRO_MQTT_URL="mqtts://localhost:8883", MRO_MQTT_CA_FILE=str(issued / "ca.pem"),
                        MRO_MQTT_CERT_FILE=str(device.cert), MRO_MQTT_KEY_FILE=str(issued / "broker.key"))
    with pytest.raises(TlsProblem, match="not a matching PEM certificate and key"):
        client_context(mismatched.mqtt)


def test_embedded_broker_listeners(tmp_path: Path, issued: Path) -> None:
    """Plain: one plain listener. mqtts://: TLS only, unless plain_listen adds a loopback one;
    broker.listen moves the TLS one; tls_client_ca_file requires client certificates."""
    assert listeners(config(tmp_path, MRO_MQTT_URL="mqtt://127.0.0.1:1884")) == [("127.0.0.1", 1884, None)]
    files = {"MRO_BROKER_TLS_CERT_FILE": str(issued / "broker.pem"),
             "MRO_BROKER_TLS_KEY_FILE": str(issued / "broker.key")}
    (only,) = listeners(config(tmp_path, MRO_MQTT_URL="mqtts://localhost:8884", **files))
    assert only[:2] == ("localhost", 8884) and isinstance(only[2], ssl.SSLContext)
    assert only[2].verify_mode == ssl.CERT_NONE, "no client certificates unless asked for"
    both = listeners(config(tmp_path, MRO_MQTT_URL="mqtts://localhost:8884", MRO_BROKER_LISTEN="0.0.0.0:8885",
                            MRO_BROKER_PLAIN_LISTEN="127.0.0.1:1885",
                            MRO_BROKER_TLS_CLIENT_CA_FILE=str(issued / "ca.pem"), **files))
    assert [(h, p, c is not None) for h, p, c in both] == [("0.0.0.0", 8885, True), ("127.0.0.1", 1885, False)]
    assert both[0][2] is not None and both[0][2].verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TlsProblem, match="MRO_BROKER_TLS_CERT_FILE"):
        listeners(config(tmp_path, MRO_MQTT_URL="mqtts://localhost:8884"))
    with pytest.raises(TlsProblem, match="does not exist"):
        server_context(config(tmp_path, MRO_BROKER_TLS_CERT_FILE="/absent.pem",
                              MRO_BROKER_TLS_KEY_FILE="/absent.key").broker)


def test_explain_names_the_cause_and_the_fix(tmp_path: Path) -> None:
    mqtt = config(tmp_path, MRO_MQTT_URL="mqtts://edge:8883", MRO_MQTT_CA_FILE="/ca.pem").mqtt
    unknown = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unknown.verify_code, unknown.verify_message = 20, "unable to get local issuer certificate"
    assert "certificate verify failed: unable to get local issuer certificate" in explain(unknown, mqtt)
    assert "set MRO_MQTT_CA_FILE" in explain(unknown, mqtt)
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.verify_code, expired.verify_message = 10, "certificate has expired"
    assert "has expired" in explain(expired, mqtt) and "mro-edge certs broker" in explain(expired, mqtt)
    wrong_host = ssl.SSLCertVerificationError(1, "certificate verify failed")
    wrong_host.verify_code, wrong_host.verify_message = 62, "Hostname mismatch, certificate is not valid for 'edge'."
    assert "does not name edge" in explain(wrong_host, mqtt)
    assert "plain MQTT" in explain(ConnectionResetError(104, "Connection reset by peer"), mqtt)
    for alert in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        refused = ssl.SSLError(1, f"[SSL: {alert}] the broker's alert")
        refused.reason = alert  # what OpenSSL sets: Mosquitto refusing our client certificate
        assert "refused this client's certificate" in explain(refused, mqtt), alert


def test_certs_init_and_device_verify_with_openssl(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tls"
    assert main(["certs", "init", "--out", str(out), "--host", "edge.hangar.example", "--ip", "10.20.30.40",
                 "--device", "RFID-01"]) == 0
    assert main(["certs", "device", "TQW-07", "--out", str(out), "--days", "30"]) == 0
    for cert in ("broker.pem", "devices/RFID-01.pem", "devices/TQW-07.pem"):
        result = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.pem"), str(out / cert)],
                                capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
    purpose = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.pem"), "-purpose", "sslserver",
                              str(out / "broker.pem")], capture_output=True, text=True)
    assert purpose.returncode == 0, purpose.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(out / "broker.pem"), "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True, check=True).stdout
    assert "DNS:edge.hangar.example" in names and "IP Address:10.20.30.40" in names
    for key in out.rglob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    from cryptography import x509

    device = x509.load_pem_x509_certificate((out / "devices" / "TQW-07.pem").read_bytes())
    lifetime = device.not_valid_after_utc - device.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, minutes=10)
    capsys.readouterr()
    assert main(["certs", "init", "--out", str(out), "--host", "x"]) == 2, "never replaces a CA"
    assert "already holds a CA" in capsys.readouterr().err
    assert main(["certs", "init", "--out", str(out), "--host", "x", "--if-missing"]) == 0
    assert main(["certs", "init", "--out", str(tmp_path / "empty")]) == 2
    assert "--host NAME" in capsys.readouterr().err
    assert main(["certs", "device", "bad id!", "--out", str(out)]) == 2


def test_printed_mosquitto_commands_carry_the_tls_options(tmp_path: Path) -> None:
    """`devices add --mosquitto-pub` and the receipt-watch hint work as pasted on mqtts://."""
    from mro_edge.cli import _pub_line, _sub_line

    plain = config(tmp_path)
    assert "--cafile" not in _pub_line(plain, "TQW-01", "torque_wrench", "pw")
    tls = config(tmp_path, MRO_MQTT_URL="mqtts://edge.hangar.example:8883", MRO_MQTT_CA_FILE="/etc/mro/ca.pem",
                 MRO_MQTT_CERT_FILE="/etc/mro/TQW-01.pem", MRO_MQTT_KEY_FILE="/etc/mro/TQW-01.key")
    line = _pub_line(tls, "TQW-01", "torque_wrench", "pw")
    assert "-h edge.hangar.example -p 8883 --cafile /etc/mro/ca.pem --cert /etc/mro/TQW-01.pem" in line, line
    assert "--key /etc/mro/TQW-01.key" in line
    assert "--cafile /etc/mro/ca.pem" in _sub_line(tls, "-u mro-services")
    system = config(tmp_path, MRO_MQTT_URL="mqtts://edge.hangar.example:8883")
    assert "--capath /etc/ssl/certs" in _pub_line(system, "TQW-01", "torque_wrench", "pw")
