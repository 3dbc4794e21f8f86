"""The stage runtime's loop: everything a pipeline stage needs except its domain logic.

For each batch of MQTT messages (DESIGN.md section 2):
  1. decode transport -> typed inputs (device publishes, or the hop's items: `shared.runtime.messages`),
     a pipeline message only once its hop seal proves the entitled sender (`shared.runtime.hopauth`);
  2. ONE synced LMDB write transaction: settle receipted outbox rows, notices, then the batch
     (`shared.runtime.delivery.run_batch`: dedupe, the handler's verdicts, fates, outbox and
     DLQ rows) -> commit; a handler that raises is isolated record by record (`poison`);
  3. ack to the broker in arrival order, publish what the batch queued (device receipts, DLQ
     reports, outcome notices), receipt the upstream stage with every key now held;
  4. pump the outbox downstream.
A failing store holds the batch and eventually freezes the stage (`freeze`); the retained status
is `status`'s. A stage implements `shared.runtime.handler.Stage` and never touches paho or LMDB.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import lmdb
import msgspec

from shared.runtime import delivery, dlq, retention, watchdog
from shared.runtime.alarms import alarm_payload
from shared.runtime.budget import is_disk_full
from shared.runtime.clock import utc_from_epoch, utc_now
from shared.runtime.config import Config, ConfigError, load_config
from shared.runtime.diskfull import IntakeGate, refused_receipt
from shared.runtime.freeze import Freeze
from shared.runtime.handler import DeviceMessage, Stage
from shared.runtime.hopauth import HopAuth, HopAuthError, HopKeyError, hop_auth_report
from shared.runtime.logs import configure_logging, get_logger
from shared.runtime.messages import (
    FateQuery,
    StageReceipt,
    envelope_decoder,
    json_encode,
    stage_receipt_decoder,
)
from shared.runtime.mqtt import Inbound, MqttLink, client_id_for, service_credentials
from shared.runtime.outbox import OUTBOX_TABLES, Outbox
from shared.runtime.poison import StageFault, broken_envelope_report, isolate
from shared.runtime.prune import Pruner
from shared.runtime.status import StatusReport, add_counts
from shared.runtime.store import MIB, MapFullAtCap, MapGrown, Store
from shared.runtime.topics import Topics
from shared.runtime.work import DLQ, SEEN, LmdbUnitOfWork, UnitOfWork

RUNTIME_TABLES = (SEEN, DLQ, dlq.SUMMARY, "meta", *OUTBOX_TABLES, retention.SEEN_AGE)
REFUSED_EXIT = 3


class StageRefused(Exception):
    """The stage must not start (e.g. its store is behind a signed checkpoint): `kind` names the
    alarm, the message explains the recovery. The process exits with REFUSED_EXIT and the
    supervisor does not restart it: a person has to act."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Batch:
    """One batch of MQTT messages, sorted by what they are."""

    inputs: list[Any] = field(default_factory=list)
    receipted: list[str] = field(default_factory=list)
    notices: list[Inbound] = field(default_factory=list)
    upstream: dict[str, list[str]] = field(default_factory=dict)
    broken: list[Inbound] = field(default_factory=list)
    forged: list[dict[str, Any]] = field(default_factory=list)  # hop_auth reports: never processed


class StageRuntime:
    """Runs one `Stage` as a long-lived worker: one MQTT link, one LMDB store, one outbox."""

    def __init__(self, stage: Stage, config: Config):
        self.stage = stage
        self.config = config
        self.topics = Topics(config.station)
        self.log = get_logger(stage=stage.name)
        self.intake = stage.consumes == "devices"
        self.input_topic = self.topics.device_in_all if self.intake else self.topics.stage_input(stage.name)
        self.receipt_topic = self.topics.stage_receipt(stage.name)
        # intake keeps final fates for re-sends; a stage that `learns_recorded` the seqs (retention)
        outcomes = (self.topics.outcomes,) if self.intake or stage.learns_recorded else ()
        holds = () if stage.knows_gateway_holds else (self.topics.gateway_holds,)
        self.notice_topics = stage.notice_topics(self.topics) + outcomes + holds
        self.heard_holds: retention.GatewayHolds | None = None  # as the uplink last told it
        self.decoder = None if self.intake else envelope_decoder(stage.input_type | FateQuery)
        subscriptions = [(self.input_topic, 1), (self.receipt_topic, 1), (self.topics.control(stage.name), 1)]
        subscriptions += [(topic, 1) for topic in self.notice_topics]
        try:
            self.hop = HopAuth.for_service(config.data_path, self.topics, stage.name,
                                           tuple(topic for topic, _ in subscriptions))
        except HopKeyError as exc:
            raise StageRefused("hop_key", str(exc)) from None
        self.store = Store(config.stage_dir(stage.name), RUNTIME_TABLES + stage.tables,
                           map_size_mb=config.stage.map_size_mb, map_max_mb=config.store_cap_mb(stage.name))
        self.pruner = Pruner(self.store, config.stage_dir(stage.name), config.retention, self.log,
                             stage.gateway_holds if stage.knows_gateway_holds else lambda: self.heard_holds)
        self._told_holds: retention.GatewayHolds | None = None
        self.status = StatusReport(stage.name, self.store, self._queue_depth, self._status_extra,
                                   lambda: (self.link.contested, self.link.session_resets),
                                   lambda: self.outbox.oldest_unreceipted_s() if self.outbox else None)
        login = service_credentials(config, stage.name)
        self.link = MqttLink(config, client_id=client_id_for(config, stage.name, login), credentials=login,
                             subscriptions=subscriptions,
                             will=(self.topics.status(stage.name), self.status.payload("down")))
        self.outbox = (
            Outbox(self.store, self.publish_sealed, topic=self.topics.stage_input(stage.downstream),
                   source=stage.name,
                   batch=config.stage.outbox_batch, redeliver_after_s=config.stage.redeliver_after_s,
                   max_in_flight=config.stage.max_in_flight)
            if stage.downstream else None
        )
        self.freeze = Freeze(self.log, self._alarm, self.publish_status)
        # the disk-full policy: only the intake stage refuses device input (`shared.runtime.diskfull`)
        self.gate = (IntakeGate(config, self._alarm, self.publish_status, self.log,
                                own={stage.name: self.store}) if self.intake else None)
        self._retry: list[Inbound] = []
        # batch_max counts records; a pipeline message carries up to outbox_batch of them
        per_message = 1 if self.intake else config.stage.outbox_batch
        self._batch_messages = max(1, config.stage.batch_max // per_message)
        self.link.direct[self.topics.control(stage.name)] = self.freeze.on_control
        self.link.on_connect_hooks.append(self.publish_status)
        self.link.on_connect_hooks.append(self._tell_holds_again)
        self.link.on_trouble.append(self._alarm)

    # status and alarms
    @property
    def state(self) -> str:
        return "frozen" if self.freeze.frozen or (self.gate and self.gate.refusing) else "up"

    def _status_extra(self) -> dict[str, Any]:
        return {**self.stage.status_extra(), "retention": self.pruner.status(),
                **(self.gate.status() if self.gate else {})}

    def _queue_depth(self) -> int:
        return (self.outbox.pending() if self.outbox else 0) + self.link.inbox.qsize()

    def publish_status(self, state: str | None = None) -> None:
        self.status.sent()
        self.link.publish(self.topics.status(self.stage.name), self.status.payload(state or self.state),
                          retain=True)

    def publish_sealed(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish, sealed with this service's hop key if `topic` is a pipeline hop (`hopauth`)."""
        self.link.publish(topic, self.hop.seal(topic, payload), qos, retain)

    def _alarm(self, kind: str, detail: str) -> None:
        self.log.error("alarm", alarm=kind, detail=detail, state_transition=f"ALARM_{kind.upper()}")
        self.link.publish(self.topics.alarm, alarm_payload(self.stage.name, kind, detail))

    # main loop
    def serve(self, stop: threading.Event) -> None:
        self.stage.open(self)
        self.link.start()
        self.log.info("stage started", state_transition="STARTED", input=self.input_topic)
        try:
            while not stop.is_set():
                watchdog.beat()  # the supervisor's hang detection (shared/runtime/watchdog.py)
                if self.gate:
                    self.gate.turn()
                messages = self._collect()
                if messages:
                    self._process(messages)
                if self.outbox and self.link.connected.is_set():
                    self.outbox.pump()
                self.pruner.step()  # at most one short write transaction per turn
                if self.stage.knows_gateway_holds:
                    self._tell_holds()
                if self.status.due(self.config.stage.status_interval_s):
                    self._turn()
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
            messages, self._retry = self._retry, []
            return messages
        inbox = self.link.inbox
        try:
            first = inbox.get(timeout=0.05)
        except Exception:
            return []
        messages = [first]
        deadline = time.monotonic() + self.config.stage.batch_wait_ms / 1000
        while len(messages) < self._batch_messages:
            remaining = deadline - time.monotonic()
            try:
                messages.append(inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait())
            except Exception:
                break
        return messages

    def _turn(self) -> None:
        """A transaction without records when the stage wants one (`Stage.wants_turn`)."""
        if self.freeze.frozen or not self.stage.wants_turn():
            return
        try:
            with self.transaction() as uow:
                delivery.run_batch(self.stage, [], uow)
        except Exception as exc:  # a failing store or stage: the next record's batch meets it too
            self.log.warning("turn without records failed; tried again later", error=str(exc)[:200])
            return
        for topic, payload, qos, retain in uow.messages():
            self.publish_sealed(topic, payload, qos, retain)
        for t in uow.transitions:
            self.log.info("record", correlation_id=t.correlation_id, idempotency_key=t.key,
                          state_transition=t.state, **t.extra)

    def decode(self, messages: list[Inbound]) -> Batch:
        """Sort and decode a batch; a pipeline message whose hop seal fails is kept only as a
        `hop_auth` report (DLQ and alarm): its items are never judged, its receipt never settles."""
        batch = Batch()
        for message in messages:
            if message.topic == self.receipt_topic:
                opened = self._open(message, batch)
                if opened is None:
                    continue
                try:
                    receipt = stage_receipt_decoder.decode(opened[1])
                except msgspec.DecodeError:
                    self.log.warning("unreadable stage receipt ignored", topic=message.topic)
                    continue
                if self._claims(message, batch, receipt.stage, opened[0]):
                    batch.receipted.extend(receipt.keys)
            elif message.topic in self.notice_topics:
                opened = self._open(message, batch)
                if opened is not None:
                    batch.notices.append(replace(message, payload=opened[1]))
            elif self.decoder is None:
                batch.inputs.append(DeviceMessage(message.topic, message.payload,
                                                  utc_from_epoch(message.received_at)))
            else:
                opened = self._open(message, batch)
                if opened is None:
                    continue
                try:
                    envelope = self.decoder.decode(opened[1])
                except msgspec.DecodeError:
                    batch.broken.append(message)
                    continue
                if self._claims(message, batch, envelope.source, opened[0]):
                    batch.inputs.extend(envelope.items)
                    batch.upstream.setdefault(envelope.source, []).extend(item.key for item in envelope.items)
        return batch

    def _open(self, message: Inbound, batch: Batch) -> tuple[str | None, bytes] | None:
        """(sender, body) of a message, the sender None on a topic that is not sealed; None once a
        failed seal is reported."""
        if not self.hop.sealed(message.topic):
            return None, message.payload
        try:
            return self.hop.open(message.topic, message.payload)
        except HopAuthError as exc:
            self._forged(message, batch, exc.received)
            return None

    def _claims(self, message: Inbound, batch: Batch, named: str, sealer: str | None) -> bool:
        """The stage a message names inside is the one that sealed it (receipts go back to it)."""
        if sealer is None or named == sealer:
            return True
        self._forged(message, batch, f"sealed by {sealer!r} but naming {named[:32]!r} as its sender")
        return False

    def _forged(self, message: Inbound, batch: Batch, received: str) -> None:
        self.log.error("forged pipeline message", topic=message.topic, detail=received,
                       state_transition="HOP_AUTH_FAILED")
        batch.forged.append(hop_auth_report(self.stage.name, message.topic, received, utc_now()))

    def _refuse_device_input(self, messages: list[Inbound]) -> list[Inbound]:
        """While storage is full: hold the batch (embedded broker: what reached us is in its spool)
        or answer each device publish with a `rejected` receipt, rule storage_full, and ack it
        (Mosquitto); the messages left to process. `shared.runtime.diskfull` says why."""
        assert self.gate is not None
        if self.gate.holds:
            self._retry = messages
            self._settle_receipts_while_stalled()
            self.freeze.wait()
            return []
        kept: list[Inbound] = []
        for message in messages:
            if message.topic == self.receipt_topic or message.topic in self.notice_topics:
                kept.append(message)
                continue
            device = self.topics.parse_device_in(message.topic)
            if device is not None:
                self.link.publish(self.topics.receipt(device[1]), refused_receipt(message.payload, self.config))
            self.link.ack(message)
            self.gate.refused += 1
            self.status.figures.records["in"] += 1
            self.status.figures.records["rejected"] += 1
        return kept

    def _process(self, messages: list[Inbound]) -> None:
        if self.gate and self.gate.turn():
            messages = self._refuse_device_input(messages)
            if not messages:
                return
        batch = self.decode(messages)
        started = time.monotonic()
        try:
            uows = self.commit(batch)
        except MapGrown as exc:
            self.log.info("store map grown; batch retried", detail=str(exc), map_mb=self.store.map_size // MIB,
                          state_transition="MAP_GROWN")
            self._retry = messages  # rolled back whole: the next turn commits it into the bigger map
            return
        except (lmdb.Error, StageFault) as exc:
            if self.gate and is_disk_full(exc):
                self.gate.disk_full(exc)  # the retry is refused or held, never lost
            self._stall(messages, exc)
            return
        self.status.figures.batch(received=len(batch.inputs), passed=sum(u.passed for u in uows),
                                  rejected=sum(u.failed for u in uows),
                                  duplicates=sum(u.duplicates for u in uows),
                                  seconds=time.monotonic() - started)
        self.freeze.recovered()
        for message in messages:
            self.link.ack(message)
        if batch.forged:
            self._alarm("hop_auth", f"{len(batch.forged)} pipeline message(s) not sealed by the service "
                        f"entitled to send them, first: {batch.forged[0]['errors'][0]['received']}; "
                        "kept in the DLQ, nothing of them processed")
        for uow in uows:
            for topic, payload, qos, retain in uow.messages():
                self.publish_sealed(topic, payload, qos, retain)
            for t in uow.transitions:
                self.log.info("record", correlation_id=t.correlation_id, idempotency_key=t.key,
                              state_transition=t.state, **t.extra)
        for source, keys in batch.upstream.items():
            self.publish_sealed(self.topics.stage_receipt(source), json_encode(StageReceipt(self.stage.name, keys)))

    # the batch transaction
    @contextmanager
    def transaction(self) -> Iterator[LmdbUnitOfWork]:
        """One synced write transaction as a unit of work; its counters commit with it."""
        with self.store.write() as txn:
            uow = LmdbUnitOfWork(self.stage, self.topics, self.store, txn, self.outbox,
                                 dlq_budget=self.config.dlq_budget_bytes())
            yield uow
            meta = self.store.table("meta")
            add_counts(lambda k: txn.get(k, db=meta), lambda k, v: txn.put(k, v, db=meta), uow.processed,
                       uow.failed)

    def commit(self, batch: Batch) -> list[UnitOfWork]:
        """One transaction for the batch; if the handler raises on it, isolate the poison by
        committing each input alone and sending the ones that still raise to the DLQ."""
        try:
            with self.transaction() as uow:
                settled = uow.settle_receipts(batch.receipted)
                for notice in batch.notices:
                    self.notice(notice, uow)
                for message in batch.broken:
                    delivery.reject(uow, broken_envelope_report(self.stage.name, message), None)
                for report in batch.forged:
                    delivery.reject(uow, report, None)
                if batch.inputs:
                    delivery.run_batch(self.stage, batch.inputs, uow)
            uows: list[UnitOfWork] = [uow]
        except lmdb.Error:
            raise
        except Exception:
            self.log.exception("batch failed; isolating each record", state_transition="ISOLATING")
            isolated, settled = isolate(self, batch)
            uows = list(isolated)
        if self.outbox:
            self.outbox.forget(settled)
        return uows

    def notice(self, message: Inbound, uow: UnitOfWork) -> None:
        if self.intake and message.topic == self.topics.outcomes:
            delivery.apply_outcomes(uow, message.payload)
        elif message.topic == self.topics.outcomes:
            retention.learn_recorded(uow, message.payload)
        elif message.topic == self.topics.gateway_holds:
            self._hear_holds(message.payload)
        else:
            self.stage.handle_notice(message.topic, message.payload, uow)

    # retention: what the gateway holds, told by the stage that knows it, heard by the others
    def _hear_holds(self, payload: bytes) -> None:
        try:
            self.heard_holds = retention.gateway_holds_decoder.decode(payload)
        except msgspec.DecodeError:
            self.log.warning("unreadable gateway-holds message ignored", topic=self.topics.gateway_holds)

    def _tell_holds(self) -> None:
        """Publish (retained, sealed) what the gateway holds whenever it changed."""
        holds = self.stage.gateway_holds()
        if holds is None or not self.link.connected.is_set():
            return
        told = self._told_holds
        if told is not None and (told.acknowledged, told.cosigned) == (holds.acknowledged, holds.cosigned):
            return
        self._told_holds = holds
        self.publish_sealed(self.topics.gateway_holds, json_encode(holds), retain=True)

    def _tell_holds_again(self) -> None:
        self._told_holds = None  # a new connection: the broker may have lost the retained message

    # a failing store
    def _stall(self, messages: list[Inbound], exc: Exception) -> None:
        """Keep the messages (unacked) for another try; the freeze decides how long to wait."""
        self._retry = messages
        self.freeze.failed(exc)
        self._settle_receipts_while_stalled()
        self.freeze.wait()
        if isinstance(exc, MapFullAtCap):
            self._reread_map_cap()

    def _reread_map_cap(self) -> None:
        """A store full at its cap reads the cap again (edge.toml and the environment, as at start),
        so raising it and `mro-edge resume STAGE` lets the stage go on without a restart."""
        try:
            cap = load_config().store_cap_mb(self.stage.name) * MIB
        except (ConfigError, OSError) as exc:
            self.log.warning("cannot read the configuration again", error=str(exc)[:200])
            return
        if cap != self.store.max_bytes:
            self.log.info("store cap changed", cap_mb=cap // MIB, state_transition="MAP_CAP_CHANGED")
            self.store.max_bytes = max(cap, self.store.map_size)

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
        keys = self.decode(receipts).receipted
        try:
            with self.store.write() as txn:
                settled = self.outbox.settle(txn, keys)
        except lmdb.Error:
            self._retry.extend(receipts)
            return
        self.outbox.forget(settled)
        for message in receipts:
            self.link.ack(message)


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
