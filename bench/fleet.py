"""The bench's side of the pipeline: timed devices, their records, and a stand-in uplink.

Devices are the simulator's (`Pipeline.device`), each with its own broker user; the bench only
wraps `on_message` to stamp when each receipt arrives.

The stand-in uplink receipts what sign forwards (the real uplink stage needs a central
gateway): without it, sign's outbox would fill, republish everything every
`redeliver_after_s` to a topic nobody reads, and stop sending at `max_in_flight`, which is not
what a box with a working uplink does. It does what the uplink's commit would do for sign (a
receipt naming the keys), without an LMDB of its own.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import threading
import time

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from mro_edge.simulator.records import valid_record
from shared.runtime.messages import StageReceipt, json_encode
from shared.runtime.topics import Topics

FLEET = (("rfid_reader", "BENCH-RFID-01"), ("barcode_scanner", "BENCH-BCS-01"),
         ("torque_wrench", "BENCH-TQW-01"), ("tablet", "BENCH-TAB-01"))
RESEND_AFTER_S = 20.0  # well above any backlog the bench builds: no re-send unless a record is stuck


class Fleet:
    """Four devices (one per kind) whose receipts are time-stamped on arrival."""

    def __init__(self, pipeline, *, nodelay: bool = True) -> None:
        self.station = pipeline.station
        self.devices = {}
        self.arrivals: dict[tuple[str, str], float] = {}  # (event_id, status) -> perf_counter
        self._lock = threading.Lock()
        for kind, device_id in FLEET:
            device = pipeline.device(kind, device_id, resend_after_s=RESEND_AFTER_S)
            device.client.on_message = self._timed(device._on_receipt)
            if nodelay:
                set_nodelay(device.client)
                device.client.on_connect = _with_nodelay(device.client.on_connect)
            self.devices[device_id] = device

    def _timed(self, handler):
        arrivals, lock = self.arrivals, self._lock

        def on_message(client, userdata, message) -> None:
            now = time.perf_counter()
            try:
                receipt = json.loads(message.payload)
                with lock:
                    arrivals.setdefault((receipt.get("event_id"), receipt.get("status")), now)
            except (ValueError, AttributeError):
                pass
            handler(client, userdata, message)

        return on_message

    def records(self, rng: random.Random, n: int) -> list[tuple[object, str, bytes]]:
        """N valid records round-robin over the devices, content unique (so N ledger entries)."""
        out, contents = [], set()
        fleet = list(self.devices.values())
        while len(out) < n:
            device = fleet[len(out) % len(fleet)]
            record = valid_record(
                rng, station=self.station, device_kind=device.kind, device_id=device.device_id
            )
            content = json.dumps({k: v for k, v in record.items() if k != "event_id"}, sort_keys=True)
            if content in contents:
                continue
            contents.add(content)
            out.append((device, record["event_id"], json.dumps(record).encode()))
        return out

    def resend(self) -> int:
        return sum(device.resend_unreceipted() for device in self.devices.values())

    @property
    def resends(self) -> int:
        return sum(device.resends for device in self.devices.values())

    def arrived(self, event_id: str, status: str) -> float | None:
        return self.arrivals.get((event_id, status))


def set_nodelay(client: paho.Client) -> None:
    """TCP_NODELAY on a paho client's socket (paho leaves Nagle's algorithm on).

    One bench device sends 50 records/s, each right after the PUBACK it writes for a receipt;
    with Nagle that publish waits for the broker's delayed ACK (~40 ms on Linux). A real device
    sends a record every few seconds and never meets this, so the bench's devices turn it off:
    the latency figure is then the pipeline's, not the bench's device client's.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _with_nodelay(on_connect):
    def wrapped(client, *args) -> None:
        set_nodelay(client)
        on_connect(client, *args)

    return wrapped


class _Keys(msgspec.Struct):
    key: str


class _Envelope(msgspec.Struct):
    items: list[_Keys]


class UplinkStub:
    """Receipts every record sign forwards to the uplink, as the uplink stage would after its commit."""

    def __init__(self, broker, station: str) -> None:
        topics = Topics(station)
        self.input_topic = topics.stage_input("uplink")
        self.receipt_topic = topics.stage_receipt("sign")
        self.decode = msgspec.json.Decoder(_Envelope).decode
        self.records = 0
        self.ready = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-uplink-{os.getpid()}",
                             clean_session=True, protocol=paho.MQTTv311)
        client.username_pw_set(*broker.login("uplink"))  # reads uplink's input, receipts sign
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.on_connect = lambda c, *_: c.subscribe(self.input_topic, qos=1)
        client.on_subscribe = lambda *_: self.ready.set()
        client.on_message = self._on_message
        port = broker.port
        if getattr(broker, "tls", None):  # a TLS broker: the stand-in is a service, and services use TLS
            client.tls_set_context(ssl.create_default_context(cafile=str(broker.tls.ca_file)))
            port = broker.tls.port
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        self.client = client
        if not self.ready.wait(10):
            self.stop()
            raise RuntimeError("the stand-in uplink could not subscribe")

    def _on_message(self, _client, _userdata, message) -> None:
        try:
            keys = [item.key for item in self.decode(message.payload).items]
        except msgspec.DecodeError:
            return
        self.records += len(keys)
        self.client.publish(self.receipt_topic, json_encode(StageReceipt("uplink", keys)), qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
