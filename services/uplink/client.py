"""HTTP(S) client of the central gateway API (services/gateway/openapi.yaml).

TLS settings (CA file, client certificate) and the refusal to send the token in clear to
another host are ``shared.runtime.gatewayhttp``'s, shared with the heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.runtime.config import Config, LinkConfig
from shared.runtime.gatewayhttp import gateway_http
from shared.runtime.messages import json_encode

JSON_CONTENT = {"Content-Type": "application/json"}


class GatewayError(Exception):
    """The gateway refused a batch for a reason retrying will not fix (fork, bad signature, auth).
    Rows before the refused one may have been committed: `head` says where the gateway is now."""

    def __init__(self, status: int, detail: dict):
        self.status = status
        self.detail = detail
        message = {k: v for k, v in detail.items() if k != "head"}
        super().__init__(f"gateway refused the batch ({status}): {message}")

    @property
    def head(self) -> Head | None:
        head = self.detail.get("head")
        return Head(head["seq"], head["hash"]) if isinstance(head, dict) else None


class GatewayUnavailable(Exception):
    """Network error, timeout or 5xx: worth retrying later."""


class GapError(GatewayError):
    """The gateway expects an earlier seq than the one we sent."""

    @property
    def expected_seq(self) -> int:
        return int(self.detail.get("expected_seq", 0))


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


def edge_token(config: Config) -> str:
    if config.link.token:
        return config.link.token
    path = Path(config.data_path) / "uplink" / "token"
    if not path.exists():
        raise GatewayError(401, {"error": "no_token", "message": (
            f"no gateway token: set MRO_LINK_TOKEN or put it in {path} "
            "(mro-edge gateway register-edge prints one)")})
    return path.read_text().strip()


class GatewayClient:
    def __init__(self, link: LinkConfig, token: str, timeout_s: float):
        self._http = gateway_http(link, timeout_s=timeout_s, token=token)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"{method} {path}: {type(exc).__name__}") from exc
        if response.status_code >= 500:
            raise GatewayUnavailable(f"{method} {path}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise GatewayUnavailable(f"{method} {path}: unreadable answer") from None
        if response.status_code >= 400:
            error = dict(body.get("error")) if isinstance(body.get("error"), dict) else dict(body)
            if isinstance(body.get("head"), dict):
                error["head"] = body["head"]
            if error.get("code") == "gap":
                raise GapError(response.status_code, error)
            raise GatewayError(response.status_code, error)
        return body

    def push(self, rows: list[bytes]) -> Head:
        """POST a batch of ledger export rows (already JSON) in seq order; returns the new head."""
        payload = b'{"entries":[' + b",".join(rows) + b"]}"
        body = self._call("POST", "/v1/entries", content=payload, headers=JSON_CONTENT)
        return Head(body["head"]["seq"], body["head"]["hash"])

    def post_checkpoint(self, note: bytes) -> dict:
        """POST a signed checkpoint note; returns the gateway's answer with its cosignature."""
        payload = b'{"checkpoint":' + json_encode(note.decode("utf-8")) + b"}"
        return self._call("POST", "/v1/checkpoints", content=payload, headers=JSON_CONTENT)

    def head(self) -> Head:
        body = self._call("GET", "/v1/head")
        return Head(body["seq"], body["hash"])


class GatewaySession:
    """The gateway client, made when first needed and shared by the drain and the cosign."""

    def __init__(self, config: Config, client: GatewayClient | None = None):
        self.config = config
        self._client = client

    def client(self) -> GatewayClient:
        if self._client is None:
            self._client = GatewayClient(self.config.link, edge_token(self.config),
                                         self.config.uplink.request_timeout_s)
        return self._client

    def refused(self, exc: GatewayError) -> None:
        """401: the token is missing or not (any more) registered. Read it again next time, so a
        token put in place by the operator works without a restart."""
        if exc.status == 401:
            self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
