"""HTTPS between the edge and the gateway: the gateway serves TLS itself (mTLS optional), the
uplink and heartbeat verify it against the configured CA and present their client certificate.

The CA, server and client certificates are made per module with openssl (tests/support/tls.py);
a second, unrelated CA plays the attacker's. Real gateways, real uplink and heartbeat processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from services.gateway.admin import register_edge
from services.uplink.client import GatewayClient, GatewayUnavailable
from shared.ledger.keys import SigningKey
from shared.runtime.config import LinkConfig
from tests.edge import EdgeStack, database
from tests.pipeline import ROOT
from tests.support.gateway import ThreadedGateway
from tests.support.tls import TestCA

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("pki")
    ca = TestCA(root / "ca")
    wrong = TestCA(root / "wrong", "attacker-ca")
    return SimpleNamespace(ca=ca, server=ca.server("gateway"), client=ca.client("edge"), wrong=wrong,
                           wrong_server=wrong.server("impostor"), wrong_client=wrong.client("rogue"))


def _head(url: str, token: str, **link: str) -> int:
    """The gateway's head seq through the uplink's own client (closed after: an idle TLS
    connection left open would hold the gateway's shutdown for its SSL shutdown timeout)."""
    client = GatewayClient(LinkConfig(gateway_url=url, **link), token, 10)
    try:
        return client.head().seq
    finally:
        client.close()


def _registered(db_url: str) -> str:
    return register_edge(db_url, "mro-edge/TLS1", SigningKey.generate().public_pem())


def test_the_uplink_client_verifies_the_gateway_against_the_configured_ca(tmp_path: Path, pki) -> None:
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    cert, key = pki.server
    with ThreadedGateway(db_url, tls_cert=str(cert), tls_key=str(key)) as gw:
        token = _registered(db_url)
        assert gw.url.startswith("https://")
        assert _head(gw.url, token, ca_file=str(pki.ca.cert)) == -1
        for refused in ({"ca_file": str(pki.wrong.cert)}, {}):  # another CA; the system's CAs
            with pytest.raises(GatewayUnavailable, match="ConnectError"):
                _head(gw.url, token, **refused)
        with pytest.raises(httpx.HTTPError):  # the TLS port does not answer plain HTTP
            httpx.get(gw.url.replace("https://", "http://") + "/health", timeout=5)


def test_a_gateway_with_a_certificate_from_another_ca_is_refused(tmp_path: Path, pki) -> None:
    """The impostor: a gateway at the right address whose certificate our CA did not sign."""
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    cert, key = pki.wrong_server
    with ThreadedGateway(db_url, tls_cert=str(cert), tls_key=str(key)) as gw:
        token = _registered(db_url)
        with pytest.raises(GatewayUnavailable):
            _head(gw.url, token, ca_file=str(pki.ca.cert))


def test_mtls_refuses_a_client_without_a_certificate_of_the_client_ca(tmp_path: Path, pki) -> None:
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    cert, key = pki.server
    with ThreadedGateway(db_url, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki.ca.cert)) as gw:
        token = _registered(db_url)
        ca = {"ca_file": str(pki.ca.cert)}
        with pytest.raises(GatewayUnavailable):
            _head(gw.url, token, **ca)
        rogue_cert, rogue_key = pki.wrong_client
        with pytest.raises(GatewayUnavailable):
            _head(gw.url, token, **ca, client_cert=str(rogue_cert), client_key=str(rogue_key))
        client_cert, client_key = pki.client
        assert _head(gw.url, token, **ca, client_cert=str(client_cert), client_key=str(client_key)) == -1
        # the certificate is not instead of the token: both are required
        with pytest.raises(Exception, match="401"):
            _head(gw.url, "not-a-token", **ca, client_cert=str(client_cert), client_key=str(client_key))


def _tls_stack_env(pki) -> tuple[dict, dict]:
    cert, key = pki.server
    client_cert, client_key = pki.client
    gateway_env = {"MRO_GATEWAY_TLS_CERT": str(cert), "MRO_GATEWAY_TLS_KEY": str(key),
                   "MRO_GATEWAY_TLS_CLIENT_CA": str(pki.ca.cert), "ca_file": str(pki.ca.cert),
                   "client_cert": (str(client_cert), str(client_key))}
    link = {"MRO_LINK_CA_FILE": str(pki.ca.cert), "MRO_LINK_CLIENT_CERT": str(client_cert),
            "MRO_LINK_CLIENT_KEY": str(client_key)}
    return gateway_env, link


def test_uplink_and_heartbeat_push_over_mtls(tmp_path: Path, pki) -> None:
    gateway_env, link = _tls_stack_env(pki)
    with database("sqlite", tmp_path) as url, EdgeStack(tmp_path, url, gateway_env=gateway_env, **link) as edge:
        assert edge.config.link.gateway_url.startswith("https://")
        edge.send(60)
        edge.wait_uplink(lambda s: s.get("in_sync") and s.get("acked_seq") == 59, timeout_s=60,
                         what="the uplink to push all 60 entries over HTTPS")
        edge.assert_gateway_has_ledger(60)


def test_uplink_and_heartbeat_refuse_a_gateway_their_ca_did_not_sign(tmp_path: Path, pki) -> None:
    gateway_env, link = _tls_stack_env(pki)
    with database("sqlite", tmp_path) as url, \
            EdgeStack(tmp_path, url, gateway_env=gateway_env, start_link=False, **link) as edge:
        wrong = {"MRO_LINK_CA_FILE": str(pki.wrong.cert)}
        edge.start_heartbeat(**wrong)
        edge.start_uplink(**wrong)
        edge.wait_state("ISOLATED", timeout_s=60)
        edge.send(20)
        assert edge.gateway_count() == 0, "entries reached a gateway the box could not verify"
        alarms = [a for a in edge.alarms() if a.get("alarm") == "link_tls"]
        assert len(alarms) == 1, edge.alarms()
        assert "gateway TLS handshake failed" in alarms[0]["detail"] and "link.ca_file" in alarms[0]["detail"]


def test_the_uplink_service_refuses_a_token_over_plain_http_to_another_host(tmp_path: Path) -> None:
    env = dict(os.environ, MRO_DATA_DIR=str(tmp_path), MRO_LINK_GATEWAY_URL="http://192.0.2.10:8443",
               MRO_LINK_TOKEN="secret-token", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "mro_edge", "service", "uplink"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert "plain HTTP to 192.0.2.10" in done.stderr and "allow_token_over_plain_http" in done.stderr
    assert "secret-token" not in done.stderr + done.stdout
