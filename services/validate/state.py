"""The validate stage's contract state as pure transitions: (state, inputs) -> new state.

No LMDB, no clock: the caller passes `now` and stores the result (`schema/state` in the
`compliance` table), so each transition is tested on its own.
"""

from __future__ import annotations

from typing import Any

import msgspec

BREAKER_OPEN = "open"
BREAKER_CLOSED = "closed"


class SchemaState(msgspec.Struct, kw_only=True, frozen=True):
    """What the validate stage holds in force: active and staged versions, breaker, held range."""

    active: dict | None = None  # definition of the active version; None = mro.record/1
    active_since: str | None = None
    history: list[dict] = msgspec.field(default_factory=list)  # earlier active definitions, oldest first
    staged: dict | None = None
    staged_at: str | None = None
    dry_run: dict | None = None  # last DryRunReport of the staged version
    breaker: str = BREAKER_CLOSED
    breaker_since: str | None = None
    breaker_reason: str | None = None
    held_first: int = 0
    held_next: int = 0

    @property
    def held(self) -> int:
        return self.held_next - self.held_first

    @property
    def breaker_open(self) -> bool:
        return self.breaker == BREAKER_OPEN


encode_state = msgspec.json.Encoder().encode
_decode_state = msgspec.json.Decoder(SchemaState).decode


def decode_state(raw: bytes | None) -> SchemaState:
    """The stored state, or the initial one (base contract, breaker closed) if nothing is stored."""
    return _decode_state(raw) if raw else SchemaState()


def _closed(now: str) -> dict[str, Any]:
    return {"breaker": BREAKER_CLOSED, "breaker_since": now, "breaker_reason": None}


def staged(state: SchemaState, definition: dict, now: str) -> SchemaState:
    """`definition` staged; an earlier dry run no longer applies."""
    return msgspec.structs.replace(state, staged=definition, staged_at=now, dry_run=None)


def dry_run_recorded(state: SchemaState, report: dict, *, within_tolerance: bool, summary: str,
                     now: str) -> SchemaState:
    """The dry-run report kept; drift above the tolerance opens a closed breaker."""
    state = msgspec.structs.replace(state, dry_run=report)
    if within_tolerance or state.breaker_open:
        return state
    return msgspec.structs.replace(state, breaker=BREAKER_OPEN, breaker_since=now, breaker_reason=summary)


def activated(state: SchemaState, definition: dict, now: str) -> SchemaState:
    """`definition` active (activate or override), the previous one kept for rollback; breaker closed."""
    history = state.history + ([state.active] if state.active else [])
    return msgspec.structs.replace(state, active=definition, active_since=now, history=history, staged=None,
                                   staged_at=None, dry_run=None, **_closed(now))


def withdrawn(state: SchemaState, now: str) -> SchemaState:
    """The staged version dropped; the active one stays; breaker closed."""
    return msgspec.structs.replace(state, staged=None, staged_at=None, dry_run=None, **_closed(now))


def rolled_back(state: SchemaState, now: str) -> SchemaState:
    """The active version replaced by the one before it (the base if there is none); breaker closed."""
    previous = state.history[-1] if state.history else None
    return msgspec.structs.replace(state, active=previous, active_since=now, history=state.history[:-1],
                                   **_closed(now))


def held_one(state: SchemaState) -> SchemaState:
    """One more record held (it is stored under id `state.held_next`)."""
    return msgspec.structs.replace(state, held_next=state.held_next + 1)


def released(state: SchemaState) -> SchemaState:
    """Every held record settled."""
    return msgspec.structs.replace(state, held_first=state.held_next)
