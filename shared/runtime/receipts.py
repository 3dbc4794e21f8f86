"""Publish for a device and wait for ingest's receipt: how a bridge knows a message is durable.

A service that speaks a device's own protocol (the Open Protocol bridge) publishes on the
device's `in` topic and may tell the device "stored" only once ingest has committed the record
to its LMDB store. That is what a device receipt on `mro/<station>/receipt/<device_id>` says,
on either broker (a PUBACK from Mosquitto is only memory; README "Devices that cannot re-send").

`ReceiptWaiter` subscribes to the receipts of the devices it publishes for, and `publish`
returns the first receipt that names the message's event id with a fate ingest has committed
(`received`, `duplicate`, `recorded`, or `rejected` with its DLQ report); it raises
`NotDurable` when none came in time (the broker or ingest is down, or the receipt was lost).
A `rejected` receipt for a message refused unread (`rate_limited`, or `storage_full` when the
storage budget is reached behind Mosquitto) is not one: nothing was kept.
The receipt is published after the commit; it is the only proof this process gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import msgspec

from shared.runtime.messages import DeviceReceipt
from shared.runtime.mqtt import MqttLink
from shared.runtime.topics import Topics

DURABLE = frozenset({"received", "duplicate", "recorded", "rejected"})
# refused unread: a rejection that kept nothing (shared.runtime.diskfull.STORAGE_FULL, ingest's rate limit)
NOT_KEPT_RULES = frozenset({"rate_limited", "storage_full"})
_decode_receipt = msgspec.json.Decoder(DeviceReceipt).decode


class NotDurable(Exception):
    """No receipt said the message is durable within the timeout."""


def is_durable(receipt: DeviceReceipt) -> bool:
    if receipt.status not in DURABLE:
        return False
    return not (receipt.status == "rejected" and any(e.rule in NOT_KEPT_RULES for e in receipt.errors or ()))


class ReceiptWaiter:
    """Receipts of `device_ids` on `link`, matched to the publishes waiting for them by event id.
    Create it before `link.start()` (it adds its subscriptions)."""

    def __init__(self, link: MqttLink, topics: Topics, device_ids: Iterable[str]) -> None:
        self.link = link
        self.topics = topics
        self._waiting: dict[str, asyncio.Future[DeviceReceipt]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        for device_id in device_ids:
            topic = topics.receipt(device_id)
            link.subscriptions.append((topic, 1))
            link.direct[topic] = self._on_receipt

    def _on_receipt(self, payload: bytes) -> None:
        """In paho's thread: hand a receipt that someone waits for to the event loop."""
        try:
            receipt = _decode_receipt(payload)
        except msgspec.MsgspecError:
            return
        if receipt.event_id is None or not is_durable(receipt) or self._loop is None:
            return
        future = self._waiting.get(receipt.event_id)
        if future is not None:
            self._loop.call_soon_threadsafe(_settle, future, receipt)

    async def publish(self, topic: str, payload: bytes, event_id: str, timeout_s: float) -> DeviceReceipt:
        """Publish at QoS 1 and wait for the receipt that makes it durable."""
        self._loop = asyncio.get_running_loop()
        if not self.link.connected.is_set():
            raise NotDurable("not connected to the broker")
        future: asyncio.Future[DeviceReceipt] = self._loop.create_future()
        self._waiting[event_id] = future
        try:
            self.link.publish(topic, payload, qos=1)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise NotDurable(f"no receipt for event {event_id} within {timeout_s:g} s: is ingest running, and is "
                             "the device in the broker's ACL (`mro-edge devices init` after a configuration "
                             "change)?") from None
        finally:
            if self._waiting.get(event_id) is future:
                del self._waiting[event_id]


def _settle(future: asyncio.Future[DeviceReceipt], receipt: DeviceReceipt) -> None:
    if not future.done():
        future.set_result(receipt)
