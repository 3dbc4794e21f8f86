"""A TCP proxy the tests control, standing in for the WAN link between the box and the gateway.

Modes: `pass`, `latency` (each direction delayed), `refuse` (nothing listens: connection
refused), `drop` (accept, then reset), `http503` (answer 503 at once), `blackhole` (accept and
never answer). Loopback only.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

from tests.brokers import free_port


class LinkFault:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.mode = "pass"
        self.latency_s = 0.0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._listen())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def set(self, mode: str, latency_s: float = 0.0) -> None:
        """Switch mode; existing connections are cut so the new mode applies at once."""
        if mode == "refuse":
            self._call(self._close())
        elif self._server is None:
            self._call(self._listen())
        self.mode, self.latency_s = mode, latency_s

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        try:
            if mode == "drop":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
                return
            if mode == "http503":
                await reader.read(65536)
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            if mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                                 return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode != "pass" and self.mode != "latency":
                    break
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
