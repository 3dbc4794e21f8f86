"""The gateway's HTTP service (Starlette on uvicorn); the API is written down in openapi.yaml.

Requests are parsed on the event loop; checking and storing a batch (signature verification,
one database transaction) runs in a worker thread, so ``GET /health`` answers at once even
while a large batch is being stored. A batch is committed before it is acknowledged, and
uvicorn finishes the requests in flight on SIGTERM before the database is closed.

Every input is bounded, because the gateway faces the network:

- a request body is read by ``read_body`` only, streamed, and refused with 413 as soon as it
  passes the endpoint's limit (never more than the limit is held), or with 408 when it is not
  complete within ``body_timeout_s``; both answers close the connection;
- the request line and headers must be complete within ``header_timeout_s`` of the connection
  (or of the previous response) and within uvicorn's ``h11_max_incomplete_event_size``
  (``HeaderDeadlineProtocol``): a client dribbling one header byte every few seconds is cut off;
- an idle keep-alive connection is closed after ``keep_alive_s`` (uvicorn's ``timeout_keep_alive``);
- at most ``max_concurrent_requests`` requests are handled at once, more get 503 with
  Retry-After (``ConcurrencyLimit``); uvicorn's ``limit_concurrency`` caps open connections.

HTTPS: with ``tls_cert``/``tls_key`` the gateway serves TLS itself; with ``tls_client_ca`` as
well it requires a client certificate signed by that CA (mTLS) on top of the bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
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

from services.gateway import proofs
from services.gateway.checkpoints import Cosigner, accept_checkpoint, checkpoint_decoder
from services.gateway.ingest import batch_decoder, ingest_batch
from services.gateway.proofs import AuditAnswer
from services.gateway.storage import Storage, StorageError, check_url, open_storage
from shared.ledger.merkle import MerkleCorruptError
from shared.runtime.clock import utc_now
from shared.runtime.logs import get_logger

MAX_BATCH_ENTRIES = 10_000
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_CHECKPOINT_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
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
    tls_cert: str = ""  # PEM chain; with tls_key: serve HTTPS
    tls_key: str = ""
    tls_client_ca: str = ""  # require client certificates signed by this CA (mTLS)
    max_concurrent_requests: int = 64
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0

    @classmethod
    def from_config(cls, config: Any) -> GatewaySettings:
        """From a ``shared.runtime.config.Config`` (its ``gateway`` section) or the section itself."""
        section = getattr(config, "gateway", config)
        host, port = split_listen(section.listen)
        data_dir = getattr(config, "data_path", None)
        return cls(db_url=getattr(config, "gateway_db_url", section.db_url), host=host, port=port,
                   duplicate_window_days=int(section.duplicate_window_days),
                   key_dir=str(section.key_dir or (Path(data_dir) / "gateway" / "keys" if data_dir else "")),
                   cosigner_name=section.cosigner_name or COSIGNER_NAME,
                   tls_cert=section.tls_cert, tls_key=section.tls_key, tls_client_ca=section.tls_client_ca,
                   max_concurrent_requests=int(section.max_concurrent_requests),
                   max_connections=int(section.max_connections),
                   header_timeout_s=float(section.header_timeout_s), body_timeout_s=float(section.body_timeout_s),
                   keep_alive_s=float(section.keep_alive_s))

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

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


# the client is still sending (or stalling) a body we will not read: end the connection
_CLOSE = {"Connection": "close"}


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes | Response:
    """The request body, or the 413/408 answer: streamed, never more than ``limit`` bytes held.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body
    is counted as it arrives and refused the moment it passes the limit. The whole body must
    arrive within ``timeout_s`` (a stalled or trickling upload holds a connection and a
    concurrency slot). Every endpoint that takes a body reads it here.
    """
    too_large = _error(413, "body_too_large", f"a request body here may hold at most {limit} bytes", _CLOSE)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return too_large
    body = bytearray()
    with anyio.move_on_after(timeout_s) as scope:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                return too_large
            body += chunk
    if scope.cancelled_caught:
        return _error(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s", _CLOSE)
    return bytes(body)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Throttled:
    """At most one log line per ``interval_s`` for an event a flood repeats, with the count since
    the last line: a flood of refused requests must not become a flood of log lines."""

    def __init__(self, event: str, interval_s: float = 5.0) -> None:
        self.event = event
        self.interval_s = interval_s
        self.count = 0
        self._last = float("-inf")
        self.log = get_logger(component="gateway")

    def __call__(self, **fields: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self.log.warning(self.event, count=self.count, **fields)
            self.count, self._last = 0, now


class ConcurrencyLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in the app at once; the next one gets 503
    at once (with Retry-After) instead of queueing behind them."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.active = 0
        self._refused = Throttled("requests refused: concurrency limit")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            self._refused(limit=self.limit)
            busy = _error(503, "busy", f"the gateway is handling {self.limit} requests; retry later",
                          {"Retry-After": "1", **_CLOSE})
            await busy(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _Forbidden(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _BadQuery(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _int_param(request: Request, name: str, default: int | None = None, *, minimum: int = 0) -> int | None:
    """An optional non-negative integer query parameter; _BadQuery naming it when malformed."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 19 or int(raw) < minimum:
        raise _BadQuery("bad_parameter", f"query parameter {name}={raw[:40]!r} must be an integer >= {minimum}")
    return int(raw)


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
        self.served: dict[str, int] = {}  # audit answers given, by kind (GET /metrics)
        self.log = get_logger(component="gateway")

    def open(self) -> None:
        # storage first: it makes a new SQLite directory 0700 before the key directory lands in it
        self.storage = open_storage(self.settings.db_url, self.settings.pool_size)
        try:
            self.cosigner = Cosigner.load_or_create(self.settings.cosigner_key_dir, self.settings.cosigner_name)
        except BaseException:
            self.storage.close()
            raise
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

    def _reader_origin(self, request: Request) -> str:
        """The origin a read-only audit request may read: ``?origin=`` (default: the token's own).

        An edge's token reads its own origin only (403 otherwise); an auditor's token
        (``mro-edge gateway register-auditor``) reads any origin and pushes nothing.
        """
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Unauthorized("unauthenticated", "send 'Authorization: Bearer <token>' (an auditor's token from "
                                "mro-edge gateway register-auditor, or the edge's own)")
        wanted = request.query_params.get("origin")
        digest = token_sha256(token.strip())
        assert self.storage is not None
        with self.storage.transaction(write=False) as tx:
            own = tx.origin_for_token(digest)
            auditor = None if own is not None else tx.auditor_for_token(digest)
        if own is not None:
            if wanted is not None and wanted != own:
                raise _Forbidden(f"this edge token reads origin {own!r} only; an auditor's token reads any origin")
            return own
        if auditor is None:
            raise _Unauthorized("invalid_token", "the bearer token is not registered at this gateway")
        if not wanted:
            raise _BadQuery("missing_origin", "an auditor's token must name the origin: ?origin=<origin>")
        return wanted

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
        body = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        if isinstance(body, Response):
            return body
        try:
            batch = batch_decoder.decode(body)
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
        if result.time_backwards:
            first = result.time_backwards[0]
            self.log.warning("recorded_at goes backwards", origin=origin, count=len(result.time_backwards),
                             seq=first.seq, previous_seq=first.previous_seq, state_transition="TIME_BACKWARDS")
        return _json(result.as_dict(), result.status)


    async def post_checkpoint(self, request: Request) -> Response:
        origin = await self._authenticated(request)
        if isinstance(origin, Response):
            return origin
        body = await read_body(request, MAX_CHECKPOINT_BYTES, self.settings.body_timeout_s)
        if isinstance(body, Response):
            return body
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

    # -- read-only audit routes (services.gateway.proofs)
    async def _audit(self, request: Request, kind: str,
                     answer: Callable[[Any, str, Request], AuditAnswer]) -> Response:
        """Authenticate a reader, parse its query, answer from one read-only transaction."""

        def read() -> AuditAnswer:
            origin = self._reader_origin(request)
            assert self.storage is not None
            with self.storage.transaction(write=False) as tx:
                return answer(tx, origin, request)

        try:
            result = await anyio.to_thread.run_sync(read)
        except _Unauthorized as exc:
            return _error(401, exc.code, exc.message, {"WWW-Authenticate": 'Bearer realm="mro-gateway"'})
        except _Forbidden as exc:
            return _error(403, "forbidden", exc.message)
        except _BadQuery as exc:
            return _error(400, exc.code, exc.message)
        except StorageError as exc:
            return self._unavailable(exc)
        except MerkleCorruptError as exc:
            self.log.error("merkle tree damaged", kind=kind, error=str(exc))
            return _error(500, "tree_damaged", "the gateway's Merkle tree for this origin is damaged; "
                                               "the operator must investigate (nothing is repaired silently)")
        if result.status == 200:
            self.served[kind] = self.served.get(kind, 0) + 1
        return _json(result.body, result.status)

    async def inclusion_proof(self, request: Request) -> Response:
        def answer(tx, origin: str, req: Request) -> AuditAnswer:
            index = _int_param(req, "index")
            if index is None:
                raise _BadQuery("bad_parameter", "query parameter index=<leaf index (seq)> is required")
            return proofs.inclusion(tx, origin, index, _int_param(req, "size", minimum=1))

        return await self._audit(request, "inclusion", answer)

    async def consistency_proof(self, request: Request) -> Response:
        def answer(tx, origin: str, req: Request) -> AuditAnswer:
            first = _int_param(req, "first", minimum=1)
            if first is None:
                raise _BadQuery("bad_parameter", "query parameter first=<older tree size> is required")
            return proofs.consistency(tx, origin, first, _int_param(req, "second", minimum=1))

        return await self._audit(request, "consistency", answer)

    async def list_checkpoints(self, request: Request) -> Response:
        def answer(tx, origin: str, req: Request) -> AuditAnswer:
            from_size = _int_param(req, "from_size", 0)
            limit = _int_param(req, "limit", proofs.DEFAULT_CHECKPOINT_PAGE, minimum=1)
            order = req.query_params.get("order", "oldest")
            if order not in ("oldest", "newest"):
                raise _BadQuery("bad_parameter", "query parameter order must be 'oldest' (default) or 'newest'")
            assert from_size is not None and limit is not None and self.cosigner is not None
            return proofs.checkpoints(tx, origin, from_size, _int_param(req, "to_size"),
                                      min(limit, proofs.MAX_CHECKPOINT_PAGE), order == "newest", self.cosigner.vkey)

        return await self._audit(request, "checkpoints", answer)

    async def list_keys(self, request: Request) -> Response:
        return await self._audit(request, "keys", lambda tx, origin, _req: proofs.key_registry(tx, origin))

    async def metrics(self, _request: Request) -> Response:
        """Prometheus figures per origin, without a token like /health: a scraper has none, and
        they are numbers about chains, no record content (services.gateway.metrics)."""
        from services.gateway.metrics import exposition

        def read() -> bytes:
            assert self.storage is not None
            with self.storage.transaction(write=False) as tx:
                figures = tx.origin_figures()
            return exposition(figures, time.time(), dict(self.served))

        try:
            body = await anyio.to_thread.run_sync(read)
        except StorageError as exc:
            return self._unavailable(exc)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def cosigner_key(self, _request: Request) -> Response:
        assert self.cosigner is not None
        return _json(self.cosigner.describe())


def _routes(gateway: Gateway) -> list[Route]:
    return [
        Route("/health", gateway.health, methods=["GET"]),
        Route("/v1/head", gateway.head, methods=["GET"]),
        Route("/v1/entries", gateway.post_entries, methods=["POST"]),
        Route("/v1/checkpoints", gateway.post_checkpoint, methods=["POST"]),
        Route("/v1/checkpoints", gateway.list_checkpoints, methods=["GET"]),
        Route("/v1/proofs/inclusion", gateway.inclusion_proof, methods=["GET"]),
        Route("/v1/proofs/consistency", gateway.consistency_proof, methods=["GET"]),
        Route("/v1/keys", gateway.list_keys, methods=["GET"]),
        Route("/v1/cosigner-key", gateway.cosigner_key, methods=["GET"]),
        Route("/metrics", gateway.metrics, methods=["GET"]),
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


def _header_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for a request's line and headers.

    uvicorn cancels its keep-alive timer on every byte received, so a client that sends one
    header byte every few seconds would hold the connection for ever. Here a timer starts when
    the connection is made (and again after each response) and is only cancelled when h11 has
    parsed a complete request head; when it fires, the connection is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    too_slow = Throttled("connections closed: request headers too slow")

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                too_slow(header_timeout_s=header_timeout_s)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head was parsed: the app has it now
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
                self._arm()  # the next request's head has the same deadline

    return HeaderDeadlineProtocol


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
    tls: dict[str, Any] = {}
    if settings.tls_cert:
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
        if settings.tls_client_ca:
            tls |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    app = ConcurrencyLimit(create_app(settings), settings.max_concurrent_requests)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, lifespan="on", log_config=None,
        access_log=False, log_level=log_level, timeout_graceful_shutdown=30,
        server_header=False, proxy_headers=False, http=_header_deadline_protocol(settings.header_timeout_s),
        timeout_keep_alive=max(1, round(settings.keep_alive_s)), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=settings.max_connections, **tls,
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
