"""The stage runtime: everything a pipeline stage needs except its domain logic.

For each batch of MQTT messages (DESIGN.md section 2):
  1. decode transport -> domain inputs (device messages or pipeline items);
  2. ONE synced LMDB write transaction: settle receipted outbox rows, run the stage's
     `handle` (dedupe, new state, outbox rows, DLQ rows) -> commit;
  3. ack to the broker in arrival order, publish what the handler queued (device receipts,
     DLQ reports, notices), receipt the upstream stage with every key now held;
  4. pump the outbox downstream.
A stage subclasses `Stage` and never touches paho or LMDB transactions directly.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import lmdb
import msgspec

from shared.runtime.config import Config
from shared.runtime.logs import configure_logging, get_logger
from shared.runtime.mqtt import Inbound, MqttLink
from shared.runtime.outbox import OUTBOX_TABLES, Outbox
from shared.runtime.store import Store, from_u64, u64
from shared.runtime.topics import Topics
from shared.runtime import watchdog
from shared.runtime.messages import (
    DeviceReceipt,
    Item,
    StageReceipt,
    envelope_decoder,
    item_encoder,
    json_encode,
    stage_receipt_decoder,
    utc_from_epoch,
    utc_now,
)

RUNTIME_TABLES = ("seen", "dlq", "meta") + OUTBOX_TABLES
FREEZE_AFTER = 3


REFUSED_EXIT = 3


class StageRefused(Exception):
    """The stage must not start (e.g. its store is behind a signed checkpoint): `kind` names the
    alarm, the message explains the recovery. The process exits with REFUSED_EXIT and the
    supervisor does not restart it: a person has to act."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StageFault(Exception):
    """The stage itself is failing (several records in a row raised): hold the batch, do not DLQ it."""


@dataclass(slots=True)
class DeviceMessage:
    """A raw device publish, as the ingest stage sees it."""

    topic: str
    payload: bytes
    received_at: str


class Stage(ABC):
    """Domain logic of one stage. Subclasses set the class attributes and implement `handle`."""

    name: str = ""
    consumes: str = "pipeline"  # "devices" for the ingest stage
    downstream: str | None = None
    tables: tuple[str, ...] = ()

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        """Extra topics this stage listens to besides its input and its receipts."""
        return ()

    def open(self, runtime: StageRuntime) -> None:
        """Called once before the first batch (load keys, check stored state)."""

    @abstractmethod
    def handle(self, inputs: list, uow: UnitOfWork) -> None:
        """The stage's domain logic for one batch, inside its transaction."""

    def handle_notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        """Messages on `notice_topics`; processed in the same transaction as the batch."""

    def status_extra(self) -> dict[str, Any]:
        """Stage-specific fields for the retained status message."""
        return {}

    def close(self) -> None:
        """Called once when the service stops (stop background threads)."""


@dataclass
class Transition:
    correlation_id: str | None
    key: str | None
    state: str
    extra: dict[str, Any]


class UnitOfWork:
    """What a handler may do inside the batch transaction; side effects leave after commit."""

    def __init__(self, runtime: StageRuntime, txn: lmdb.Transaction):
        self._rt = runtime
        self._txn = txn
        self.outgoing: list[tuple[str, bytes, int, bool]] = []
        self.transitions: list[Transition] = []
        self.processed = 0
        self.failed = 0

    @property
    def topics(self) -> Topics:
        return self._rt.topics

    # idempotency
    def seen(self, key: str) -> bytes | None:
        return self._txn.get(key.encode(), db=self._rt.store.table("seen"))

    def remember(self, key: str, value: bytes) -> None:
        self._txn.put(key.encode(), value, db=self._rt.store.table("seen"))

    # stage-owned tables
    def get(self, table: str, key: bytes) -> bytes | None:
        return self._txn.get(key, db=self._rt.store.table(table))

    def put(self, table: str, key: bytes, value: bytes, *, append: bool = False) -> None:
        self._txn.put(key, value, db=self._rt.store.table(table), append=append)

    def delete(self, table: str, key: bytes) -> None:
        self._txn.delete(key, db=self._rt.store.table(table))

    def last(self, table: str) -> tuple[bytes, bytes] | None:
        cursor = self._txn.cursor(db=self._rt.store.table(table))
        return (cursor.key(), cursor.value()) if cursor.last() else None

    # outputs
    def forward(self, key: str, data: dict[str, Any]) -> None:
        """Owe this record to the downstream stage (outbox row, same transaction)."""
        self._rt.outbox.add(self._txn, key, item_encoder.encode(Item(key, data)))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.outgoing.append((topic, payload, qos, retain))

    def device_receipt(self, device_id: str, receipt: DeviceReceipt) -> None:
        self.publish(self.topics.receipt(device_id), json_encode(receipt))

    def reject(self, report: dict[str, Any], *, device_id: str | None = None) -> None:
        """Keep the error report in this stage's DLQ table, publish it to the DLQ topic and, when
        the device is known, send it a `rejected` receipt."""
        dlq = self._rt.store.table("dlq")
        cursor = self._txn.cursor(db=dlq)
        next_id = from_u64(cursor.key()) + 1 if cursor.last() else 0
        encoded = json_encode(report)
        self._txn.put(u64(next_id), encoded, db=dlq, append=True)
        self.publish(self.topics.dlq(self._rt.stage.name), encoded)
        if device_id:
            receipt = DeviceReceipt(
                status="rejected",
                at=utc_now(),
                event_id=report.get("event_id"),
                idempotency_key=report.get("idempotency_key"),
                errors=report["errors"],
            )
            self.device_receipt(device_id, receipt)
        self.failed += 1
        self.transitions.append(
            Transition(report.get("event_id"), report.get("idempotency_key"), "REJECTED",
                       {"rules": [e["rule"] for e in report["errors"]]})
        )

    def transition(self, correlation_id: str | None, key: str | None, state: str, **extra: Any) -> None:
        """Record a state change that finishes this stage's work on a record (counted as processed);
        it is logged only once the transaction has committed."""
        self.note(correlation_id, key, state, **extra)
        self.processed += 1

    def note(self, correlation_id: str | None, key: str | None, state: str, **extra: Any) -> None:
        """Record an intermediate state change (logged after commit, not counted)."""
        self.transitions.append(Transition(correlation_id, key, state, extra))


class StageRuntime:
    """Runs one `Stage` as a long-lived worker: one MQTT link, one LMDB store, one outbox."""

    def __init__(self, stage: Stage, config: Config):
        self.stage = stage
        self.config = config
        self.topics = Topics(config.station)
        self.log = get_logger(stage=stage.name)
        self.store = Store(
            config.stage_dir(stage.name), RUNTIME_TABLES + stage.tables, map_size_mb=config.stage.map_size_mb
        )
        self.input_topic = (
            self.topics.device_in_all if stage.consumes == "devices" else self.topics.stage_input(stage.name)
        )
        self.receipt_topic = self.topics.stage_receipt(stage.name)
        subscriptions = [(self.input_topic, 1), (self.receipt_topic, 1), (self.topics.control(stage.name), 1)]
        self.notice_topics = stage.notice_topics(self.topics)
        subscriptions += [(topic, 1) for topic in self.notice_topics]
        self.link = MqttLink(
            config,
            client_id=f"mro-{config.station}-{stage.name}",
            subscriptions=subscriptions,
            will=(self.topics.status(stage.name), self._status_payload("down")),
        )
        self.outbox = (
            Outbox(
                self.store,
                self.link.publish,
                topic=self.topics.stage_input(stage.downstream),
                source=stage.name,
                batch=config.stage.outbox_batch,
                redeliver_after_s=config.stage.redeliver_after_s,
                max_in_flight=config.stage.max_in_flight,
            )
            if stage.downstream
            else None
        )
        self._retry: list[Inbound] = []
        # batch_max counts records; a pipeline message carries up to outbox_batch of them
        per_message = 1 if stage.consumes == "devices" else config.stage.outbox_batch
        self._batch_messages = max(1, config.stage.batch_max // per_message)
        self._last_status = 0.0
        self.state = "up"
        self._faults = 0
        self._resume = threading.Event()
        self.link.direct[self.topics.control(stage.name)] = self._on_control
        self.link.on_connect_hooks.append(self.publish_status)
        self.link.on_trouble.append(self._alarm)

    # status
    def counters(self) -> tuple[int, int]:
        with self.store.read() as txn:
            meta = self.store.table("meta")
            processed = txn.get(b"processed", db=meta)
            failed = txn.get(b"failed", db=meta)
        return (from_u64(processed) if processed else 0, from_u64(failed) if failed else 0)

    def _status_payload(self, state: str) -> bytes:
        if state == "up" and self.link.contested:
            state = "contested"  # someone else keeps taking our session: not `up`
        processed, failed = self.counters() if state != "down" else (None, None)
        status = {"service": self.stage.name, "state": state, "pid": os.getpid(), "at": utc_now()}
        if state != "down":
            depth = self.outbox.pending() if self.outbox else 0
            status.update(queue_depth=depth + self.link.inbox.qsize(), processed=processed, failed=failed,
                          session_resets=self.link.session_resets, **self.stage.status_extra())
        return json_encode(status)

    def publish_status(self, state: str | None = None) -> None:
        self._last_status = time.monotonic()
        self.link.publish(self.topics.status(self.stage.name), self._status_payload(state or self.state),
                          retain=True)

    # local circuit breaker (seed 002): a stage that keeps failing freezes instead of dropping work
    def _on_control(self, payload: bytes) -> None:
        try:
            command = msgspec.json.decode(payload).get("command")
        except (msgspec.DecodeError, AttributeError):
            return
        if command == "resume":
            self.log.info("resume requested", state_transition="RESUME_REQUESTED")
            self._resume.set()

    def _stall(self, batch: list[Inbound], exc: Exception) -> None:
        """Keep the batch (unacked) for another try; after FREEZE_AFTER failures in a row, freeze:
        status `frozen`, an alarm to MCC, and a slower retry until the fault clears or an
        operator runs `mro-edge resume`."""
        self._faults += 1
        self._retry = batch
        self.log.error("batch failed; kept for retry", error=str(exc)[:200], failures=self._faults,
                       state_transition="STALLED")
        self._settle_receipts_while_stalled()
        if self._faults >= FREEZE_AFTER and self.state != "frozen":
            self.state = "frozen"
            self._alarm("frozen", f"{self._faults} failures in a row: {type(exc).__name__}: {str(exc)[:200]}")
            self.publish_status()
        self._resume.wait(5.0 if self.state == "frozen" else 0.5)
        self._resume.clear()

    def _settle_receipts_while_stalled(self) -> None:
        """Downstream receipts free outbox rows, which may be exactly what a full store needs:
        settle them now, alone; every other waiting message joins the held batch, in order."""
        receipts: list[Inbound] = []
        while True:
            try:
                message = self.link.inbox.get_nowait()
            except Exception:
                break
            (receipts if message.topic == self.receipt_topic else self._retry).append(message)
        if not receipts or not self.outbox:
            self._retry.extend(receipts)
            return
        keys = []
        for message in receipts:
            try:
                keys.extend(stage_receipt_decoder.decode(message.payload).keys)
            except msgspec.DecodeError:
                continue
        try:
            with self.store.write() as txn:
                settled = self.outbox.settle(txn, keys)
        except lmdb.Error:
            self._retry.extend(receipts)
            return
        self.outbox.forget(settled)
        for message in receipts:
            self.link.ack(message)

    def _recovered(self) -> None:
        self._faults = 0
        if self.state == "frozen":
            self.state = "up"
            self._alarm("resumed", "the stage processes records again")
            self.publish_status()

    def _alarm(self, kind: str, detail: str) -> None:
        self.log.error("alarm", alarm=kind, detail=detail, state_transition=f"ALARM_{kind.upper()}")
        self.link.publish(self.topics.alarm, json_encode(
            {"service": self.stage.name, "alarm": kind, "detail": detail, "at": utc_now()}))

    # main loop
    def serve(self, stop: threading.Event) -> None:
        self.stage.open(self)
        self.link.start()
        self.log.info("stage started", state_transition="STARTED", input=self.input_topic)
        try:
            while not stop.is_set():
                watchdog.beat()  # the supervisor's hang detection (shared/runtime/watchdog.py)
                batch = self._collect()
                if batch:
                    self._process(batch)
                if self.outbox and self.link.connected.is_set():
                    self.outbox.pump()
                if time.monotonic() - self._last_status >= self.config.stage.status_interval_s:
                    self.publish_status()
        finally:
            self.stage.close()
            self.publish_status("down")
            time.sleep(0.1)
            self.link.stop()
            self.store.close()
            self.log.info("stage stopped", state_transition="STOPPED")

    def _collect(self) -> list[Inbound]:
        if self._retry:
            batch, self._retry = self._retry, []
            return batch
        inbox = self.link.inbox
        try:
            first = inbox.get(timeout=0.05)
        except Exception:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.stage.batch_wait_ms / 1000
        while len(batch) < self._batch_messages:
            remaining = deadline - time.monotonic()
            try:
                batch.append(inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait())
            except Exception:
                break
        return batch

    def _decode(self, batch: list[Inbound]):
        inputs: list = []
        receipted: list[str] = []
        notices: list[Inbound] = []
        upstream: dict[str, list[str]] = {}
        broken: list[Inbound] = []
        for message in batch:
            if message.topic == self.receipt_topic:
                try:
                    receipted.extend(stage_receipt_decoder.decode(message.payload).keys)
                except msgspec.DecodeError:
                    self.log.warning("unreadable stage receipt ignored", topic=message.topic)
            elif message.topic in self.notice_topics:
                notices.append(message)
            elif self.stage.consumes == "devices":
                inputs.append(DeviceMessage(message.topic, message.payload, utc_from_epoch(message.received_at)))
            else:
                try:
                    envelope = envelope_decoder.decode(message.payload)
                except msgspec.DecodeError:
                    broken.append(message)
                    continue
                inputs.extend(envelope.items)
                upstream.setdefault(envelope.source, []).extend(item.key for item in envelope.items)
        return inputs, receipted, notices, upstream, broken

    def _process(self, batch: list[Inbound]) -> None:
        inputs, receipted, notices, upstream, broken = self._decode(batch)
        try:
            uows = self._commit(inputs, receipted, notices, broken)
        except (lmdb.Error, StageFault) as exc:
            self._stall(batch, exc)
            return
        self._recovered()
        for message in batch:
            self.link.ack(message)
        for uow in uows:
            for topic, payload, qos, retain in uow.outgoing:
                self.link.publish(topic, payload, qos, retain)
            for t in uow.transitions:
                self.log.info("record", correlation_id=t.correlation_id, idempotency_key=t.key,
                              state_transition=t.state, **t.extra)
        for source, keys in upstream.items():
            self.link.publish(self.topics.stage_receipt(source), json_encode(StageReceipt(self.stage.name, keys)))

    def _commit(self, inputs, receipted, notices, broken) -> list[UnitOfWork]:
        """One transaction for the batch; if the handler raises on it, isolate the poison by
        committing each input alone and sending the ones that still raise to the DLQ."""
        settled: list[int] = []
        try:
            with self.store.write() as txn:
                uow = UnitOfWork(self, txn)
                if self.outbox and receipted:
                    settled = self.outbox.settle(txn, receipted)
                for notice in notices:
                    self.stage.handle_notice(notice.topic, notice.payload, uow)
                for message in broken:
                    uow.reject(self._broken_envelope_report(message))
                if inputs:
                    self.stage.handle(inputs, uow)
                self._count(txn, uow)
            uows = [uow]
        except lmdb.Error:
            raise
        except Exception:
            self.log.exception("batch failed; isolating each record", state_transition="ISOLATING")
            uows = self._commit_one_by_one(inputs, receipted, notices, broken)
        if self.outbox:
            self.outbox.forget(settled)
        return uows

    def _commit_one_by_one(self, inputs, receipted, notices, broken) -> list[UnitOfWork]:
        uows = []
        with self.store.write() as txn:
            uow = UnitOfWork(self, txn)
            settled = self.outbox.settle(txn, receipted) if self.outbox and receipted else []
            for message in broken:
                uow.reject(self._broken_envelope_report(message))
            self._count(txn, uow)
        if self.outbox:
            self.outbox.forget(settled)
        uows.append(uow)
        failures_in_a_row = 0
        for single in [[n] for n in notices] + [[i] for i in inputs]:
            try:
                with self.store.write() as txn:
                    uow = UnitOfWork(self, txn)
                    if isinstance(single[0], Inbound):
                        self.stage.handle_notice(single[0].topic, single[0].payload, uow)
                    else:
                        self.stage.handle(single, uow)
                    self._count(txn, uow)
                failures_in_a_row = 0
            except lmdb.Error:
                raise
            except Exception as exc:
                if isinstance(single[0], Inbound):
                    self.log.warning("notice dropped", topic=single[0].topic, error=type(exc).__name__)
                    continue
                failures_in_a_row += 1
                if failures_in_a_row >= FREEZE_AFTER:
                    raise StageFault(f"{failures_in_a_row} records in a row failed: {exc!r}") from exc
                with self.store.write() as txn:
                    uow = UnitOfWork(self, txn)
                    self._reject_poison(single[0], exc, uow)
                    self._count(txn, uow)
            uows.append(uow)
        return uows

    def _reject_poison(self, item, exc: Exception, uow: UnitOfWork) -> None:
        key = item.key if isinstance(item, Item) else None
        device_id = None
        if isinstance(item, DeviceMessage):
            device_id = (self.topics.parse_device_in(item.topic) or (None, None))[1]
        error = {"path": "$", "rule": "stage_error", "expected": f"a record the {self.stage.name} stage can process",
                 "received": type(exc).__name__}
        report = {"stage": self.stage.name, "received_at": utc_now(), "errors": [error]}
        if key:
            report["idempotency_key"] = key
            event_id = item.data.get("event_id") if isinstance(item.data, dict) else None
            if event_id:
                report["event_id"] = event_id
            uow.remember(key, b"rejected")
        uow.reject(report, device_id=device_id)

    def _broken_envelope_report(self, message: Inbound) -> dict[str, Any]:
        error = {"path": "$", "rule": "envelope", "expected": "a pipeline batch {source, items:[{key, data}]}",
                 "received": f"{len(message.payload)} unreadable bytes"}
        return {"stage": self.stage.name, "received_at": utc_now(), "errors": [error]}

    def _count(self, txn, uow: UnitOfWork) -> None:
        meta = self.store.table("meta")
        for name, delta in ((b"processed", uow.processed), (b"failed", uow.failed)):
            if delta:
                raw = txn.get(name, db=meta)
                txn.put(name, u64((from_u64(raw) if raw else 0) + delta), db=meta)


def run_stage(stage: Stage, config: Config) -> None:
    """Entry point of `mro-edge service NAME`: run until SIGTERM/SIGINT, then stop cleanly."""
    configure_logging(stage.name, config.station)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        StageRuntime(stage, config).serve(stop)
    except StageRefused as exc:
        get_logger(stage=stage.name).error("refusing to start", alarm=exc.kind, detail=str(exc),
                                           state_transition="REFUSED")
        print(f"mro-edge {stage.name}: {exc}", file=sys.stderr)
        raise SystemExit(REFUSED_EXIT) from None
