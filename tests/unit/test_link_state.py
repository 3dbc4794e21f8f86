"""The connectivity state machine (services/heartbeat/state.py) walks exactly DESIGN.md section 5.

CONNECTED -> DEGRADED    a probe slower than the threshold, or failing
DEGRADED  -> CONNECTED   a good probe
DEGRADED  -> ISOLATED    `isolate_after` bad probes in a row
ISOLATED  -> RECONCILING the gateway answers a probe well again
RECONCILING -> CONNECTED the uplink is drained and the gateway's head equals ours
RECONCILING -> ISOLATED  the link drops again (a probe fails)

Every other (state, event) pair leaves the state alone. A probe exactly at the threshold is
not "slower than" it. A slow but answered probe does not end ISOLATED (the link is still worse
than the station accepts) and does not end RECONCILING either (the link did not drop).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.heartbeat.state import Link, Probe, Thresholds, after_probe, after_uplink

C, D, ISO, R = Link.CONNECTED, Link.DEGRADED, Link.ISOLATED, Link.RECONCILING
LIMITS = Thresholds(slow_probe_ms=2000, isolate_after=3)
GOOD = Probe(True, 120.0)
AT_THRESHOLD = Probe(True, 2000.0)
JUST_OVER = Probe(True, 2000.001)
SLOW = Probe(True, 2500.0)
FAILED = Probe(False, 3.0)
FAILED_FAST_IS_STILL_BAD = Probe(False, 0.0)

LEGAL = {(C, D), (D, C), (D, ISO), (ISO, R), (R, C), (R, ISO)}


def test_defaults_are_the_designs() -> None:
    assert Thresholds() == Thresholds(slow_probe_ms=2000, isolate_after=3)


@pytest.mark.parametrize(
    ("state", "streak", "probe", "expected"),
    [
        # CONNECTED
        (C, 0, GOOD, (C, 0)),
        (C, 0, AT_THRESHOLD, (C, 0)),
        (C, 0, JUST_OVER, (D, 1)),
        (C, 0, SLOW, (D, 1)),
        (C, 0, FAILED, (D, 1)),
        (C, 0, FAILED_FAST_IS_STILL_BAD, (D, 1)),
        # DEGRADED: a good probe ends it, bad ones count up to isolate_after
        (D, 1, GOOD, (C, 0)),
        (D, 1, AT_THRESHOLD, (C, 0)),
        (D, 1, SLOW, (D, 2)),
        (D, 1, FAILED, (D, 2)),
        (D, 2, SLOW, (ISO, 3)),
        (D, 2, FAILED, (ISO, 3)),
        (D, 2, GOOD, (C, 0)),
        # ISOLATED: only a good probe ends it
        (ISO, 3, FAILED, (ISO, 4)),
        (ISO, 3, SLOW, (ISO, 4)),
        (ISO, 3, JUST_OVER, (ISO, 4)),
        (ISO, 3, GOOD, (R, 0)),
        (ISO, 3, AT_THRESHOLD, (R, 0)),
        # RECONCILING: a failed probe means the link dropped again; probes never end it
        (R, 0, FAILED, (ISO, 1)),
        (R, 0, GOOD, (R, 0)),
        (R, 0, SLOW, (R, 1)),
        (R, 1, GOOD, (R, 0)),
    ],
)
def test_every_probe_transition(state, streak, probe, expected) -> None:
    assert after_probe(state, streak, probe, LIMITS) == expected


@pytest.mark.parametrize(
    ("state", "in_sync", "expected"),
    [
        (R, True, C),
        (R, False, R),
        (C, True, C), (C, False, C),
        (D, True, D), (D, False, D),
        (ISO, True, ISO), (ISO, False, ISO),
    ],
)
def test_only_an_in_sync_uplink_ends_reconciling(state, in_sync, expected) -> None:
    assert after_uplink(state, in_sync) == expected


def walk(probes, limits=LIMITS, state=C, streak=0):
    states = []
    for probe in probes:
        state, streak = after_probe(state, streak, probe, limits)
        states.append(state)
    return states


def test_isolated_after_exactly_isolate_after_bad_probes() -> None:
    assert walk([FAILED] * 3) == [D, D, ISO]
    assert walk([SLOW, FAILED, SLOW]) == [D, D, ISO]
    for n in range(2, 8):
        states = walk([FAILED] * (n + 2), Thresholds(2000, n))
        assert states.index(ISO) == n - 1, (n, states)


def test_a_good_probe_resets_the_count() -> None:
    assert walk([FAILED, FAILED, GOOD, FAILED, FAILED]) == [D, D, C, D, D]
    assert walk([FAILED, FAILED, GOOD, FAILED, FAILED, FAILED]) == [D, D, C, D, D, ISO]


def test_isolate_after_one_still_passes_through_degraded() -> None:
    """CONNECTED -> ISOLATED is not a transition: even with isolate_after=1 the first bad probe
    only degrades, the next one isolates."""
    assert walk([FAILED, FAILED], Thresholds(2000, 1)) == [D, ISO]


def test_full_outage_and_recovery() -> None:
    limits = Thresholds(300, 3)
    state, streak = C, 0
    seen = [state]
    for probe in [FAILED, FAILED, FAILED, FAILED, Probe(True, 10)]:
        state, streak = after_probe(state, streak, probe, limits)
        seen.append(state)
    state = after_uplink(state, False)
    seen.append(state)
    state = after_uplink(state, True)
    seen.append(state)
    assert seen == [C, D, D, ISO, ISO, R, R, C]


def test_link_drop_while_reconciling_isolates_at_once() -> None:
    state, streak = after_probe(R, 0, FAILED, LIMITS)
    assert state == ISO
    assert after_probe(state, streak, GOOD, LIMITS)[0] == R


def test_unknown_state_is_an_error() -> None:
    with pytest.raises(ValueError):
        after_probe("SIDEWAYS", 0, GOOD, LIMITS)  # type: ignore[arg-type]


# --- random walks -----------------------------------------------------------------------------

probes = st.builds(Probe, st.booleans(), st.floats(min_value=0, max_value=10_000, allow_nan=False))
events = st.lists(st.one_of(probes, st.booleans()), max_size=200)  # bool = an uplink report (in_sync)


@settings(max_examples=400, deadline=None)
@given(events=events, slow_ms=st.integers(min_value=1, max_value=5000), isolate_after=st.integers(1, 6))
def test_random_walks_keep_the_invariants(events, slow_ms, isolate_after) -> None:
    limits = Thresholds(slow_ms, isolate_after)
    state, streak = C, 0
    bad_run = 0  # consecutive bad probes, by our own count
    longest_run_since_connected = 0
    for event in events:
        before = state
        if isinstance(event, Probe):
            bad = not event.ok or event.latency_ms > slow_ms
            bad_run = bad_run + 1 if bad else 0
            state, streak = after_probe(state, streak, event, limits)
            assert streak == bad_run
            if state != before:
                if state == ISO and before == D:
                    assert bad_run >= max(isolate_after, 2), (bad_run, isolate_after)
                if state == ISO and before == R:
                    assert not event.ok, "RECONCILING -> ISOLATED only when the link drops"
                if state == R:
                    assert before == ISO and not bad, "RECONCILING only from ISOLATED, on a good probe"
                assert state != C or before == D, "a probe only reconnects a DEGRADED link"
        else:
            state = after_uplink(state, event)
            if state != before:
                assert (before, state) == (R, C) and event, "CONNECTED from RECONCILING only when in sync"
        if state != before:
            assert (before, state) in LEGAL, (before, state)
        longest_run_since_connected = 0 if state == C else max(longest_run_since_connected, bad_run)
        if state == ISO:
            assert longest_run_since_connected >= isolate_after, \
                "ISOLATED without isolate_after consecutive bad probes since the link was last up"
