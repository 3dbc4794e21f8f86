"""The gateway's HTTP service (Starlette on uvicorn); the API is written down in openapi.yaml.

Requests are parsed on the event loop; checking and storing a batch (signature verification,
one database transaction) runs in a worker thread, so ``GET /health`` answers at once even
while a large batch is being stored. A batch is committed before it is acknowledged, and
uvicorn finishes the requests in flight on SIGTERM before the database is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway.checkpoints import Cosigner, accept_checkpoint, checkpoint_decoder
from services.gateway.ingest import batch_decoder, ingest_batch
from services.gateway.storage import Storage, StorageError, check_url, open_storage
from shared.runtime.clock import utc_now
from shared.runtime.logs import get_logger

MAX_BATCH_ENTRIES = 10_000
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_CHECKPOINT_BYTES = 64 * 1024
COSIGNER_NAME = "mro-gateway"

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway needs to run; ``from_config`` reads the ``[gateway]`` section."""

    db_url: str = "sqlite:///./var/gateway/gateway.db"
    host: str = "127.0.0.1"
    port: int = 8443
    duplicate_window_days: int = 30
    max_batch_entries: int = MAX_BATCH_ENTRIES
    max_body_bytes: int = MAX_BODY_BYTES
    pool_size: int = 4
    key_dir: str = ""  # the cosigner key's directory; empty: see ``cosigner_key_dir``
    cosigner_name: str = COSIGNER_NAME

    @classmethod
    def from_config(cls, config: Any) -> GatewaySettings:
        """From a ``shared.runtime.config.Config`` (its ``gateway`` section) or the section itself."""
        section = getattr(config, "gateway", config)
        host, port = split_listen(section.listen)
        data_dir = getattr(config, "data_path", None)
        return cls(db_url=getattr(config, "gateway_db_url", section.db_url), host=host, port=port,
                   duplicate_window_days=int(section.duplicate_window_days),
                   key_dir=str(section.key_dir or (Path(data_dir) / "gateway" / "keys" if data_dir else "")),
                   cosigner_name=section.cosigner_name or COSIGNER_NAME)

    @property
    def cosigner_key_dir(self) -> Path:
        """``key_dir``, else ``keys/`` beside a SQLite database, else ``./var/gateway/keys``."""
        if self.key_dir:
            return Path(self.key_dir)
        if self.db_url.startswith("sqlite:///"):
            return Path(self.db_url[len("sqlite:///"):]).parent / "keys"
        return Path("var") / "gateway" / "keys"


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError with the expected form."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"gateway listen {listen!r} must look like HOST:PORT, e.g. 127.0.0.1:8443")
    return host, int(port)


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(body), status_code=status, headers=headers, media_type="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


class _Unauthorized(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Gateway:
    """The request handlers, bound to one storage and one duplicate window."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.window = timedelta(days=settings.duplicate_window_days)
        self.storage: Storage | None = None
        self.cosigner: Cosigner | None = None
        self.log = get_logger(component="gateway")

    def open(self) -> None:
        self.cosigner = Cosigner.load_or_create(self.settings.cosigner_key_dir, self.settings.cosigner_name)
        self.storage = open_storage(self.settings.db_url, self.settings.pool_size)
        self.log.info("gateway storage open", storage=repr(self.storage),
                      duplicate_window_days=self.settings.duplicate_window_days, cosigner=self.cosigner.vkey)

    def close(self) -> None:
        if self.storage is not None:
            self.storage.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(self.open)
        try:
            yield
        finally:
            self.close()

    # -- auth
    def _origin(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Unauthorized("unauthenticated", "send 'Authorization: Bearer <token>' "
                                "(mro-edge gateway register-edge prints the token of an edge)")
        assert self.storage is not None
        with self.storage.transaction(write=False) as tx:
            origin = tx.origin_for_token(token_sha256(token.strip()))
        if origin is None:
            raise _Unauthorized("invalid_token", "the bearer token is not registered at this gateway")
        return origin

    async def _authenticated(self, request: Request) -> str | Response:
        try:
            return await anyio.to_thread.run_sync(self._origin, request)
        except _Unauthorized as exc:
            return _error(401, exc.code, exc.message, {"WWW-Authenticate": 'Bearer realm="mro-gateway"'})
        except StorageError as exc:
            return self._unavailable(exc)

    def _unavailable(self, exc: Exception) -> Response:
        self.log.error("gateway storage unavailable", error=str(exc))
        return _error(503, "storage_unavailable", "the gateway cannot reach its database; retry later",
                      {"Retry-After": "5"})

    # -- routes
    async def health(self, _request: Request) -> Response:
        return _json({"status": "ok"})

    async def head(self, request: Request) -> Response:
        origin = await self._authenticated(request)
        if isinstance(origin, Response):
            return origin

        def read() -> tuple[int, str]:
            assert self.storage is not None
            with self.storage.transaction(write=False) as tx:
                return tx.head(origin)

        try:
            seq, hash_ = await anyio.to_thread.run_sync(read)
        except StorageError as exc:
            return self._unavailable(exc)
        return _json({"origin": origin, "seq": seq, "hash": hash_})

    async def post_entries(self, request: Request) -> Response:
        origin = await self._authenticated(request)
        if isinstance(origin, Response):
            return origin
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(413, "body_too_large", f"a request body may hold at most {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, "body_too_large", f"a request body may hold at most {limit} bytes")
            chunks.append(chunk)
        try:
            batch = batch_decoder.decode(b"".join(chunks))
        except msgspec.DecodeError as exc:
            return _error(400, "malformed_request", f'the body must be {{"entries": [row, ...]}}: {exc}')
        if len(batch.entries) > self.settings.max_batch_entries:
            return _error(413, "batch_too_large",
                          f"{len(batch.entries)} entries; send at most {self.settings.max_batch_entries} per request")
        rows = [bytes(raw) for raw in batch.entries]

        def store():
            assert self.storage is not None
            with self.storage.transaction() as tx:
                return ingest_batch(tx, origin, rows, self.window, utc_now())

        try:
            result = await anyio.to_thread.run_sync(store)
        except StorageError as exc:
            return self._unavailable(exc)
        if result.error is not None:
            level = self.log.error if result.error.code == "fork" else self.log.warning
            level("batch refused", origin=origin, code=result.error.code, seq=result.error.seq,
                  reason=result.error.message, accepted=result.accepted, head_seq=result.head_seq)
        elif result.duplicates:
            self.log.info("business duplicates stored", origin=origin, count=len(result.duplicates))
        return _json(result.as_dict(), result.status)


    async def post_checkpoint(self, request: Request) -> Response:
        origin = await self._authenticated(request)
        if isinstance(origin, Response):
            return origin
        body = await request.body()
        if len(body) > MAX_CHECKPOINT_BYTES:
            return _error(413, "body_too_large", f"a checkpoint request may hold at most {MAX_CHECKPOINT_BYTES} bytes")
        try:
            note = checkpoint_decoder.decode(body).checkpoint
        except msgspec.DecodeError as exc:
            return _error(400, "malformed_request", f'the body must be {{"checkpoint": "<signed note>"}}: {exc}')

        def check():
            assert self.storage is not None and self.cosigner is not None
            with self.storage.transaction() as tx:
                return accept_checkpoint(tx, origin, note, self.cosigner, utc_now())

        try:
            result = await anyio.to_thread.run_sync(check)
        except StorageError as exc:
            return self._unavailable(exc)
        if result.status != 200:
            getattr(self.log, result.log)("checkpoint refused", origin=origin, **result.body["error"])
        return _json(result.body, result.status)

    async def cosigner_key(self, _request: Request) -> Response:
        assert self.cosigner is not None
        return _json(self.cosigner.describe())


def _routes(gateway: Gateway) -> list[Route]:
    return [
        Route("/health", gateway.health, methods=["GET"]),
        Route("/v1/head", gateway.head, methods=["GET"]),
        Route("/v1/entries", gateway.post_entries, methods=["POST"]),
        Route("/v1/checkpoints", gateway.post_checkpoint, methods=["POST"]),
        Route("/v1/cosigner-key", gateway.cosigner_key, methods=["GET"]),
    ]


def create_app(db_url: str | GatewaySettings, *, duplicate_window_days: int = 30) -> Starlette:
    """The ASGI app; the database is opened (schema created) at startup and closed at shutdown."""
    settings = db_url if isinstance(db_url, GatewaySettings) else GatewaySettings(
        db_url=db_url, duplicate_window_days=duplicate_window_days)
    check_url(settings.db_url)
    gateway = Gateway(settings)
    app = Starlette(routes=_routes(gateway), lifespan=gateway.lifespan)
    app.state.gateway = gateway
    return app


def uvicorn_server(settings: GatewaySettings, *, log_level: str = "info"):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus re-raising SIGTERM after the graceful shutdown: exit status 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    # log_config=None: uvicorn keeps its hands off logging, so its loggers reach the root logger,
    # which shared.runtime.logs.configure_logging renders as JSON like every other line
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, lifespan="on", log_config=None,
        access_log=False, log_level=log_level, timeout_graceful_shutdown=30,
        server_header=False, proxy_headers=False,
    )
    return Server(config)


def serve(db_url: str | GatewaySettings, host: str = "127.0.0.1", port: int = 8443, *,
          duplicate_window_days: int = 30) -> None:
    """Run the gateway until SIGTERM/SIGINT (blocking); requests in flight finish first."""
    if isinstance(db_url, GatewaySettings):
        settings = db_url
    else:
        settings = GatewaySettings(db_url=db_url, host=host, port=port, duplicate_window_days=duplicate_window_days)
    server = uvicorn_server(settings)
    server.run()
    if not server.started:
        raise SystemExit(f"the gateway did not start on {settings.host}:{settings.port} (see the log above)")


def run_gateway(config: Any) -> None:
    """``mro-edge service gateway``: serve with the ``[gateway]`` settings of ``config``."""
    from shared.runtime.logs import configure_logging

    configure_logging("gateway", getattr(config, "station", "-"))
    serve(GatewaySettings.from_config(config))
