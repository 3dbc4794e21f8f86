"""Simulated hangar devices that behave as the device contract asks of real ones.

A device keeps every record it sent until it gets a receipt for it (`received`, `duplicate`
or `rejected`) and re-sends it after a timeout; ingest's dedupe makes the re-sends harmless.
It also waits for the final answer (`recorded` with a ledger seq, or `rejected`) so a run can
check that nothing was lost. A rejection for `rate_limited` only is no answer: ingest did not
read the record, so it is sent again after the timeout like one never receipted.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from shared.runtime.config import Config
from shared.runtime.mqtt import diagnose, set_nodelay, use_tls
from shared.runtime.topics import Topics

FINAL = ("recorded", "rejected")
HELD = ("received", "duplicate", "rejected", "recorded")


def rate_limited(receipt: dict) -> bool:
    """A `rejected` receipt that only says "too fast, send it again later"."""
    errors = receipt.get("errors") or []
    return receipt.get("status") == "rejected" and bool(errors) and all(
        e.get("rule") == "rate_limited" for e in errors)


@dataclass
class Sent:
    payload: bytes
    expect: str  # the final receipt status this record should get: recorded, rejected or duplicate
    first_sent: float
    last_sent: float
    receipts: list[dict] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return any(r["status"] in HELD and not rate_limited(r) for r in self.receipts)

    @property
    def final(self) -> dict | None:
        """The receipt that settles this record: `recorded` or `rejected`, or a `duplicate` that
        names the ledger seq (or any `duplicate`, when a duplicate is what we sent)."""
        for receipt in self.receipts:
            if receipt["status"] in FINAL and not rate_limited(receipt):
                return receipt
            if receipt["status"] == "duplicate" and (
                receipt.get("seq") is not None or self.expect == "duplicate"
            ):
                return receipt
        return None


class SimulatedDevice:
    def __init__(
        self,
        config: Config,
        kind: str,
        device_id: str,
        credentials: tuple[str, str],
        *,
        resend_after_s: float = 5.0,
    ):
        self.kind = kind
        self.device_id = device_id
        self.topics = Topics(config.station)
        self.in_topic = self.topics.device_in(kind, device_id)
        self.resend_after_s = resend_after_s
        self.sent: dict[str, Sent] = {}
        self.stray_receipts: list[dict] = []
        self.resends = 0
        self._lock = threading.Lock()
        self._connected = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{device_id}", clean_session=False,
                             protocol=paho.MQTTv311)
        client.username_pw_set(*credentials)
        use_tls(client, config.mqtt)  # mqtts://: the station CA, and a client certificate if configured
        self._mqtt = config.mqtt
        client.max_inflight_messages_set(200)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(0.2, 3)  # type: ignore[arg-type]  # paho takes float seconds; its hint says int
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self._connected.clear()
        client.on_message = self._on_receipt
        self.client = client
        self._host, self._port, self._keepalive = config.mqtt.host, config.mqtt.port, config.mqtt.keepalive_s

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if not reason_code.is_failure:
            set_nodelay(client)
            client.subscribe(self.topics.receipt(self.device_id), qos=1)
            self._connected.set()

    def _on_receipt(self, _client, _userdata, message) -> None:
        receipt = json.loads(message.payload)
        with self._lock:
            sent = self.sent.get(receipt.get("event_id"))
            if sent is None:
                self.stray_receipts.append(receipt)
            else:
                sent.receipts.append(receipt)

    def start(self, wait_s: float = 20.0) -> None:
        self.client.connect_async(self._host, self._port, self._keepalive)
        self.client.loop_start()
        if not self._connected.wait(wait_s):
            why = diagnose(self._mqtt) if self._mqtt.tls else ""
            raise ConnectionError(f"device {self.device_id} could not connect to {self._mqtt.url}"
                                  + (f": {why}" if why else ""))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, event_id: str | None, payload: bytes, expect: str = "recorded") -> None:
        """Publish a record and keep it until receipted; a payload without a readable event_id
        cannot be matched to its receipt, so it is sent once and answered by a stray receipt."""
        now = time.monotonic()
        if event_id is not None:
            with self._lock:
                sent = self.sent.get(event_id)
                if sent is None:
                    self.sent[event_id] = Sent(payload, expect, now, now)
                else:
                    sent.last_sent = now
        self.client.publish(self.in_topic, payload, qos=1)

    def resend_unreceipted(self) -> int:
        """The device side of the hop: anything without a receipt after the timeout goes again,
        and anything held but still without its final answer after four timeouts asks again."""
        now = time.monotonic()
        with self._lock:
            due = [(eid, s) for eid, s in self.sent.items()
                   if (not s.held and now - s.last_sent >= self.resend_after_s)
                   or (s.final is None and now - s.last_sent >= 4 * self.resend_after_s)]
            for _, sent in due:
                sent.last_sent = now
        for _, sent in due:
            self.client.publish(self.in_topic, sent.payload, qos=1)
        self.resends += len(due)
        return len(due)

    def outstanding(self) -> list[str]:
        with self._lock:
            return [eid for eid, s in self.sent.items() if s.final is None]
