"""The Open Protocol integrator client against our controller simulator over real TCP on a free
loopback port, persisting into a real LMDB store: negotiation down to what the controller
speaks, persist-before-0062, re-sending after a failed persist, keep-alive, reconnect after the
controller restarts, tool data. Every wait is bounded by a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from mro_edge.simulator.openprotocol import SimulatedController
from services.torque.client import ControllerConfig, IntegratorClient, ReceivedResult, RejectedTelegram
from services.torque.codec import FrameSplitter, Header, encode_frame
from services.torque.mids import CommStart, ResultSubscribe, TighteningResult, ToolData, decode, encode
from services.torque.results import MappingError, last_calibration_date, to_torque_fields
from shared.runtime.store import Store, u64

DEADLINE_S = 20.0


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class DurableResults:
    """The persist callback a bridge would give: an LMDB write keyed by tightening id, committed
    (synced) before it returns; a result seen again is a no-op, so re-sends are exactly-once."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path, ("results",), map_size_mb=16)
        self.calls = 0
        self.fail_next = 0
        self.fail_after_write = 0
        self.gate: asyncio.Event | None = None
        self.holds: dict[int, asyncio.Event] = {}

    async def persist(self, received: ReceivedResult) -> None:
        result = received.result
        assert received.raw[4:8] == "0061" and received.device_id == "TQ-PF6000-01"
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if result.tightening_id in self.holds:
            await self.holds[result.tightening_id].wait()
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("disk full")
        with self.store.write() as txn:
            txn.put(u64(result.tightening_id), result.timestamp.encode(), db=self.store.table("results"),
                    overwrite=False)
        if self.fail_after_write:
            self.fail_after_write -= 1
            raise OSError("crashed after the commit, before the acknowledge")

    @staticmethod
    async def persist_nothing(_: ReceivedResult) -> None:
        raise AssertionError("nothing should be persisted")

    def ids(self) -> list[int]:
        with self.store.read() as txn:
            return [int.from_bytes(k, "big") for k, _ in txn.cursor(db=self.store.table("results"))]


async def reject(_: RejectedTelegram) -> None:
    raise AssertionError("no telegram should be rejected")


def config(sim: SimulatedController, **changes) -> ControllerConfig:
    base = dict(device_id="TQ-PF6000-01", host="127.0.0.1", port=sim.port, zone="Europe/Berlin",
                keepalive_s=1.0, link_timeout_s=5.0, reply_timeout_s=5.0, connect_timeout_s=2.0,
                backoff_initial_s=0.05, backoff_max_s=0.5)
    base.update(changes)
    return ControllerConfig(**base)  # type: ignore[arg-type]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 90))


class Running:
    def __init__(self, client: IntegratorClient) -> None:
        self.client = client
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> IntegratorClient:
        self.task = asyncio.create_task(self.client.run())
        return self.client

    async def __aexit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def test_negotiates_down_to_the_controllers_revisions_and_acks_only_after_persist(tmp_path):
    async def scenario() -> None:
        sim = SimulatedController(zone="Europe/Berlin", max_comm_revision=2, max_result_revision=2,
                                  max_tool_revision=1)
        await sim.start()
        durable = DurableResults(tmp_path / "results")
        durable.gate = asyncio.Event()
        tools: list[ToolData] = []

        async def on_tool(tool: ToolData) -> None:
            tools.append(tool)

        client = IntegratorClient(config(sim), durable.persist, quarantine=reject, on_tool_data=on_tool)
        async with Running(client):
            await until(client.established.is_set, "the session")
            assert client.negotiated is not None
            assert (client.negotiated.comm_revision, client.negotiated.result_revision,
                    client.negotiated.tool_revision) == (2, 2, 1)
            assert client.negotiated.controller.supplier_code == "SIM"

            tid = sim.tighten(identifier="WO-2026-0042")
            await until(lambda: durable.calls == 1, "persist to be called")
            await asyncio.sleep(0.5)  # persist is held: the controller must not have its 0062
            assert sim.acknowledged == [] and durable.ids() == []
            durable.gate.set()
            await until(lambda: sim.acknowledged == [tid], "the 0062")
            assert durable.ids() == [tid] and sim.sent[tid] == 1
        await sim.stop()
        assert tools and tools[0].tool_serial_number == "B0742134"

    run(scenario)


def test_a_failed_persist_is_not_acknowledged_and_the_resend_is_persisted_once(tmp_path):
    async def scenario() -> None:
        sim = SimulatedController()
        await sim.start()
        durable = DurableResults(tmp_path / "results")
        durable.fail_next = 1          # first delivery: persist fails, nothing written
        durable.fail_after_write = 1   # second delivery: written, then "crash" before the 0062
        persisted: list[TighteningResult] = []
        original = durable.persist

        async def persist(received: ReceivedResult) -> None:
            await original(received)
            persisted.append(received.result)

        client = IntegratorClient(config(sim), persist, quarantine=reject)
        async with Running(client):
            await until(client.established.is_set, "the session")
            first = sim.tighten()
            second = sim.tighten()
            await until(lambda: sim.acknowledged == [first, second], "both results acknowledged")
            assert sim.sent[first] == 3 and sim.sent[second] == 1
            assert sim.connections == 3 and client.sessions == 3
        await sim.stop()
        assert durable.ids() == [first, second]  # exactly once in the store
        assert [r.tightening_id for r in persisted] == [first, second]
        assert durable.calls == 4

    run(scenario)


def test_resends_during_a_slow_persist_get_no_0062_of_their_own(tmp_path):
    """The controller re-sends a result while we are still persisting it. Acknowledging each
    copy would hand the spare 0062 to the next result before it is durable."""
    async def scenario() -> None:
        sim = SimulatedController(ack_timeout_s=0.15, retries=50)
        await sim.start()
        durable = DurableResults(tmp_path / "results")
        client = IntegratorClient(config(sim), durable.persist, quarantine=reject)
        async with Running(client):
            await until(client.established.is_set, "the session")
            first, second = sim.tighten(), sim.tighten()
            durable.holds = {first: asyncio.Event(), second: asyncio.Event()}
            await until(lambda: sim.sent[first] >= 3, "re-sends of the first result")
            durable.holds[first].set()
            await until(lambda: sim.acknowledged == [first], "the first 0062")
            await until(lambda: sim.sent[second] >= 3, "re-sends of the second result")
            assert sim.acknowledged == [first] and durable.ids() == [first]
            durable.holds[second].set()
            await until(lambda: sim.acknowledged == [first, second], "the second 0062")
            await asyncio.sleep(0.3)
            assert sim.acks_received == 2 and durable.ids() == [first, second] and client.sessions == 1
        await sim.stop()

    run(scenario)


def test_keepalive_holds_a_quiet_link_open_and_its_absence_is_noticed(tmp_path):
    async def scenario() -> None:
        sim = SimulatedController(link_timeout_s=1.0)
        await sim.start()
        durable = DurableResults(tmp_path / "results")
        client = IntegratorClient(config(sim, keepalive_s=0.2), durable.persist, quarantine=reject)
        async with Running(client):
            await until(client.established.is_set, "the session")
            await asyncio.sleep(2.5)
            assert sim.keepalives >= 5 and sim.connections == 1 and client.sessions == 1

        lazy = IntegratorClient(config(sim, keepalive_s=30.0), durable.persist, quarantine=reject)
        async with Running(lazy):
            await until(lambda: lazy.sessions >= 2, "a reconnect after the controller dropped the silent link")
        await sim.stop()

    run(scenario)


def test_reconnects_after_the_controller_restarts_and_gets_what_happened_meanwhile(tmp_path):
    async def scenario() -> None:
        sim = SimulatedController()
        await sim.start()
        durable = DurableResults(tmp_path / "results")
        client = IntegratorClient(config(sim), durable.persist, quarantine=reject)
        async with Running(client):
            await until(client.established.is_set, "the session")
            first = sim.tighten()
            await until(lambda: sim.acknowledged == [first], "the first result")
            await sim.stop()
            await until(lambda: not client.established.is_set(), "the client to see the link drop")
            second = sim.tighten()  # tightened while the link was down
            await asyncio.sleep(0.3)  # a few refused reconnects, backing off
            await sim.start()
            await until(lambda: sim.acknowledged == [first, second], "the result from the outage")
            assert client.sessions == 2 and durable.ids() == [first, second]
        await sim.stop()

    run(scenario)


@pytest.mark.parametrize("revision", [1, 7])
def test_results_map_to_torque_event_fields_in_the_controllers_zone(tmp_path, revision):
    async def scenario() -> None:
        sim = SimulatedController(zone="America/Chicago", max_result_revision=revision)
        await sim.start()
        got: list[TighteningResult] = []

        async def persist(received: ReceivedResult) -> None:
            assert received.revision == revision and decode(received.raw.encode()).body == received.result
            got.append(received.result)

        client = IntegratorClient(config(sim, zone="America/Chicago"), persist, quarantine=reject)
        async with Running(client):
            await until(client.established.is_set, "the session")
            sim.tighten(torque_nm=Decimal("31.07"), torque_min_nm=Decimal("30"), torque_max_nm=Decimal("33"),
                        identifier="WO-77/B", at=datetime(2026, 7, 4, 15, 0, 1, tzinfo=UTC))
            await until(lambda: len(got) == 1, "the result")
        await sim.stop()
        fields = to_torque_fields(got[0], client.config.zone)
        assert fields.torque_nm == Decimal("31.07") and fields.result == "OK" and fields.identifier == "WO-77/B"
        assert fields.occurred_at == datetime(2026, 7, 4, 15, 0, 1, tzinfo=UTC)
        assert fields.tool_serial_number == (None if revision == 1 else "B0742134")

    run(scenario)


def test_tool_data_is_parsed_and_polled_again(tmp_path):
    async def scenario() -> None:
        sim = SimulatedController(zone="Asia/Tokyo", last_calibration=datetime(2026, 2, 28, 16, 0, tzinfo=UTC))
        await sim.start()
        tools: list[ToolData] = []

        async def on_tool(tool: ToolData) -> None:
            tools.append(tool)

        durable = DurableResults(tmp_path / "results")
        client = IntegratorClient(config(sim, zone="Asia/Tokyo", tool_poll_s=0.2), durable.persist,
                                  quarantine=reject, on_tool_data=on_tool)
        async with Running(client):
            await until(lambda: len(tools) >= 3, "three tool data replies")
            assert client.negotiated is not None and client.negotiated.tool_revision == 5
        await sim.stop()
        tool = tools[-1]
        assert tool.tool_serial_number == "B0742134" and tool.tool_model == "ETV ST61-50"
        assert tool.calibration_value == 2450 and tool.controller_serial_number == "C1234567"
        assert last_calibration_date(tool, "Asia/Tokyo") == date(2026, 3, 1)  # 16:00 UTC is the next day there

    run(scenario)


def test_an_undecodable_result_is_quarantined_whole_before_its_0062(tmp_path):
    async def scenario() -> None:
        sim = SimulatedController()
        await sim.start()
        durable = DurableResults(tmp_path / "results")
        rejected: list[RejectedTelegram] = []

        async def quarantine(telegram: RejectedTelegram) -> None:
            assert sim.acknowledged == []  # kept before the 0062
            rejected.append(telegram)

        garbage = encode_frame(Header(mid=61, revision=2), "01000102XX")
        client = IntegratorClient(config(sim), durable.persist, quarantine=quarantine)
        async with Running(client):
            await until(client.established.is_set, "the session")
            sim.send_raw(garbage)
            good = sim.tighten()
            await until(lambda: sim.acknowledged == [0, good], "the garbage and the good result acknowledged")
        await sim.stop()
        assert [r.raw for r in rejected] == [garbage[:-1].decode()]
        assert "channel_id" in rejected[0].error and rejected[0].device_id == "TQ-PF6000-01"
        assert durable.ids() == [good] and client.sessions == 1

    run(scenario)


def test_a_lying_length_drops_the_link_and_acknowledges_nothing(tmp_path):
    async def scenario() -> None:
        sim = SimulatedController()
        await sim.start()
        durable = DurableResults(tmp_path / "results")
        client = IntegratorClient(config(sim), durable.persist, quarantine=reject)
        async with Running(client):
            await until(client.established.is_set, "the session")
            frame = encode(sim_result(sim), 2)
            sim.send_raw(b"0300" + frame[4:])  # says 300 bytes, the frame is 385
            await until(lambda: client.sessions >= 3, "reconnects after each refused frame")
            assert sim.acknowledged == [] and durable.calls == 0
            sim.unacknowledged.clear()
            good = sim.tighten()
            await until(lambda: sim.acknowledged == [good], "the next good result")
        await sim.stop()

    run(scenario)


def sim_result(sim: SimulatedController) -> TighteningResult:
    sim.tighten()
    result = sim.unacknowledged.pop()
    assert isinstance(result, TighteningResult)
    return result


def test_the_simulator_resends_an_unacknowledged_result_then_drops_the_link():
    """What the client relies on from a controller, checked on the simulator with a bare
    integrator that subscribes and never acknowledges."""
    async def scenario() -> None:
        sim = SimulatedController(ack_timeout_s=0.2, retries=2, max_result_revision=2)
        await sim.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        splitter = FrameSplitter()
        received: list[int] = []

        async def next_mid() -> int:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                if not chunk:
                    return -1
                frames = list(splitter.feed(chunk))
                if frames:
                    assert len(frames) == 1
                    return decode(frames[0]).header.mid

        writer.write(encode(CommStart(), 3))
        assert await next_mid() == 2
        writer.write(encode(ResultSubscribe(), 2))
        assert await next_mid() == 5
        tid = sim.tighten()
        while (mid := await next_mid()) != -1:
            received.append(mid)
        writer.close()
        assert received == [61, 61, 61] and sim.sent[tid] == 3 and sim.acknowledged == []
        assert sim.unacknowledged[0].tightening_id == tid  # kept for the next subscription
        await sim.stop()

    run(scenario)


def test_a_zone_that_does_not_exist_is_refused_when_the_client_is_made():
    async def scenario() -> None:
        cfg = ControllerConfig(device_id="TQ-1", host="127.0.0.1", zone="Europe/Atlantis")
        with pytest.raises(MappingError, match="not an IANA time zone name"):
            IntegratorClient(cfg, DurableResults.persist_nothing, quarantine=reject)

    run(scenario)
