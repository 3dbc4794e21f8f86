"""An Open Protocol torque controller of our own: the controller side over asyncio TCP.

For the integration tests and `make run --simulate`. It speaks what `services.torque.client`
needs, with the behaviour a real controller shows where it matters for data safety:

* MID 0001 -> 0002 at the asked revision, or 0004 error 97 above `max_comm_revision`
  (96 if the connection already started);
* MID 0060 -> 0005, or 0004 error 97 above `max_result_revision` (09 if already subscribed);
* MID 0061 results one at a time: the next is sent only after the 0062 for the previous one;
  without a 0062 the same result is sent again after `ack_timeout_s`, up to `retries` times,
  then the connection is closed (as the device manuals describe "Ack Timeout" / "Retries");
* results live in the controller, not in the connection: whatever was not acknowledged is
  sent again after the next subscription, oldest first (also after `stop()` / `start()`);
* MID 9999 is mirrored; a link silent for `link_timeout_s` is closed, as controllers do;
* MID 0040 -> 0041 at the asked revision, or 0004 error 97 above `max_tool_revision`.

Counters (`sent`, `acknowledged`, `acks_received`, `keepalives`, `connections`) let tests see what happened.
Standalone: `python -m mro_edge.simulator.openprotocol --port 4545 --zone Europe/Berlin
--every 5` serves one controller that tightens every 5 seconds until interrupted (`--count N`:
N tightenings, then it keeps serving). `--state FILE` is the controller's result memory: every
result and every 0062 is written there before the simulator goes on, so a controller killed
(kill -9) and started again sends what was not acknowledged, as a real one does after a power
cycle (one acknowledged just before the kill may come again: the box answers it as a duplicate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from services.devices.profiles.open_protocol.simulator import local_stamp, tightening_result
from services.torque.codec import DecodeError, FrameSplitter, FramingError
from services.torque.mids import (
    ERR_CLIENT_ALREADY_CONNECTED,
    ERR_REVISION_UNSUPPORTED,
    ERR_SUBSCRIPTION_EXISTS,
    ERR_UNKNOWN_MID,
    Body,
    CommandAccepted,
    CommandError,
    CommStart,
    CommStartAck,
    CommStop,
    KeepAlive,
    ResultAck,
    ResultSubscribe,
    TighteningResult,
    ToolData,
    ToolDataRequest,
    decode,
    encode,
)


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.started = False
        self.subscribed_revision: int | None = None
        self.no_ack = False
        self.acked = asyncio.Event()
        self.acked_at = 0.0

    async def send(self, body: Body, revision: int = 1) -> None:
        self.writer.write(encode(body, revision))
        await self.writer.drain()


class SimulatedController:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, zone: str = "UTC",
                 name: str = "SIM-PF6000", tool_serial: str = "B0742134",
                 last_calibration: datetime | None = None, max_comm_revision: int = 4,
                 max_result_revision: int = 7, max_tool_revision: int = 5,
                 ack_timeout_s: float = 10.0, retries: int = 3, link_timeout_s: float = 15.0,
                 state: Path | None = None) -> None:
        self.host, self.port = host, port
        self.zone = ZoneInfo(zone)
        self.name = name
        self.tool_serial = tool_serial
        self.last_calibration = last_calibration or datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
        self.max_comm_revision = max_comm_revision
        self.max_result_revision = max_result_revision
        self.max_tool_revision = max_tool_revision
        self.ack_timeout_s = ack_timeout_s
        self.retries = retries
        self.link_timeout_s = link_timeout_s
        self.results: list[TighteningResult] = []
        self.unacknowledged: list[TighteningResult | bytes] = []
        self.sent: Counter[int] = Counter()
        self.acknowledged: list[int] = []
        self.keepalives = 0
        self.acks_received = 0
        self.connections = 0
        # perf_counter() when each tightening happened and when its 0062 came (bench.torque)
        self.tightened_at: dict[int, float] = {}
        self.acknowledged_at: dict[int, float] = {}
        self._new_result = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.state = state
        if state is not None and state.exists():
            self._load(state)

    def _load(self, path: Path) -> None:
        saved = json.loads(path.read_text())
        self.results = msgspec.convert(saved["results"], list[TighteningResult])
        self.acknowledged = list(saved["acknowledged"])
        done = set(self.acknowledged)
        self.unacknowledged = [r for r in self.results if r.tightening_id not in done]

    def _save(self) -> None:
        """The controller's memory: results and which were acknowledged (atomic replace)."""
        if self.state is None:
            return
        temp = self.state.with_suffix(".tmp")
        temp.write_bytes(msgspec.json.encode({"results": self.results, "acknowledged": self.acknowledged}))
        os.replace(temp, self.state)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection; results and counters are kept (a restart)."""
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def tighten(self, *, torque_nm: Decimal = Decimal("24.5"), torque_min_nm: Decimal = Decimal("22"),
                torque_max_nm: Decimal = Decimal("27"), angle_deg: int = 182, identifier: str = "WO-2026-0001",
                ok: bool | None = None, at: datetime | None = None) -> int:
        """A new tightening on the controller; returns its tightening id."""
        tightening_id = len(self.results) + 1
        result = tightening_result(tightening_id, zone=self.zone, controller_name=self.name,
                                   tool_serial=self.tool_serial, torque_nm=torque_nm, torque_min_nm=torque_min_nm,
                                   torque_max_nm=torque_max_nm, angle_deg=angle_deg, identifier=identifier,
                                   ok=ok, at=at)
        self.results.append(result)
        self.unacknowledged.append(result)
        self.tightened_at[tightening_id] = time.perf_counter()
        self._save()
        self._new_result.set()
        return tightening_id

    def send_raw(self, telegram: bytes) -> None:
        """Queue bytes as if they were the next result (a firmware that sends garbage); counted
        in `sent` under id 0 and acknowledged like a result."""
        self.unacknowledged.append(telegram)
        self._new_result.set()

    def tool_data(self) -> ToolData:
        return ToolData(tool_serial_number=self.tool_serial, tightenings=len(self.results),
                        last_calibration=local_stamp(self.zone, self.last_calibration),
                        controller_serial_number="C1234567", calibration_value=2450,
                        last_service="2025-12-01:09:00:00", tightenings_since_service=len(self.results),
                        tool_type=1, motor_size=3, open_end_data="000",
                        controller_software_version="SIM 1.0", tool_max_torque=5000, gear_ratio=1250,
                        tool_full_speed=1200, primary_tool=1, tool_model="ETV ST61-50")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        conn = _Connection(writer)
        pusher: asyncio.Task[None] | None = None
        splitter = FrameSplitter()
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), self.link_timeout_s)
                if not chunk:
                    return
                for frame in splitter.feed(chunk):
                    if not await self._answer(conn, frame):
                        return
                    if conn.subscribed_revision is not None and pusher is None:
                        pusher = asyncio.create_task(self._push(conn))
                if pusher is not None and pusher.done():
                    return  # retries exhausted: the connection is considered broken
        except (TimeoutError, FramingError, ConnectionError):
            return
        finally:
            if pusher is not None:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _answer(self, conn: _Connection, frame: bytes) -> bool:
        """Answer one telegram; False ends the connection."""
        try:
            message = decode(frame)
        except DecodeError:
            mid = int(frame[4:8]) if frame[4:8].isdigit() else 0
            await conn.send(CommandError(failed_mid=mid, error_code=ERR_UNKNOWN_MID))
            return True
        body, revision = message.body, message.header.revision
        if isinstance(body, CommStart):
            if conn.started:
                await conn.send(CommandError(failed_mid=body.MID, error_code=ERR_CLIENT_ALREADY_CONNECTED))
            elif revision > self.max_comm_revision:
                await conn.send(CommandError(failed_mid=body.MID, error_code=ERR_REVISION_UNSUPPORTED))
            else:
                conn.started = True
                await conn.send(CommStartAck(cell_id=1, channel_id=1, controller_name=self.name,
                                             supplier_code="SIM", open_protocol_version="2.8.0",
                                             controller_software_version="SIM 1.0",
                                             tool_software_version="SIM 1.0", rbu_type="SIMULATOR",
                                             controller_serial_number="C1234567"), revision)
        elif isinstance(body, CommStop):
            await conn.send(CommandAccepted(accepted_mid=body.MID))
            return False
        elif isinstance(body, KeepAlive):
            self.keepalives += 1
            await conn.send(KeepAlive())
        elif not conn.started:
            await conn.send(CommandError(failed_mid=body.MID, error_code=ERR_UNKNOWN_MID))
        elif isinstance(body, ResultSubscribe):
            if revision > self.max_result_revision:
                await conn.send(CommandError(failed_mid=body.MID, error_code=ERR_REVISION_UNSUPPORTED))
            elif conn.subscribed_revision is not None:
                await conn.send(CommandError(failed_mid=body.MID, error_code=ERR_SUBSCRIPTION_EXISTS))
            else:
                await conn.send(CommandAccepted(accepted_mid=body.MID))
                conn.subscribed_revision, conn.no_ack = revision, message.header.no_ack
        elif isinstance(body, ResultAck):
            self.acks_received += 1
            conn.acked_at = time.perf_counter()
            conn.acked.set()
        elif isinstance(body, ToolDataRequest):
            if revision > self.max_tool_revision:
                await conn.send(CommandError(failed_mid=body.MID, error_code=ERR_REVISION_UNSUPPORTED))
            else:
                await conn.send(self.tool_data(), revision)
        else:
            await conn.send(CommandError(failed_mid=body.MID, error_code=ERR_UNKNOWN_MID))
        return True

    async def _push(self, conn: _Connection) -> None:
        """Send the oldest unacknowledged result, wait for its 0062 (re-sending on timeout)."""
        assert conn.subscribed_revision is not None
        while True:
            if not self.unacknowledged:
                self._new_result.clear()
                await self._new_result.wait()
                continue
            result = self.unacknowledged[0]
            tightening_id = 0 if isinstance(result, bytes) else result.tightening_id
            for _ in range(1 + self.retries):
                conn.acked.clear()
                self.sent[tightening_id] += 1
                if isinstance(result, bytes):
                    conn.writer.write(result)
                    await conn.writer.drain()
                else:
                    await conn.send(result, conn.subscribed_revision)
                if conn.no_ack:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.acked.wait(), self.ack_timeout_s)
                    break
            else:
                conn.writer.close()
                return
            self.unacknowledged.pop(0)
            self.acknowledged.append(tightening_id)
            self.acknowledged_at.setdefault(tightening_id, conn.acked_at)
            self._save()


async def _serve(args: argparse.Namespace) -> None:
    sim = SimulatedController(host=args.host, port=args.port, zone=args.zone, tool_serial=args.tool_serial,
                              max_result_revision=args.max_result_revision,
                              last_calibration=datetime.now(UTC) - timedelta(days=args.calibrated_days_ago),
                              ack_timeout_s=args.ack_timeout, state=Path(args.state) if args.state else None)
    await sim.start()
    print(f"Open Protocol controller simulator on {args.host}:{sim.port} (zone {args.zone})", flush=True)
    rng = random.Random(args.seed)
    try:
        while args.count is None or len(sim.results) < args.count:
            await asyncio.sleep(args.every)
            sim.tighten(torque_nm=Decimal(rng.randint(2250, 2650)) / 100, identifier=args.identifier)
        await asyncio.Event().wait()  # done tightening: keep serving until interrupted
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a simulated Open Protocol torque controller.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4545)
    parser.add_argument("--zone", default="UTC", help="IANA zone of the controller's clock")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between tightenings")
    parser.add_argument("--max-result-revision", type=int, default=7, choices=range(1, 8))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--count", type=int, default=None, help="stop tightening after this many results")
    parser.add_argument("--state", default="", help="file holding the controller's results across restarts")
    parser.add_argument("--identifier", default="", help="the VIN / identifier field (e.g. a work order)")
    parser.add_argument("--tool-serial", default="B0742134")
    parser.add_argument("--calibrated-days-ago", type=int, default=30, help="the tool's own last calibration")
    parser.add_argument("--ack-timeout", type=float, default=10.0, help="seconds to wait for MID 0062")
    args = parser.parse_args(argv)
    try:
        ZoneInfo(args.zone)
    except (ZoneInfoNotFoundError, ValueError):
        parser.error(f"--zone {args.zone!r} is not an IANA time zone name such as Europe/Berlin")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
