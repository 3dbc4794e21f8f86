"""Schema commands from `mro-edge schema ...` on `mro/<station>/pipeline/schema`.

`{"command": "stage"|"dry-run"|"activate"|"rollback"|"status", "id", "sent_at", ...}`; the answer
goes to `schema_reply(id)` after the commit. Commands older than `COMMAND_TTL_S` are refused: a
command queued while the stage was down must not fire hours later.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from services.validate.contract import CommandError, ContractCommands
from shared.runtime.clock import now as clock_now
from shared.runtime.clock import parse_utc
from shared.runtime.messages import json_encode
from shared.runtime.work import UnitOfWork

if TYPE_CHECKING:
    from services.validate.control import SchemaControl

COMMAND_TTL_S = 300

Command = Callable[[dict, UnitOfWork], dict]


class SchemaCommands:
    """Parses a command, refuses stale ones, runs it and publishes the reply with the state after it."""

    def __init__(self, control: SchemaControl):
        self.control = control
        contract = ContractCommands(control)
        self.commands: dict[str, Command] = {
            "status": lambda command, uow: {"message": "status"},
            "stage": contract.stage,
            "dry-run": contract.dry_run,
            "activate": contract.activate,
            "rollback": contract.rollback,
        }

    def handle(self, payload: bytes, uow: UnitOfWork) -> None:
        read = read_command(payload, self.control.log, "schema")
        if read is None:
            return
        command, command_id = read
        try:
            check_fresh(command)
            run = self.commands.get(str(command.get("command")))
            if run is None:
                raise CommandError(f"unknown command {str(command.get('command'))[:40]!r}")
            reply = run(command, uow)
            reply["ok"] = True
        except CommandError as exc:
            reply = {"ok": False, "message": str(exc)}
        reply["id"] = command_id
        reply["state"] = self.summary()
        uow.publish(uow.topics.schema_reply(command_id), json_encode(reply))

    def summary(self) -> dict[str, Any]:
        """The state every reply carries (what `mro-edge schema status` prints)."""
        state, active = self.control.state, self.control.active
        return {
            "active": active.version,
            "active_title": active.title,
            "active_since": state.active_since,
            "staged": state.staged.get("version") if state.staged else None,
            "staged_title": state.staged.get("title") if state.staged else None,
            "dry_run": state.dry_run,
            "breaker": state.breaker,
            "breaker_since": state.breaker_since,
            "breaker_reason": state.breaker_reason,
            "held": state.held,
            "history": [definition.get("version") for definition in state.history],
            "tolerance_ppm": self.control.settings.tolerance_ppm,
        }


def read_command(payload: bytes, log, what: str) -> tuple[dict[str, Any], str] | None:
    """An operator command and its id (made up when it names none), or None, logged, for a
    payload that is not a JSON object: such a command gets no reply, there is no id to answer."""
    try:
        command = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        command = None
    if not isinstance(command, dict):
        log.warning(f"unreadable {what} command ignored")
        return None
    return command, str(command.get("id") or "")[:64] or uuid.uuid4().hex


def check_fresh(command: dict) -> None:
    """Refuse a command without a readable `sent_at` or sent more than COMMAND_TTL_S ago."""
    sent_at = command.get("sent_at")
    try:
        sent = parse_utc(str(sent_at if sent_at is not None else ""))
        age = abs((clock_now() - sent).total_seconds())
    except (ValueError, TypeError):
        raise CommandError(f"sent_at {str(sent_at)[:40]!r} is not an RFC 3339 UTC time") from None
    if age > COMMAND_TTL_S:
        raise CommandError(f"the command was sent at {sent_at}, more than {COMMAND_TTL_S} s ago; "
                           "send it again")


def operator_name() -> str:
    """Who sends a command from this shell (recorded in schema_change entries)."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
