"""The validate stage's contract state transitions (services.validate.state), without LMDB."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.validate import state as transitions
from services.validate.state import SchemaState, decode_state, encode_state

NOW = "2026-12-02T01:20:03.512Z"
LATER = "2026-12-02T02:00:00.000Z"


def definition(number: int) -> dict:
    return {"version": f"mro.record/{number}", "title": f"version {number}"}


def test_nothing_stored_is_the_base_contract_with_the_breaker_closed():
    state = decode_state(None)
    assert state.active is None and state.history == [] and not state.breaker_open and state.held == 0


def test_drift_above_tolerance_opens_the_breaker_once():
    state = transitions.staged(SchemaState(), definition(2), NOW)
    opened = transitions.dry_run_recorded(state, {"failed": 9}, within_tolerance=False, summary="9 failed",
                                          now=NOW)
    assert opened.breaker_open and opened.breaker_since == NOW and opened.breaker_reason == "9 failed"
    again = transitions.dry_run_recorded(opened, {"failed": 10}, within_tolerance=False, summary="10 failed",
                                         now=LATER)
    assert again.breaker_since == NOW and again.breaker_reason == "9 failed"
    assert again.dry_run == {"failed": 10}


def test_drift_within_tolerance_leaves_the_breaker_as_it_is():
    state = transitions.dry_run_recorded(SchemaState(), {"failed": 0}, within_tolerance=True, summary="ok",
                                         now=NOW)
    assert not state.breaker_open and state.breaker_since is None and state.dry_run == {"failed": 0}


def test_activation_keeps_the_previous_version_and_closes_the_breaker():
    state = transitions.activated(SchemaState(), definition(2), NOW)
    state = transitions.staged(state, definition(3), NOW)
    state = transitions.dry_run_recorded(state, {}, within_tolerance=False, summary="drift", now=NOW)
    state = transitions.activated(state, definition(3), LATER)
    assert state.active == definition(3) and state.history == [definition(2)]
    assert state.staged is None and state.dry_run is None
    assert not state.breaker_open and state.breaker_since == LATER and state.breaker_reason is None


def test_withdrawing_the_staged_version_keeps_the_active_one():
    state = transitions.activated(SchemaState(), definition(2), NOW)
    state = transitions.staged(state, definition(3), NOW)
    state = transitions.dry_run_recorded(state, {}, within_tolerance=False, summary="drift", now=NOW)
    state = transitions.withdrawn(state, LATER)
    assert state.active == definition(2) and state.staged is None and not state.breaker_open


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=8))
def test_each_rollback_returns_to_the_version_before(activations, rollbacks):
    state = SchemaState()
    for number in range(2, activations + 2):
        state = transitions.activated(state, definition(number), NOW)
    for _ in range(min(rollbacks, activations)):
        state = transitions.rolled_back(state, LATER)
    remaining = activations - min(rollbacks, activations)
    assert state.active == (definition(remaining + 1) if remaining else None)
    assert state.history == [definition(number) for number in range(2, remaining + 1)]


@given(st.lists(st.sampled_from(["hold", "release"]), max_size=40))
def test_held_count_is_what_was_held_since_the_last_release(steps):
    state, expected = SchemaState(), 0
    for step in steps:
        if step == "hold":
            state, expected = transitions.held_one(state), expected + 1
        else:
            state, expected = transitions.released(state), 0
        assert state.held == expected and state.held_first <= state.held_next


def test_stored_state_reads_back_equal():
    state = transitions.activated(transitions.held_one(SchemaState()), definition(2), NOW)
    state = transitions.staged(state, definition(3), NOW)
    assert decode_state(encode_state(state)) == state
