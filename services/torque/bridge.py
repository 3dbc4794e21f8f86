"""The Open Protocol bridge: the box as integrator client of each configured torque controller.

One `IntegratorClient` per `[torque.controllers.<id>]` (edge.toml): it connects out to the
controller (TCP, default port 4545), subscribes to last tightening results (MID 0060), keeps the
link alive (MID 9999), reconnects with backoff and polls the tool's data (MID 0040/0041).

**A result is acknowledged (MID 0062) only once it is durable on the box.** `persist` publishes
the telegram, whole, as an `mro.op_result/1` (`services.torque.telegram`) at QoS 1 on
`mro/<station>/in/torque_controller/<id>` and waits for ingest's receipt naming the result's
event id (`shared.runtime.receipts`): ingest sends it after its LMDB commit, whatever became of
the result (a `torque_event` within the work session at the controller's place, an unassigned
read, a DLQ report, or a duplicate of a tightening already handled). The same on both brokers:
a Mosquitto PUBACK is only memory. No receipt within `[torque] receipt_timeout_s`: persist
raises, no 0062 goes out, the client drops the link and reconnects, and the controller sends
the result again; ingest knows it by (controller, tightening id).

The tool's own data (serial, last calibration from MID 0041) travels with every result, so the
record carries the tool's calibration due date (last calibration + `calibration_interval_days`)
and validate judges it beside the tool registry.

Status: `mro/<station>/status/torque` (retained): each controller's link and counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from datetime import timedelta

from services.torque.client import ControllerConfig, IntegratorClient, ReceivedResult, RejectedTelegram
from services.torque.mids import MAX_REVISION, ToolData
from services.torque.results import MappingError, last_calibration_date
from services.torque.telegram import (
    KIND,
    SCHEMA,
    ResultTelegram,
    ToolCalibration,
    encode_telegram,
    result_event_id,
)
from shared.runtime.clock import utc_now
from shared.runtime.config import Config, ControllerSettings
from shared.runtime.logs import configure_logging, get_logger
from shared.runtime.messages import json_encode
from shared.runtime.mqtt import MqttLink, client_id_for, service_credentials
from shared.runtime.receipts import ReceiptWaiter
from shared.runtime.topics import Topics
from shared.runtime.watchdog import beat

SERVICE = "torque"
STATUS_EVERY_S = 5.0


def controller_config(device_id: str, settings: ControllerSettings, keepalive_s: float) -> ControllerConfig:
    return ControllerConfig(device_id=device_id, host=settings.host, port=settings.port, zone=settings.zone,
                            result_revision=settings.result_revision or MAX_REVISION[61],
                            tool_poll_s=settings.tool_poll_s, keepalive_s=keepalive_s)


class ControllerBridge:
    """One controller: its client, its tool's latest data, and the publishes for it."""

    def __init__(self, bridge: Bridge, device_id: str, settings: ControllerSettings) -> None:
        self.bridge = bridge
        self.device_id = device_id
        self.settings = settings
        self.topic = bridge.topics.device_in(KIND, device_id)
        self.tool: ToolCalibration | None = None
        self.persisted = 0
        self.log = get_logger(controller=device_id)
        self.client = IntegratorClient(controller_config(device_id, settings, bridge.config.torque.keepalive_s),
                                       self.persist, quarantine=self.quarantine, on_tool_data=self.on_tool_data)

    async def persist(self, received: ReceivedResult) -> None:
        await self._publish(received.raw, received.received_at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")
        self.persisted += 1

    async def quarantine(self, rejected: RejectedTelegram) -> None:
        """A telegram that did not decode goes the same way: ingest keeps it in its DLQ, whole."""
        await self._publish(rejected.raw, rejected.received_at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")

    async def _publish(self, telegram: str, received_at: str) -> None:
        payload = encode_telegram(ResultTelegram(schema=SCHEMA, telegram=telegram, received_at=received_at,
                                                 zone=self.settings.zone, tool=self.tool))
        event_id = result_event_id(self.device_id, telegram)
        receipt = await self.bridge.receipts.publish(self.topic, payload, event_id,
                                                     self.bridge.config.torque.receipt_timeout_s)
        self.log.info("result durable", correlation_id=event_id, state_transition="durable", receipt=receipt.status)

    async def on_tool_data(self, tool: ToolData) -> None:
        try:
            day = last_calibration_date(tool, self.settings.zone)
        except MappingError as exc:
            self.log.warning("tool calibration date unreadable", error=str(exc))
            self.tool = None
            return
        self.tool = ToolCalibration(serial_number=tool.tool_serial_number.strip(), last_calibration=day,
                                    calibration_due=day + timedelta(days=self.settings.calibration_interval_days))
        self.log.info("tool data", state_transition="tool_data", tool_serial=self.tool.serial_number,
                      last_calibration=day.isoformat())

    def view(self) -> dict[str, object]:
        return {"linked": self.client.established.is_set(), "sessions": self.client.sessions,
                "persisted": self.persisted, "tool_serial": self.tool.serial_number if self.tool else None,
                "tool_calibration_due": self.tool.calibration_due.isoformat() if self.tool else None}


class Bridge:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.topics = Topics(config.station)
        login = service_credentials(config, SERVICE)
        self.link = MqttLink(config, client_id=client_id_for(config, SERVICE, login), credentials=login,
                             persistent=False,
                             will=(self.topics.status(SERVICE), json_encode({"service": SERVICE, "state": "down"})))
        controllers = config.torque.controllers
        self.receipts = ReceiptWaiter(self.link, self.topics, controllers)
        self.controllers = [ControllerBridge(self, device_id, settings)
                            for device_id, settings in sorted(controllers.items())]
        self.log = get_logger()

    def publish_status(self, state: str = "up") -> None:
        self.link.publish(self.topics.status(SERVICE), json_encode(
            {"service": SERVICE, "state": state, "pid": os.getpid(), "at": utc_now(),
             "controllers": {c.device_id: c.view() for c in self.controllers}}), retain=True)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self.link.start)
        self.link.on_connect_hooks.append(self.publish_status)
        if not self.controllers:
            self.log.warning("no torque controllers configured ([torque.controllers.<id>] in edge.toml)")
        tasks = [asyncio.create_task(c.client.run()) for c in self.controllers]
        try:
            while not stop.is_set():
                self.publish_status()
                beat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.publish_status("down")
            self.link.stop()


def run_bridge(config: Config) -> None:
    configure_logging(SERVICE, config.station)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Bridge(config).run(stop)

    asyncio.run(main())
