"""A TCP proxy the tests control, standing in for the WAN link between the box and the gateway.

The box talks to `LinkFault.url`; the proxy forwards to the real gateway on `target_port`.
Modes (switch with `set`; every open connection is reset at once, so the new mode applies to
the very next request, also on kept-alive connections):

- `pass`       forward both ways;
- `latency`    forward, delaying every chunk by `latency_s` in each direction (a request and
               its answer take about 2 x latency_s longer); a latency beyond the client's
               timeout is a timeout;
- `refuse`     nothing listens: connection refused;
- `drop`       accept, then reset the connection at once (connection reset by peer);
- `cut`        forward the request, then reset the connection as soon as the gateway starts
               to answer: the gateway did the work, the box never hears about it;
- `http_error` answer every request with HTTP `status` (default 503) at once;
- `blackhole`  accept and read, never answer (the client's timeout is the only way out).
- `health_only` forward a connection whose first request is `GET /health`, answer anything else
               with HTTP `status`: small probes get through, uploads do not (like a middlebox
               or an MTU black hole that only lets small requests by).

Loopback only. Counters of accepted connections per mode are in `accepted`; in the modes that
read requests before deciding (http_error, blackhole, health_only) the request lines are kept in
`requests`, so a test can tell a health probe from an upload.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter

from tests.brokers import free_port

MODES = ("pass", "latency", "refuse", "drop", "cut", "http_error", "blackhole", "health_only")
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with RST (SO_LINGER 0), not FIN: what a peer sees when a link or middlebox drops it."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class LinkFault:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target_host = target_host
        self.target_port = target_port
        self.port = free_port()
        self.mode = "pass"
        self.latency_s = 0.0
        self.status = 503
        self.accepted: Counter[str] = Counter()
        self.requests: list[tuple[float, str, str]] = []  # (monotonic, mode, request line) where seen
        self._conns: set[asyncio.BaseTransport] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="linkfault", daemon=True)
        self._thread.start()
        self._call(self._listen())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LinkFault:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _apply(self, mode: str, latency_s: float, status: int) -> None:
        self.mode, self.latency_s, self.status = mode, latency_s, status
        for transport in list(self._conns):
            _reset(transport)
        self._conns.clear()
        if mode == "refuse":
            await self._stop_listening()
        elif self._server is None:
            await self._listen()

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def set(self, mode: str, latency_s: float = 0.0, status: int = 503) -> None:
        """Switch mode; open connections are reset so the new mode applies at once."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} must be one of {MODES}")
        if mode == "latency" and latency_s <= 0:
            raise ValueError("latency mode needs latency_s > 0")
        self._call(self._apply(mode, latency_s, status))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._apply("refuse", 0.0, 503))
        self._call(self._cancel_tasks())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # one client connection
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode, latency_s, status = self.mode, self.latency_s, self.status
        self.accepted[mode] += 1
        client = writer.transport
        self._conns.add(client)
        upstream: asyncio.StreamWriter | None = None
        try:
            if mode == "drop":
                _reset(client)
            elif mode == "http_error":
                await self._answer_error(reader, writer, status)
            elif mode == "health_only":
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                self._note(mode, line)
                if not line.startswith(b"GET /health "):
                    await self._write_error(writer, status)
                    return
                try:
                    up_reader, upstream = await asyncio.open_connection(self.target_host, self.target_port)
                except OSError:
                    _reset(client)
                    return
                self._conns.add(upstream.transport)
                # one request per connection, so the next one is judged on its own
                upstream.write(head[:-2] + b"Connection: close\r\n\r\n")
                await asyncio.gather(self._pipe(reader, upstream, 0.0), self._pipe(up_reader, writer, 0.0),
                                     return_exceptions=True)
            elif mode == "blackhole":
                self._note(mode, await reader.readline())
                while await reader.read(65536):
                    pass
            else:  # pass, latency, cut
                try:
                    up_reader, upstream = await asyncio.open_connection(self.target_host, self.target_port)
                except OSError:
                    _reset(client)  # the gateway itself is down: the box sees a reset
                    return
                self._conns.add(upstream.transport)
                delay = latency_s if mode == "latency" else 0.0
                await asyncio.gather(
                    self._pipe(reader, upstream, delay),
                    self._pipe(up_reader, writer, delay, cut=(mode == "cut")),
                    return_exceptions=True,
                )
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._conns.discard(w.transport)
                    if not w.transport.is_closing():
                        w.close()

    def _note(self, mode: str, line: bytes) -> None:
        if line:
            self.requests.append((time.monotonic(), mode, line.decode("latin-1").strip()))

    def requests_since(self, since: float) -> list[str]:
        """Request lines (`GET /health HTTP/1.1`) seen in the modes that read them (http_error,
        blackhole) after `since` (time.monotonic())."""
        return [line for at, _mode, line in list(self.requests) if at >= since]

    async def _answer_error(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self._note("http_error", head.split(b"\r\n", 1)[0])
        await self._write_error(writer, status)

    @staticmethod
    async def _write_error(writer: asyncio.StreamWriter, status: int) -> None:
        reason = _REASONS.get(status, "Error")
        body = b'{"error":{"code":"proxy","message":"injected by the test link"}}'
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                    cut: bool = False) -> None:
        """Copy one direction. With a delay every chunk leaves `delay` seconds after it arrived
        (a long link, not a slow one: chunks in flight overlap)."""
        if delay:
            await self._delayed_pipe(reader, writer, delay)
            return
        try:
            while data := await reader.read(65536):
                if cut:
                    _reset(writer.transport)
                    return
                writer.write(data)
                await writer.drain()
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def _delayed_pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((self._loop.time() + delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            if not writer.transport.is_closing():
                writer.close()
