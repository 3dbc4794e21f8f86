"""The one way the edge's services open HTTP(S) to the central gateway (uplink and heartbeat).

The gateway's certificate is verified against ``link.ca_file`` (empty: the system's CAs);
``link.client_cert``/``link.client_key`` are presented when the gateway asks for a client
certificate (mTLS). ``check_link`` runs again here, where the token header is set: a link
built by hand (not by ``load_config``) cannot send the token over plain HTTP to another host
either, unless ``link.allow_token_over_plain_http`` says so.
"""

from __future__ import annotations

import ssl

import httpx

from shared.runtime.config import ConfigError, LinkConfig, check_link


def ssl_context(link: LinkConfig) -> ssl.SSLContext:
    """Verify the gateway (hostname and chain, TLS 1.2 or later) and carry the client certificate."""
    context = ssl.create_default_context(cafile=link.ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if link.client_cert:
        try:
            context.load_cert_chain(link.client_cert, link.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the link's client certificate {link.client_cert!r} with key "
                              f"{link.client_key!r}: {exc}; give a PEM certificate and its unencrypted key") from None
    return context


def gateway_http(link: LinkConfig, *, timeout_s: float, token: str | None = None) -> httpx.Client:
    """An httpx client for ``link.gateway_url``; with ``token``, every request carries it as Bearer."""
    check_link(link)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=link.gateway_url.rstrip("/"), timeout=timeout_s, headers=headers,
                        verify=ssl_context(link))
