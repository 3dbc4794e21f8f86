"""A private CA for MQTT over TLS, for a station that has no PKI of its own (`mro-edge certs`).

One directory holds it all: ca.pem / ca.key (the station CA), broker.pem / broker.key (the
broker's server certificate, its names from the operator's --host and --ip), and
devices/<ID>.pem / devices/<ID>.key (client certificates for mutual TLS). Keys are ECDSA
P-256 (small, fast on small hardware, supported by Mosquitto, OpenSSL, mbedTLS and paho),
PKCS#8 PEM, written 0600; certificates are X.509 v3 with the extensions `openssl verify` and
Python's strict verification expect (basic constraints, key usage, extended key usage, subject
and authority key identifiers, subject alternative names on the server certificate).
Stations with their own PKI skip all of this and point the settings at their own files.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.runtime.files import write_atomic

CA_DAYS = 3650  # the station CA: ten years, renewed with the box rather than on a schedule
LEAF_DAYS = 825  # broker and device certificates: about two years and three months
BACKDATE = datetime.timedelta(minutes=5)  # a device whose clock is a little behind still accepts it
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PkiError(Exception):
    """The CA directory cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def ca_paths(out: Path) -> Issued:
    return Issued(out / "ca.pem", out / "ca.key")


def broker_paths(out: Path) -> Issued:
    return Issued(out / "broker.pem", out / "broker.key")


def device_paths(out: Path, device_id: str) -> Issued:
    return Issued(out / "devices" / f"{device_id}.pem", out / "devices" / f"{device_id}.key")


def make_ca(out: Path, name: str, *, days: int = CA_DAYS, now: datetime.datetime | None = None) -> Issued:
    """A new self-signed station CA in `out`; refuses to replace one (every certificate it
    signed would stop verifying)."""
    paths = ca_paths(out)
    if paths.cert.exists() or paths.key.exists():
        raise PkiError(f"{out} already holds a CA ({paths.cert.name}); it is reused as it is. Remove the "
                       "directory first to start a new PKI (every certificate it signed is then worthless)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mro-edge"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = (now or _utc_now()) - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(paths, cert, key)
    return paths


def issue_broker(out: Path, hosts: list[str], ips: list[str], *, days: int = LEAF_DAYS,
                 now: datetime.datetime | None = None) -> Issued:
    """The broker's server certificate, signed by the CA in `out`; replaces an older one. Clients
    verify the host name they connect to against these names, so list every name and address
    devices and services use (e.g. edge.hangar.local, 10.20.30.40, localhost, 127.0.0.1)."""
    if not hosts and not ips:
        raise PkiError("name at least one --host or --ip for the broker's certificate: the names and "
                       "addresses devices connect to (clients verify them)")
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(f"--ip {ip!r} is not an IP address (host names go to --host)") from None
    common = hosts[0] if hosts else ips[0]
    return _issue(out, broker_paths(out), common, days, now, ExtendedKeyUsageOID.SERVER_AUTH,
                  x509.SubjectAlternativeName(names))


def issue_device(out: Path, device_id: str, *, days: int = LEAF_DAYS,
                 now: datetime.datetime | None = None) -> Issued:
    """A client certificate for one device (CN = its device id), signed by the CA in `out`."""
    if not DEVICE_ID.match(device_id):
        raise PkiError(f"device id {device_id!r}: letters, digits, '.', '_' and '-' only (up to 64)")
    return _issue(out, device_paths(out, device_id), device_id, days, now, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def _issue(out: Path, paths: Issued, common: str, days: int, now: datetime.datetime | None,
           usage: x509.ObjectIdentifier, names: x509.SubjectAlternativeName | None) -> Issued:
    ca_cert, ca_key = load_ca(out)
    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or _utc_now()) - BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mro-edge"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names is not None:
        builder = builder.add_extension(names, critical=False)
    _write(paths, builder.sign(ca_key, hashes.SHA256()), key)
    return paths


def load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(out)
    if not paths.cert.exists() or not paths.key.exists():
        raise PkiError(f"no CA in {out} (ca.pem and ca.key): run `mro-edge certs init --out {out} --host NAME` "
                       "first, or use your station's own PKI (README, \"TLS\")")
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{paths.key} is not the EC key `mro-edge certs` writes; issue with your own tools")
    return cert, key


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _write(paths: Issued, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    paths.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(paths.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), mode=0o600)
    write_atomic(paths.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
