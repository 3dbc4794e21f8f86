"""The contract-version commands: stage, dry-run, activate (or override) and rollback.

Staging runs a dry run at once; above the tolerance the breaker opens (`state.dry_run_recorded`).
`activate` refuses above the tolerance unless overridden with a reason; activation, override and
rollback close the breaker, go to the ledger as `schema_change` entries and release the held
records, judged under the version then in force.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from services.validate import state as transitions
from services.validate.changes import forward_change, schema_change_body
from services.validate.drift import drift_report
from shared.compliance.versions import ContractVersion, DefinitionError, compile_version
from shared.runtime.clock import utc_now
from shared.runtime.work import UnitOfWork

if TYPE_CHECKING:
    from services.validate.control import SchemaControl


class CommandError(Exception):
    """A schema command that cannot be carried out; its text is the reply."""


class ContractCommands:
    def __init__(self, control: SchemaControl):
        self.control = control

    def stage(self, command: dict, uow: UnitOfWork) -> dict:
        definition: Any = command.get("definition")  # compile_version refuses what is not an object
        try:
            version = compile_version(definition)
        except DefinitionError as exc:
            raise CommandError(f"cannot stage: {exc}") from None
        active = self.control.active
        if version.number <= active.number:
            raise CommandError(f"cannot stage {version.version}: {active.version} is active; "
                               "a new version must have a higher number")
        self.control.save(uow, transitions.staged(self.control.state, version.definition, utc_now()))
        report = self._dry_run(version, command, uow)
        return {"message": f"staged {version.version}; {report['summary']}", "dry_run": report}

    def dry_run(self, command: dict, uow: UnitOfWork) -> dict:
        report = self._dry_run(self._staged(), command, uow)
        return {"message": report["summary"], "dry_run": report}

    def activate(self, command: dict, uow: UnitOfWork) -> dict:
        version = self._staged()
        override = bool(command.get("override"))
        reason = str(command.get("reason") or "").strip()
        if override and not reason:
            raise CommandError("an override needs --reason: why the drift is acceptable, for the ledger")
        report = self._dry_run(version, command, uow)
        if not report["within_tolerance"] and not override:
            raise CommandError(f"activation refused: {report['summary']}. The breaker holds torque events "
                               "and part receipts; fix the devices and run dry-run again, roll back, or "
                               "activate --override --reason TEXT")
        control = self.control
        previous = control.active.version
        action = "override" if override else "activate"
        body = schema_change_body(action, station=control.config.station, version=version.version,
                                  previous=previous, command=command, definition=version.definition,
                                  dry_run=report["report"], reason=reason or None)
        control.save(uow, transitions.activated(control.state, version.definition, utc_now()))
        event_id = forward_change(body, uow)
        released = control.release(uow)
        control.log.warning("contract version activated", state_transition=f"SCHEMA_{action.upper()}",
                            version=version.version, previous=previous, released=released,
                            failed_ppm=report["report"]["failed_ppm"])
        return {"message": f"{version.version} is active ({action}); {released} held record(s) released",
                "ledger_event_id": event_id, "released": released, "dry_run": report}

    def rollback(self, command: dict, uow: UnitOfWork) -> dict:
        control = self.control
        state, active = control.state, control.active
        reason = str(command.get("reason") or "").strip() or None
        entry: dict[str, Any] = {"station": control.config.station, "command": command, "reason": reason}
        if state.staged:
            withdrawn = state.staged["version"]
            body = schema_change_body("rollback", version=active.version, previous=active.version,
                                      withdrawn=withdrawn, definition=state.staged, dry_run=state.dry_run,
                                      **entry)
            new = transitions.withdrawn(state, utc_now())
            message = f"withdrew staged {withdrawn}; {active.version} stays active"
        elif state.active:
            new = transitions.rolled_back(state, utc_now())
            target = control.compile(new.active).version
            withdrawn = active.version
            body = schema_change_body("rollback", version=target, previous=withdrawn, withdrawn=withdrawn,
                                      definition=state.active, dry_run=None, **entry)
            message = f"rolled back from {withdrawn} to {target}"
        else:
            raise CommandError(f"nothing to roll back: nothing is staged and {active.version} is the base")
        control.save(uow, new)
        event_id = forward_change(body, uow)
        released = control.release(uow)
        control.log.warning("contract version rolled back", state_transition="SCHEMA_ROLLBACK",
                            withdrawn=withdrawn, active=control.active.version, released=released)
        return {"message": f"{message}; {released} held record(s) released", "ledger_event_id": event_id,
                "released": released}

    def _staged(self) -> ContractVersion:
        staged = self.control.state.staged
        if not staged:
            raise CommandError("nothing is staged: mro-edge schema stage FILE first")
        return compile_version(staged)

    def _dry_run(self, version: ContractVersion, command: dict, uow: UnitOfWork) -> dict:
        """Replay `version` over the ledger; drift above the tolerance opens the breaker with an alarm."""
        control = self.control
        sample = command.get("sample")
        sample = sample if type(sample) is int and sample > 0 else control.settings.dry_run_sample
        report = drift_report(control.config, version, sample=sample,
                              tolerance_ppm=control.settings.tolerance_ppm)
        report_dict = msgspec.to_builtins(report)
        was_open = control.state.breaker_open
        new = transitions.dry_run_recorded(control.state, report_dict, summary=report.summary(),
                                           within_tolerance=report.within_tolerance, now=utc_now())
        if new.breaker_open and not was_open:
            control.alarm(uow, "schema_drift", f"{report.summary()}; breaker open: torque events and part "
                          "receipts are held until `mro-edge schema rollback` or an override")
            control.log.error("schema drift above tolerance; breaker open", state_transition="BREAKER_OPEN",
                              version=version.version, failed_ppm=report.failed_ppm, sample=report.sample)
        control.save(uow, new)
        return {"summary": report.summary(), "within_tolerance": report.within_tolerance,
                "report": report_dict}
