"""The link settings refuse a bearer token in clear to another host, and name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.uplink.client import GatewayClient
from shared.runtime.config import ConfigError, LinkConfig, is_loopback, load_config


def _load(tmp_path: Path, **env: str):
    return load_config(env={"MRO_DATA_DIR": str(tmp_path), **env})


@pytest.mark.parametrize("url", ["http://192.0.2.10:8443", "http://lake.example.org", "http://[2001:db8::1]:80"])
def test_plain_http_to_another_host_is_refused_with_what_to_do(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, MRO_LINK_GATEWAY_URL=url, MRO_LINK_TOKEN="t")
    message = str(refused.value)
    assert "https://" in message and "allow_token_over_plain_http" in message and "MRO_LINK_CA_FILE" in message


def test_the_explicit_override_allows_plain_http(tmp_path: Path) -> None:
    config = _load(tmp_path, MRO_LINK_GATEWAY_URL="http://192.0.2.10:8443",
                   MRO_LINK_ALLOW_TOKEN_OVER_PLAIN_HTTP="true")
    assert config.link.allow_token_over_plain_http is True


@pytest.mark.parametrize("url", ["http://127.0.0.1:8443", "http://localhost:8443", "http://[::1]:8443",
                                 "https://lake.example.org:8443", "https://192.0.2.10"])
def test_loopback_and_https_need_no_override(tmp_path: Path, url: str) -> None:
    assert _load(tmp_path, MRO_LINK_GATEWAY_URL=url).link.gateway_url == url


def test_the_local_gateway_url_follows_its_tls_setting(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    config = _load(tmp_path, MRO_GATEWAY_LISTEN="0.0.0.0:9443", MRO_GATEWAY_TLS_CERT=str(cert),
                   MRO_GATEWAY_TLS_KEY=str(cert))
    assert config.link.gateway_url == "https://127.0.0.1:9443"
    assert _load(tmp_path, MRO_GATEWAY_LISTEN="0.0.0.0:9443").link.gateway_url == "http://127.0.0.1:9443"


def test_tls_files_must_exist_and_go_in_pairs(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    with pytest.raises(ConfigError, match="is not a file"):
        _load(tmp_path, MRO_LINK_CA_FILE=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="go together"):
        _load(tmp_path, MRO_LINK_CLIENT_CERT=str(pem))
    with pytest.raises(ConfigError, match="go together"):
        _load(tmp_path, MRO_GATEWAY_TLS_CERT=str(pem))
    with pytest.raises(ConfigError, match="needs gateway.tls_cert"):
        _load(tmp_path, MRO_GATEWAY_TLS_CLIENT_CA=str(pem))


def test_a_client_built_by_hand_refuses_too() -> None:
    """Defence in depth: the rule holds where the Authorization header is set, not only at load."""
    with pytest.raises(ConfigError, match="plain HTTP"):
        GatewayClient(LinkConfig(gateway_url="http://192.0.2.10:8443"), "secret-token", 5)


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                           ("localhost", True), ("10.0.0.1", False), ("example.org", False),
                                           ("localhost.example.org", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
