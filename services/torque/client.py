"""Open Protocol integrator client: one TCP connection to one torque controller.

A session: connect (default port 4545), MID 0001 communication start, MID 0060 subscription
to last tightening results, MID 0040 tool data, then events until the link drops. Each
request is sent at the highest revision we speak (or the configured one) and, while the
controller answers MID 0004 error 97 "MID revision unsupported", again one revision lower.

**Acknowledge only what is durable.** For each MID 0061 the client awaits `persist(received)`
(a `ReceivedResult`: the typed result with its raw telegram)
and sends MID 0062 only after it returned. If persist raises, no 0062 goes out: the client
drops the connection and reconnects with backoff. A telegram that cannot be decoded goes to
`quarantine(rejected)` (which must be durable too) before its 0062, so one bad telegram cannot
block the controller's queue. If the process dies in between, no 0062 was sent either.

What a controller does with a result that was not acknowledged: the controller waits for 0062
before it sends the next result, re-sends the 0061 after its acknowledge timeout (a setting,
e.g. 10 s) up to a retry count (e.g. 3), and then treats the connection as broken and ends its
subscriptions (documented for Open Protocol controllers in the Sturtevant Richmont Global 400
and Panasonic EYFR03 manuals, chapter "Atlas Copco Open Protocol", settings "Ack Timeout" and
"Retries"). Whether the same result is sent again after a new MID 0060 depends on the
controller: Atlas Copco controllers keep results in their own memory and offer MID 0064 "old
tightening result upload" by tightening id for catching up; this client does not yet use it
(its reply, MID 0065, has no torque limits; see docs/architecture.md). Our simulator
(`mro_edge.simulator.openprotocol`) re-sends every unacknowledged result after
re-subscription. Either way a result can arrive twice, so `persist` must be idempotent on
(controller, tightening id).

One 0062 per result, never per copy: a re-send that arrives while the result is still being
persisted (or right after its 0062 went out) is skipped, because the controller takes every
0062 as the acknowledge of whatever it sent last, and a spare one would acknowledge the next
result before it is durable.

Keep-alive: MID 9999 after `keepalive_s` without sending (controllers drop a link after about
15 s of silence); the link counts as lost when nothing at all arrived for `link_timeout_s`.

Not supported: link-level acknowledging (MID 9997/9998 with header sequence numbers, off by
default on controllers; this client leaves the sequence field blank) and multi-part messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec

from services.torque.codec import HEADER_LEN, DecodeError, FrameSplitter, FramingError, split_frame
from services.torque.mids import (
    ERR_REVISION_UNSUPPORTED,
    ERR_SUBSCRIPTION_EXISTS,
    MAX_REVISION,
    Body,
    CommandAccepted,
    CommandError,
    CommStart,
    CommStartAck,
    KeepAlive,
    Message,
    ResultAck,
    ResultSubscribe,
    TighteningResult,
    ToolData,
    ToolDataRequest,
    decode,
    encode,
)
from services.torque.results import zone_of
from shared.runtime import clock
from shared.runtime.breaker import reconnecting
from shared.runtime.logs import get_logger

DEFAULT_PORT = 4545


class ControllerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One controller the bridge connects to. `zone` is the IANA zone of the controller's clock."""

    device_id: str
    host: str
    zone: str
    port: int = DEFAULT_PORT
    comm_revision: int = MAX_REVISION[2]
    result_revision: int = MAX_REVISION[61]
    tool_revision: int = MAX_REVISION[41]
    keepalive_s: float = 10.0
    link_timeout_s: float = 30.0
    reply_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    tool_poll_s: float = 3600.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


class ReceivedResult(msgspec.Struct, frozen=True, kw_only=True):
    """What `persist` gets: the typed result, the telegram exactly as the controller sent it
    (without its NUL), the revision it came in, and when the box received it (UTC)."""

    device_id: str
    revision: int
    raw: str
    received_at: datetime
    result: TighteningResult


class RejectedTelegram(msgspec.Struct, frozen=True, kw_only=True):
    """A MID 0061 telegram that did not decode: kept whole with the reason, for the DLQ."""

    device_id: str
    raw: str
    received_at: datetime
    error: str


class SessionLost(Exception):
    """The session ended; the reason says why. The client reconnects."""


class ControllerRefused(SessionLost):
    """The controller answered MID 0004 with an error we cannot work around."""


Persist = Callable[[ReceivedResult], Awaitable[None]]
Quarantine = Callable[[RejectedTelegram], Awaitable[None]]
OnToolData = Callable[[ToolData], Awaitable[None]]


class Negotiated(msgspec.Struct, frozen=True, kw_only=True):
    """The revisions one session settled on, and the controller's MID 0002 answer."""

    comm_revision: int
    result_revision: int
    tool_revision: int | None
    controller: CommStartAck


Pending = tuple[ReceivedResult | RejectedTelegram, str]
"""A result to persist and acknowledge, with its data field (what identifies a re-send)."""


class _Link:
    """One connection: writes telegrams, remembers when it last sent, holds the pending reply
    and the results not yet acknowledged on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_sent = asyncio.get_running_loop().time()
        self.reply: asyncio.Future[Message] | None = None
        self.reply_for = 0
        self.results: asyncio.Queue[Pending] = asyncio.Queue(maxsize=16)
        self.unacknowledged: set[str] = set()
        self.last_acknowledged: str | None = None

    def is_resend(self, data: str) -> bool:
        """A controller re-sends a 0061 while we are still persisting it (its ack timeout). The
        re-send must not get a 0062 of its own: the controller would take that second 0062 for
        the next result, acknowledging a result we have not persisted yet."""
        return data in self.unacknowledged or data == self.last_acknowledged

    async def send(self, body: Body, revision: int = 1) -> None:
        self.writer.write(encode(body, revision))
        self.last_sent = asyncio.get_running_loop().time()
        await self.writer.drain()


class IntegratorClient:
    def __init__(self, config: ControllerConfig, persist: Persist, *, quarantine: Quarantine,
                 on_tool_data: OnToolData | None = None) -> None:
        self.config = config
        self._persist = persist
        self._quarantine = quarantine
        self._on_tool_data = on_tool_data
        zone_of(config.zone)  # a misconfigured zone fails here, not at the first result
        self.log = get_logger(controller=config.device_id)
        self.sessions = 0
        self.negotiated: Negotiated | None = None
        self.established = asyncio.Event()

    async def run(self) -> None:
        """Sessions until cancelled; connection failures back off exponentially (with jitter)."""
        c = self.config
        while True:
            retrying = reconnecting((OSError, TimeoutError, SessionLost, FramingError, DecodeError),
                                    initial_s=c.backoff_initial_s, max_s=c.backoff_max_s,
                                    before_sleep=self._backing_off)
            async for attempt in retrying:
                with attempt:
                    await self._session()
            await asyncio.sleep(c.backoff_initial_s)

    def _backing_off(self, state: Any) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.log.warning("controller link down", state_transition="reconnect_backoff",
                         attempt=state.attempt_number, error=str(error), error_type=type(error).__name__,
                         wait_s=round(state.next_action.sleep, 3) if state.next_action else None)

    async def _session(self) -> None:
        """One connection. Returns after an established session ended (the backoff starts
        afresh); raises if the session never got established."""
        c = self.config
        reader, writer = await asyncio.wait_for(asyncio.open_connection(c.host, c.port), c.connect_timeout_s)
        link = _Link(reader, writer)
        tasks: list[asyncio.Task[None]] = [asyncio.create_task(self._read(link))]
        try:
            self.negotiated = await self._negotiate(link, tasks[0])
            self.sessions += 1
            self.established.set()
            self.log.info("controller session established", state_transition="established",
                          comm_revision=self.negotiated.comm_revision,
                          result_revision=self.negotiated.result_revision,
                          tool_revision=self.negotiated.tool_revision)
            tasks += [asyncio.create_task(self._acknowledge(link)),
                      asyncio.create_task(self._keepalive(link))]
            if self.negotiated.tool_revision is not None and self._on_tool_data is not None:
                tasks.append(asyncio.create_task(self._poll_tools(link, self.negotiated.tool_revision)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            error = next((t.exception() for t in done if t.exception() is not None), None)
            self.log.warning("controller session ended", state_transition="session_lost",
                             error=str(error), error_type=type(error).__name__)
        finally:
            self.established.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read(self, link: _Link) -> None:
        splitter = FrameSplitter()
        while True:
            try:
                chunk = await asyncio.wait_for(link.reader.read(65536), self.config.link_timeout_s)
            except TimeoutError:
                raise SessionLost(f"nothing received for {self.config.link_timeout_s} s") from None
            if not chunk:
                splitter.finish()
                raise SessionLost("the controller closed the connection")
            for frame in splitter.feed(chunk):
                await self._dispatch(link, frame)

    async def _dispatch(self, link: _Link, frame: bytes) -> None:
        try:
            message = decode(frame)
        except DecodeError as exc:
            header = _header_mid(frame)
            if header == TighteningResult.MID:
                raw = frame.decode("ascii", "replace")
                await self._enqueue(link, RejectedTelegram(device_id=self.config.device_id, raw=raw,
                                                           received_at=clock.now(), error=str(exc)),
                                    raw[HEADER_LEN:])
            else:
                self.log.warning("telegram not understood", mid=header, error=str(exc))
            return
        body = message.body
        if isinstance(body, TighteningResult):
            received = ReceivedResult(device_id=self.config.device_id, revision=message.header.revision,
                                      raw=message.raw, received_at=clock.now(), result=body)
            await self._enqueue(link, received, message.raw[HEADER_LEN:])
        elif isinstance(body, KeepAlive):
            return
        elif link.reply is not None and not link.reply.done() and _answers(link.reply_for, body):
            link.reply.set_result(message)
        else:
            self.log.info("telegram not expected", mid=body.MID)

    async def _enqueue(self, link: _Link, item: ReceivedResult | RejectedTelegram, data: str) -> None:
        if link.is_resend(data):
            self.log.info("re-send of a result not yet acknowledged, skipped", state_transition="resend_skipped",
                          correlation_id=_correlation(self.config.device_id, item))
            return
        link.unacknowledged.add(data)
        await link.results.put((item, data))

    async def _request(self, link: _Link, body: Body, highest: int,
                       reader: asyncio.Task[None]) -> tuple[Message, int]:
        """Send `body`, stepping the revision down while the controller answers error 97; the
        answer and the revision it answered."""
        for revision in range(highest, 0, -1):
            answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            link.reply, link.reply_for = answer, body.MID
            await link.send(body, revision)
            waiting: set[asyncio.Future[Any]] = {answer, reader}
            done, _ = await asyncio.wait(waiting, timeout=self.config.reply_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if answer not in done:
                if reader in done:
                    reader.result()  # re-raises why the link went down
                raise SessionLost(f"no answer to MID {body.MID:04d} within {self.config.reply_timeout_s} s")
            reply = answer.result()
            if isinstance(reply.body, CommandError) and reply.body.error_code == ERR_REVISION_UNSUPPORTED:
                self.log.info("revision not supported, stepping down", mid=body.MID, revision=revision)
                continue
            return reply, revision
        raise ControllerRefused(f"the controller supports no revision of MID {body.MID:04d}")

    async def _negotiate(self, link: _Link, reader: asyncio.Task[None]) -> Negotiated:
        c = self.config
        start, _ = await self._request(link, CommStart(), c.comm_revision, reader)
        if not isinstance(start.body, CommStartAck):
            raise ControllerRefused(f"communication start refused: {_error_text(start.body)}")
        subscribed, result_revision = await self._request(link, ResultSubscribe(), c.result_revision, reader)
        if isinstance(subscribed.body, CommandError) and subscribed.body.error_code != ERR_SUBSCRIPTION_EXISTS:
            raise ControllerRefused(f"result subscription refused: {_error_text(subscribed.body)}")
        tool_revision: int | None = None
        if self._on_tool_data is not None:
            tools, revision = await self._request(link, ToolDataRequest(), c.tool_revision, reader)
            if isinstance(tools.body, ToolData):
                tool_revision = revision
                await self._deliver_tool_data(tools.body)
            else:
                self.log.warning("tool data refused", error=_error_text(tools.body))
        link.reply = None
        return Negotiated(comm_revision=start.header.revision, result_revision=result_revision,
                          tool_revision=tool_revision, controller=start.body)

    async def _acknowledge(self, link: _Link) -> None:
        """Persist (or quarantine), then MID 0062: in that order, one result at a time."""
        while True:
            item, data = await link.results.get()
            correlation = _correlation(self.config.device_id, item)
            if isinstance(item, ReceivedResult):
                try:
                    await self._persist(item)
                except Exception as exc:
                    self.log.error("result not persisted, not acknowledged", correlation_id=correlation,
                                   state_transition="persist_failed", error=str(exc), error_type=type(exc).__name__)
                    raise SessionLost(f"persist failed for tightening {item.result.tightening_id}") from exc
                await link.send(ResultAck())
                self.log.info("result acknowledged", correlation_id=correlation, state_transition="acknowledged")
            else:
                await self._quarantine(item)
                await link.send(ResultAck())
                self.log.warning("result telegram quarantined", correlation_id=correlation,
                                 state_transition="quarantined", error=item.error)
            link.unacknowledged.discard(data)
            link.last_acknowledged = data

    async def _keepalive(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - link.last_sent
            if idle >= self.config.keepalive_s:
                await link.send(KeepAlive())
                idle = 0.0
            await asyncio.sleep(self.config.keepalive_s - idle)

    async def _poll_tools(self, link: _Link, revision: int) -> None:
        assert self._on_tool_data is not None
        while True:
            await asyncio.sleep(self.config.tool_poll_s)
            reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            link.reply, link.reply_for = reply, ToolDataRequest.MID
            await link.send(ToolDataRequest(), revision)
            try:
                message = await asyncio.wait_for(reply, self.config.reply_timeout_s)
            except TimeoutError:
                raise SessionLost(f"no answer to MID 0040 within {self.config.reply_timeout_s} s") from None
            finally:
                link.reply = None
            if isinstance(message.body, ToolData):
                await self._deliver_tool_data(message.body)

    async def _deliver_tool_data(self, tool: ToolData) -> None:
        """Tool data is advisory (the registry stays the reference): a failing callback is logged,
        it does not cost the result link."""
        assert self._on_tool_data is not None
        try:
            await self._on_tool_data(tool)
        except Exception as exc:
            self.log.error("tool data not taken", error=str(exc), error_type=type(exc).__name__)


def _answers(request_mid: int, body: Body) -> bool:
    if isinstance(body, CommandError):
        return body.failed_mid == request_mid
    if isinstance(body, CommandAccepted):
        return body.accepted_mid == request_mid
    return (request_mid, body.MID) in ((CommStart.MID, CommStartAck.MID), (ToolDataRequest.MID, ToolData.MID))


def _correlation(device_id: str, item: ReceivedResult | RejectedTelegram) -> str:
    return f"{device_id}:{item.result.tightening_id if isinstance(item, ReceivedResult) else 'undecodable'}"


def _error_text(body: Body) -> str:
    if isinstance(body, CommandError):
        return f"MID {body.failed_mid:04d} error {body.error_code}"
    return f"unexpected MID {body.MID:04d}"


def _header_mid(frame: bytes) -> int | None:
    try:
        return split_frame(frame)[0].mid
    except DecodeError:
        return None
