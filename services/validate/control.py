"""What is in force for the validate stage: the registries, the contract version and the
schema-drift breaker.

Two services-only topics (ACL: only the operator may publish them, only validate reads them) change it:
`Topics.registry` (authority-signed registry updates, `services.validate.registry`) and
`Topics.schema` (commands from `mro-edge schema ...`, `services.validate.commands`); a third,
`Topics.redrive`, judges rejected records again (`mro-edge dlq redrive`, `services.validate.redrive`). While the
breaker is open, torque events and part receipts are held (`services.validate.held`) and
sign-offs keep flowing under the active version.

The contract state (`services.validate.state.SchemaState`) lives in one LMDB value
(`compliance` table, `schema/state`), written in the batch transaction and re-read whenever it
differs from the cached bytes, so memory never runs ahead of what committed.
"""

from __future__ import annotations

from typing import Any

from services.validate import held
from services.validate.commands import SchemaCommands
from services.validate.redrive import Redrive
from services.validate.registry import CONTROL_TABLE, RegistryUpdates, read_overlay, read_serial
from services.validate.state import SchemaState, decode_state, encode_state
from shared.compliance import Compliance, RegistrySource
from shared.compliance.settings import compliance_settings
from shared.compliance.versions import BASE, ContractVersion, compile_version
from shared.runtime.alarms import alarm_payload
from shared.runtime.clock import clock_sync
from shared.runtime.logs import get_logger
from shared.runtime.messages import ReceivedRecord
from shared.runtime.store import Store
from shared.runtime.work import UnitOfWork

_STATE = b"schema/state"


class SchemaControl:
    def __init__(self, stage, config, store: Store):
        self.stage = stage
        self.config = config
        self.settings = compliance_settings(config)
        self.log = get_logger(stage=stage.name)
        with store.read() as txn:
            table = store.table(CONTROL_TABLE)
            self._state_raw = txn.get(_STATE, db=table)
            overlay = read_overlay(lambda _table, key: txn.get(key, db=table))
        self.source = RegistrySource(self.settings.registries_dir, self.settings.registry_check_s)
        self.state = decode_state(self._state_raw)
        self._active_definition = self.state.active
        self.active = self.compile(self.state.active)
        self.compliance = Compliance(self.source.load(overlay), self.active)
        self._registry_error: str | None = None
        self.registry_updates = RegistryUpdates(self.source, self.settings.authority_public_key, self.alarm)
        self.commands = SchemaCommands(self)
        self.require_sync = config.clock.require_sync
        self.redrive = Redrive(config.station, lambda item, uow: stage.judge(item, uow, may_hold=False),
                               lambda: self.breaker_open, self.log, lambda: self.clock_untrusted)

    @staticmethod
    def compile(definition: dict | None) -> ContractVersion:
        return compile_version(definition) if definition else BASE

    @property
    def breaker_open(self) -> bool:
        return self.state.breaker_open

    @property
    def clock_untrusted(self) -> bool:
        """`[clock] require_sync` is set and the kernel does not call the clock synchronised: the
        time rules may not judge now (records are held until it is)."""
        return self.require_sync and clock_sync().synchronised is not True

    @property
    def clock_release_due(self) -> bool:
        """Records are held, and neither the breaker nor the clock holds them any longer."""
        return self.state.held > 0 and not self.breaker_open and not self.clock_untrusted

    def refresh(self, uow: UnitOfWork) -> None:
        """Bring the registry and the schema state in line with the committed state (cheap)."""
        raw_state = uow.get(CONTROL_TABLE, _STATE)
        if raw_state != self._state_raw:
            self._state_raw, self.state = raw_state, decode_state(raw_state)
            self._adopt_active()
        registry, error = self.source.current(read_serial(uow.get), lambda: read_overlay(uow.get))
        if error and error != self._registry_error:
            self.alarm(uow, "registry_refused", f"registry change refused, previous registry stays: {error}")
        self._registry_error = error
        if registry is not self.compliance.registry or self.active is not self.compliance.version:
            self.compliance = Compliance(registry, self.active)

    def notice(self, topic: str, payload: bytes, uow: UnitOfWork) -> None:
        if topic == uow.topics.registry:
            registry = self.registry_updates.apply(payload, uow)
            if registry is not None:
                self.compliance = Compliance(registry, self.active)
        elif topic == uow.topics.schema:
            self.commands.handle(payload, uow)
        elif topic == uow.topics.redrive:
            self.redrive.handle(payload, uow)

    def save(self, uow: UnitOfWork, state: SchemaState) -> None:
        """Write `state` in this batch and put its active version in force."""
        raw = encode_state(state)
        uow.put(CONTROL_TABLE, _STATE, raw)
        self._state_raw, self.state = raw, state
        self._adopt_active()

    def _adopt_active(self) -> None:
        """Recompile the active version only when its definition changed."""
        if self.state.active != self._active_definition:
            self._active_definition = self.state.active
            self.active = self.compile(self.state.active)
            self.compliance = Compliance(self.compliance.registry, self.active)

    def hold(self, item: ReceivedRecord, uow: UnitOfWork) -> None:
        self.save(uow, held.hold(uow, self.state, item))

    def release(self, uow: UnitOfWork) -> int:
        """Settle every held record under the version now in force; how many there were. None
        while the clock may not be trusted (`clock_untrusted`): they wait for it (`clock_release_due`)."""
        if self.clock_untrusted:
            return 0
        state, count = held.release(uow, self.state,
                                    lambda item, work: self.stage.judge(item, work, may_hold=False))
        self.save(uow, state)
        return count

    def status(self) -> dict[str, Any]:
        state = self.state
        out: dict[str, Any] = {"contract": self.active.version, "breaker": state.breaker, "held": state.held,
                               "registry": self.compliance.registry.digest[:12],
                               "clock": {**clock_sync().as_dict(), "require_sync": self.require_sync}}
        if state.staged:
            out["staged"] = state.staged.get("version")
        return out

    def alarm(self, uow: UnitOfWork, kind: str, detail: str) -> None:
        self.log.error("alarm", alarm=kind, detail=detail[:300], state_transition=f"ALARM_{kind.upper()}")
        uow.publish(uow.topics.alarm, alarm_payload(self.stage.name, kind, detail))
