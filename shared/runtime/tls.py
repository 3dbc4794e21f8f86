"""TLS for MQTT: the one place that turns mqtt.* / broker.* settings into ssl.SSLContexts.

Clients (MqttLink, the CLI's probes, preflight, the simulator, the supervisor's CONNACK wait)
all take `client_context`, so every one of them verifies the broker's certificate against
mqtt.ca_file (or the system trust store) AND its host name against the URL. The embedded
broker takes `server_context`. Failures become `TlsProblem`s whose message says what was
wrong and what to do, never a bare `[SSL: CERTIFICATE_VERIFY_FAILED]`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from shared.runtime.config import BrokerConfig, MqttConfig

CERTS_HINT = "`mro-edge certs init` makes a CA, a broker certificate and device certificates (README, \"TLS\")"


class TlsProblem(Exception):
    """A TLS file is missing or unusable, or a handshake failed; the message says what to do."""


def client_context(mqtt: MqttConfig) -> ssl.SSLContext | None:
    """The context every MQTT client of the project connects with; None for plain mqtt://."""
    if not mqtt.tls:
        return None
    if mqtt.ca_file:
        _readable(mqtt.ca_file, "MRO_MQTT_CA_FILE (mqtt.ca_file)", "the CA that signed the broker's certificate")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=mqtt.ca_file or None)
    except ssl.SSLError as exc:
        raise TlsProblem(f"MRO_MQTT_CA_FILE {mqtt.ca_file}: not a PEM CA certificate ({exc.reason or exc}); "
                         f"point it at the station CA's ca.pem. {CERTS_HINT}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if mqtt.cert_file:
        _load_chain(context, mqtt.cert_file, mqtt.key_file, "MRO_MQTT_CERT_FILE / MRO_MQTT_KEY_FILE")
    return context


def server_context(broker: BrokerConfig) -> ssl.SSLContext:
    """The embedded broker's TLS listener: its chain and key, and, when tls_client_ca_file is set,
    client certificates required and verified against that CA."""
    if not broker.tls_cert_file:
        raise TlsProblem("MRO_MQTT_URL is mqtts:// but the embedded broker has no certificate: set "
                         "MRO_BROKER_TLS_CERT_FILE and MRO_BROKER_TLS_KEY_FILE (broker.tls_cert_file, "
                         f"broker.tls_key_file). {CERTS_HINT}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, broker.tls_cert_file, broker.tls_key_file,
                "MRO_BROKER_TLS_CERT_FILE / MRO_BROKER_TLS_KEY_FILE")
    if broker.tls_client_ca_file:
        _readable(broker.tls_client_ca_file, "MRO_BROKER_TLS_CLIENT_CA_FILE (broker.tls_client_ca_file)",
                  "the CA that signs the devices' client certificates")
        try:
            context.load_verify_locations(cafile=broker.tls_client_ca_file)
        except ssl.SSLError as exc:
            raise TlsProblem(f"MRO_BROKER_TLS_CLIENT_CA_FILE {broker.tls_client_ca_file}: not a PEM CA "
                             f"certificate ({exc.reason or exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def explain(exc: BaseException, mqtt: MqttConfig) -> str:
    """A failed TLS handshake with the broker at mqtt.url, in words an operator can act on."""
    where = f"TLS with the broker at {mqtt.url}"
    ca = f"the CA in MRO_MQTT_CA_FILE ({mqtt.ca_file})" if mqtt.ca_file else "the system's trusted CAs"
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            return (f"{where}: certificate verify failed: {message}: the broker's certificate has expired; "
                    f"issue a new one (mro-edge certs broker --host NAME --ip ADDRESS) and restart the broker")
        if exc.verify_code == 62 or "hostname" in message.lower() or "ip address" in message.lower():
            return (f"{where}: certificate verify failed: {message}: the broker's certificate does not name "
                    f"{mqtt.host}; connect with a host name the certificate lists, or issue one that lists it "
                    "(mro-edge certs broker --host NAME --ip ADDRESS)")
        return (f"{where}: certificate verify failed: {message}: the broker's certificate is not signed by {ca}; "
                "set MRO_MQTT_CA_FILE to the CA that signed it (the ca.pem beside the broker's certificate)")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower()
        client_refused = "certificate" in reason and any(w in reason for w in ("required", "unknown", "expired",
                                                                                "bad"))
        if client_refused or "alert_unknown_ca" in reason:  # the broker knows no CA of our certificate
            return (f"{where}: the broker refused this client's certificate ({exc.reason}): it requires a "
                    "valid client certificate signed by its CA; set MRO_MQTT_CERT_FILE and MRO_MQTT_KEY_FILE "
                    "(mro-edge certs device ID makes one)")
        if "wrong version" in reason or "record layer" in reason or "packet length" in reason:
            return (f"{where}: the port does not speak TLS ({exc.reason}): it is probably the plain MQTT port; "
                    "use the broker's TLS port (8883) or mqtt:// for a plain one")
        if "eof" in reason:
            return _closed(where, exc.reason or str(exc))
        return f"{where} failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError):
        return _closed(where, exc.strerror or str(exc))
    return f"{where} failed: {type(exc).__name__}: {exc}"


def _closed(where: str, reason: str) -> str:
    return (f"{where}: the broker closed the connection during the handshake ({reason}): the port is probably "
            "plain MQTT (use the broker's TLS port, 8883), or the broker requires a client certificate "
            "this client did not present or it did not accept (set MRO_MQTT_CERT_FILE and MRO_MQTT_KEY_FILE)")


def _readable(path: str, setting: str, what: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise TlsProblem(f"{setting} {path} does not exist: it should hold {what}. {CERTS_HINT}")
    try:
        file.read_bytes()
    except OSError as exc:
        raise TlsProblem(f"{setting} {path} cannot be read ({exc.strerror}): fix its owner or mode") from None


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str, settings: str) -> None:
    _readable(cert_file, settings.split(" / ")[0], "a PEM certificate")
    _readable(key_file, settings.split(" / ")[-1], "the certificate's PEM private key")
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsProblem(f"{settings} ({cert_file}, {key_file}): not a matching PEM certificate and key "
                         f"({exc.reason or exc})") from None
