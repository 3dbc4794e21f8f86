"""Devices that never re-send: stock `mosquitto_pub` and plain paho, on both brokers.

A real RFID reader or torque controller publishes at QoS 1, takes the broker's PUBACK as
delivery and forgets the record. So here no client ever subscribes to receipts or re-sends:
every record that got its PUBACK must end in the ledger exactly once (counted by event_id in
the sign stage's ledger, `Pipeline.ledger()`), whatever else happens meanwhile.

The embedded broker must lose nothing. Mosquitto keeps queued messages in memory and saves
them to disk every `autosave_interval` changes (config/mosquitto/mosquitto.conf), so a kill -9
of Mosquitto may lose what it PUBACKed since its last save and ingest had not yet committed:
the bound asserted here is the one the README documents ("Devices that cannot re-send").
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

import psutil
import pytest

from services.broker.credentials import CLIENT_OWNERS
from tests.brokers import MOSQUITTO_CONF
from tests.pipeline import STAGES
from tests.stockclients import (
    CLIENTS,
    BurstRunner,
    StockDevice,
    Watcher,
    assert_exactly_once,
    make_records,
    mosquitto_pub_burst,
    paho_burst,
    register_devices,
    service_client_ids,
    settle,
)

FLEET = (("rfid_reader", "RFID-01"), ("barcode_scanner", "BCS-01"), ("torque_wrench", "TQW-01"),
         ("tablet", "TAB-01"))
# Broker memory may grow by this much while ingest is stopped and ~4,000 records wait for it.
RSS_GROWTH_BOUND_MB = 64


def mosquitto_setting(key: str) -> str:
    for line in MOSQUITTO_CONF.read_text().splitlines():
        if line.startswith(key + " "):
            return line.split(None, 1)[1].strip()
    raise AssertionError(f"{MOSQUITTO_CONF} has no {key}")


def broker_kill_bound(broker, publishers: int) -> int:
    """PUBACKed records one kill -9 of the broker may lose (README, "Devices that cannot re-send").

    Embedded: none (PUBACK follows a synced LMDB commit). Mosquitto with `autosave_on_changes
    true` saves its database once `autosave_interval` changes (a message queued for a
    subscriber, an ack, a subscription, a retained message) have accumulated; it checks between
    two rounds of its event loop, and one round reads at most one packet per client. So fewer
    than autosave_interval + one message per publishing client are unsaved at any moment.
    """
    if broker.kind == "embedded":
        return 0
    assert mosquitto_setting("autosave_on_changes") == "true"
    return int(mosquitto_setting("autosave_interval")) + publishers


@pytest.fixture
def devices(pipeline):
    return register_devices(pipeline.broker, FLEET)


def records_for(devices: list[StockDevice], per_device: int, seed: int, seen: set | None = None) -> dict:
    rng = random.Random(seed)
    seen = set() if seen is None else seen
    return {d.device_id: make_records(rng, d, per_device, seen) for d in devices}


@pytest.mark.parametrize("client", CLIENTS)
def test_bursts_land_exactly_once(pipeline, devices, client):
    """1,000 records from four devices in bursts of 50, one connection per burst."""
    runner = BurstRunner(pipeline.broker, devices, records_for(devices, 250, seed=1), burst_size=50,
                         clients=(client,)).run(120)
    assert len(runner.sent) == 1000
    assert not [b.error for b in runner.bursts if b.error]
    assert len(runner.acked) == 1000
    outcome = settle(pipeline, runner.acked, runner.sent)
    assert_exactly_once(outcome, what=f"{pipeline.broker.kind}/{client}")
    assert all(pipeline.alive(name) for name in STAGES)


def test_kill_9_of_a_stage_during_bursts_loses_nothing(pipeline, devices):
    """1,200 records in bursts of 25 (both clients, one connection per burst) while ingest,
    validate or sign is killed -9 at random and restarted."""
    rng = random.Random(17)
    runner = BurstRunner(pipeline.broker, devices, records_for(devices, 300, seed=2), burst_size=25,
                         pause_s=0.35).start()
    kills = []
    deadline = time.monotonic() + 60
    while runner.alive() and len(kills) < 5 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 1.0))
        victim = rng.choice(STAGES)
        pipeline.kill(victim)
        time.sleep(rng.uniform(0.1, 0.8))
        pipeline.restart(victim)
        kills.append(victim)
    runner.join(120)
    assert len(kills) >= 3, f"the bursts ended after only {len(kills)} kills: {kills}"
    assert len(runner.acked) >= 0.95 * len(runner.sent), [b.error for b in runner.bursts if b.error][:5]
    outcome = settle(pipeline, runner.acked, runner.sent, cap_s=180)
    assert_exactly_once(outcome, what=f"{pipeline.broker.kind}, kills {kills}")


def test_kill_9_of_the_broker_during_bursts(pipeline, devices, broker):
    """Bursts while the broker is killed -9 and restarted: first with ingest running, then with
    ingest down (everything PUBACKed waits in the broker for ingest's persistent session)."""
    rng = random.Random(23)
    seen: set = set()
    bound = broker_kill_bound(broker, publishers=len(devices))
    acked: set[str] = set()
    sent: set[str] = set()
    for phase, seed, kills in (("ingest running", 3, 2), ("ingest down", 4, 2)):
        if phase == "ingest down":
            pipeline.kill("ingest")
        runner = BurstRunner(broker, devices, records_for(devices, 300, seed=seed, seen=seen), burst_size=50,
                             pause_s=0.3, burst_timeout_s=30).start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.5, 1.5))
            broker.kill()
            time.sleep(rng.uniform(0.2, 0.8))
            broker.start()
        runner.join(120)
        if phase == "ingest down":
            pipeline.restart("ingest")
        before = len(acked)
        acked |= runner.acked
        sent |= runner.sent
        outcome = settle(pipeline, acked, sent, cap_s=180)
        print(f"{broker.kind}, {phase}, {kills} broker kills: {outcome} (bound {bound} per kill)")
        assert len(acked) - before >= 200, f"{phase}: only {len(acked) - before} PUBACKs"
        assert_exactly_once(outcome, max_lost=bound * kills, what=f"{broker.kind}, {phase}")


def test_500_connections_of_one_record_each(pipeline, devices):
    """500 connections that each publish exactly one record and disconnect (half mosquitto_pub,
    half paho), four devices at once."""
    runner = BurstRunner(pipeline.broker, devices, records_for(devices, 125, seed=5), burst_size=1).run(180)
    assert len(runner.bursts) == 500
    assert {b.client for b in runner.bursts} == set(CLIENTS)
    assert not [b.error for b in runner.bursts if b.error][:5]
    outcome = settle(pipeline, runner.acked, runner.sent)
    assert outcome.acked == 500
    assert_exactly_once(outcome, what=pipeline.broker.kind)


def test_slow_consumer_sigstop_of_ingest_for_30_s(pipeline, devices, broker):
    """Ingest frozen (SIGSTOP) for 30 s during bursts: the broker holds everything it PUBACKed
    within a memory bound, and all of it lands after SIGCONT."""
    broker_proc = psutil.Process(broker.pid)
    idle_mb = broker_proc.memory_info().rss / 2**20
    peak_mb = idle_mb
    runner = BurstRunner(broker, devices, records_for(devices, 1000, seed=6), burst_size=50, pause_s=0.4,
                         burst_timeout_s=90).start()
    time.sleep(1.0)
    ingest = pipeline.procs["ingest"]
    os.kill(ingest.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    acked_before_stop = len(runner.acked)
    try:
        while time.monotonic() - stopped_at < 30:
            peak_mb = max(peak_mb, broker_proc.memory_info().rss / 2**20)
            time.sleep(0.2)
        acked_while_stopped = len(runner.acked) - acked_before_stop
    finally:
        os.kill(ingest.pid, signal.SIGCONT)
    runner.join(120)
    peak_mb = max(peak_mb, broker_proc.memory_info().rss / 2**20)
    outcome = settle(pipeline, runner.acked, runner.sent, cap_s=180)
    print(f"{broker.kind}: {acked_while_stopped} PUBACKs while ingest was stopped; broker RSS idle "
          f"{idle_mb:.1f} MB, peak {peak_mb:.1f} MB; {outcome}")
    assert_exactly_once(outcome, what=f"{broker.kind}, ingest stopped 30 s")
    assert len(runner.acked) == len(runner.sent) == 4000, [b.error for b in runner.bursts if b.error][:5]
    assert peak_mb - idle_mb <= RSS_GROWTH_BOUND_MB, f"broker RSS grew from {idle_mb:.1f} to {peak_mb:.1f} MB"
    assert pipeline.alive("ingest")


class Attacker:
    """A connect attempt: what CONNACK it got, and what it read while connected."""

    def __init__(self, broker, login, client_id: str, persistent: bool,
                 filters: tuple[str, ...] = ("#", "mro/+/in/+/+", "mro/+/receipt/+")) -> None:
        self.watcher = Watcher(broker.port, login, list(filters), client_id=client_id, persistent=persistent)
        who = login[0] if login else "anonymous"
        self.label = f"{who} as {client_id!r} ({'persistent' if persistent else 'clean'})"

    def __enter__(self) -> Attacker:
        self.watcher.start()
        return self

    @property
    def accepted(self) -> bool:
        return self.watcher.connack is not None and not self.watcher.connack.is_failure

    def __exit__(self, *exc) -> None:
        self.watcher.stop()


def assert_reads_only_own_receipts(attacker: Attacker, own_user: str, station: str = "HGR1") -> None:
    foreign = [(t, p[:80]) for t, p, _ in attacker.watcher.seen() if t != f"mro/{station}/receipt/{own_user}"]
    assert not foreign, f"{attacker.label} read {len(foreign)} foreign messages, e.g. {foreign[:3]}"


def publish_some(broker, devices: list[StockDevice], rng: random.Random, seen: set, n: int) -> tuple[set, set]:
    """n records from each device, one paho connection each, at the same time."""
    results = []
    threads = []
    for device in devices:
        records = make_records(rng, device, n, seen)

        def go(device=device, records=records) -> None:
            results.append(paho_burst(broker.port, device, records, timeout_s=20))

        threads.append(threading.Thread(target=go))
        threads[-1].start()
    for thread in threads:
        thread.join(30)
    return {e for r in results for e in r.acked}, {e for r in results for e in r.event_ids}


def attack_devices(broker):
    return register_devices(broker, (("torque_wrench", "TQW-A"), ("rfid_reader", "RFID-B"), ("tablet", "TAB-M")))


CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(")


def connections_of(broker, client_id: str) -> int:
    """How many connections Mosquitto's log shows `client_id` made (each login's own line)."""
    return CONNECTED.findall(broker.log_path.read_text(errors="replace")).count(client_id)


def ids_an_attacker_knows(broker, station: str) -> list[str]:
    """Each service's well-known id, and the tagged id it really connects with: on Mosquitto read
    from the broker's log, as anyone reading that log could (the embedded broker does not log
    connections; the tagged ids themselves stand in)."""
    tagged = sorted({broker.client_id(c) for c in CLIENT_OWNERS})
    if broker.kind == "mosquitto":
        logged = set(CONNECTED.findall(broker.log_path.read_text(errors="replace")))
        assert broker.client_id("ingest") in logged, "Mosquitto logs the tagged ids"
        tagged = sorted(i for i in logged if any(i.startswith(f"mro-{station}-{c}-") for c in CLIENT_OWNERS))
    return service_client_ids(station) + tagged


def assert_intake_flows(pipeline, devices, rng, seen, what: str, history: set, n: int = 5) -> tuple[set, set]:
    """New records from `devices` all land in the ledger, exactly once, within 20 s.
    `history` holds every event id sent so far in the test (and gets these)."""
    acked, sent = publish_some(pipeline.broker, devices, rng, seen, n)
    history |= sent
    assert len(acked) == len(sent), f"{what}: only {len(acked)}/{len(sent)} PUBACKs"
    outcome = settle(pipeline, acked, sent, stall_s=20, cap_s=30, known=history)
    if outcome.lost:
        from mro_edge.cli import read_statuses

        statuses = read_statuses(pipeline.config, 2.0)
        print(f"stage statuses after {what}: {statuses}\ningest log:\n{pipeline.log_tail('ingest', 5)}")
    assert_exactly_once(outcome, what=f"{pipeline.broker.kind}: intake after {what}")
    return acked, sent


def test_refused_connects_with_service_client_ids_change_nothing(pipeline, broker):
    """No username, or a wrong password (the operator's, a device's), with every
    service's client id, clean and persistent: refused, and intake goes on untouched."""
    from mro_edge.cli import read_statuses

    rng, seen, history = random.Random(31), set(), set()
    alice, bob, _ = attack_devices(broker)
    assert_intake_flows(pipeline, [alice, bob], rng, seen, "nothing yet", history)
    pids = {name: pipeline.procs[name].pid for name in STAGES}
    wrong_logins = (None, (broker.service_user[0], "wrong-password"), (alice.login[0], "wrong-password"))
    for client_id in service_client_ids(pipeline.station):
        for login in wrong_logins:
            for persistent in (False, True):
                with Attacker(broker, login, client_id, persistent) as attempt:
                    assert not attempt.accepted, f"{broker.kind} accepted {attempt.label}"
    assert_intake_flows(pipeline, [alice, bob], rng, seen, "36 refused connects", history, n=20)
    assert {name: pipeline.procs[name].pid for name in STAGES} == pids
    statuses = read_statuses(pipeline.config, 3.0)
    assert all(statuses.get(n, {}).get("state") == "up" for n in STAGES), statuses


def test_device_login_with_service_client_ids(pipeline, broker):
    """A device's valid login with each service's client id, the well-known one and the tagged
    one the service really uses (read from Mosquitto's log), clean and persistent, subscribed to
    everything while two other devices publish: both brokers refuse it ("not authorised": the
    embedded broker itself, Mosquitto through the mro_clientid plugin), it reads nothing, no
    service connection is pushed off, and every record sent meanwhile lands exactly once."""
    rng, seen, history = random.Random(37), set(), set()
    alice, bob, mallory = attack_devices(broker)
    assert_intake_flows(pipeline, [alice, bob], rng, seen, "nothing yet", history)
    ingest_id = broker.client_id("ingest")
    ingest_logins = connections_of(broker, ingest_id)
    acked: set[str] = set()
    sent: set[str] = set()
    for client_id in ids_an_attacker_knows(broker, pipeline.station):
        for persistent in (False, True):
            with Attacker(broker, mallory.login, client_id, persistent) as attempt:
                more_acked, more_sent = publish_some(broker, [alice, bob], rng, seen, 3)
                time.sleep(0.2)
            assert not attempt.accepted, f"{broker.kind} accepted {attempt.label}"
            assert_reads_only_own_receipts(attempt, mallory.device_id)
            acked, sent = acked | more_acked, sent | more_sent
            history |= more_sent
    assert_intake_flows(pipeline, [alice, bob], rng, seen, "the attempts", history)
    assert all(pipeline.alive(n) for n in STAGES)
    outcome = settle(pipeline, acked, sent, stall_s=5, known=history)
    assert_exactly_once(outcome, what=f"{broker.kind}: records sent during the attempts")
    assert not outcome.lost, f"lost: {sorted(outcome.lost)[:5]}"
    for client in STAGES:
        assert takeover_lines(broker, broker.client_id(client)) == [], client
    assert connections_of(broker, ingest_id) == ingest_logins, "ingest logged in again: it was kicked off"


def test_no_device_reads_queued_records_of_others(pipeline, broker):
    """Ingest down with records queued in its persistent session: a device logging in with
    ingest's client id gets none of them; a device's own persistent session, subscribed to
    everything, gets nothing but its own receipts."""
    rng, seen, history = random.Random(41), set(), set()
    alice, bob, mallory = attack_devices(broker)
    pipeline.kill("ingest")
    queued_acked, queued_sent = publish_some(broker, [bob], rng, seen, 20)
    history |= queued_sent
    # ingest's queue lives under its tagged id (in Mosquitto's log for anyone to read): a clean
    # login with it would wipe that queue, a persistent one read it, were it not refused
    for client_id in (f"mro-{pipeline.station}-ingest", broker.client_id("ingest")):
        for persistent in (True, False):
            with Attacker(broker, mallory.login, client_id, persistent) as attempt:
                time.sleep(0.5)
            assert not attempt.accepted, f"{broker.kind} accepted {attempt.label}"
            assert_reads_only_own_receipts(attempt, mallory.device_id)
    pipeline.restart("ingest")

    with Attacker(broker, mallory.login, mallory.device_id, True):
        pass
    away_acked, away_sent = publish_some(broker, [alice, bob], rng, seen, 10)
    history |= away_sent
    with Attacker(broker, mallory.login, mallory.device_id, True) as attempt:
        time.sleep(1.0)
    assert_reads_only_own_receipts(attempt, mallory.device_id)
    assert_intake_flows(pipeline, [alice, bob], rng, seen, "the read attempts", history)

    outcome = settle(pipeline, queued_acked | away_acked, queued_sent | away_sent, stall_s=5, known=history)
    lost = set(outcome.lost)
    assert_exactly_once(outcome, what=f"{broker.kind}: queued records")
    assert not lost


def takeover_lines(broker, client_id: str) -> list[str]:
    """The broker's log lines saying a connection of `client_id` was pushed off by a new one."""
    text = broker.log_path.read_text(errors="replace")
    marks = (f"Client {client_id} already connected", "session taken over")
    return [line for line in text.splitlines() if client_id in line and any(m in line for m in marks)]


def test_device_looping_with_service_client_ids_kicks_nobody(pipeline, broker):
    """The red team's loop: for ~10 s a device logs in again and again with ingest's client id,
    the tagged one read from Mosquitto's log and the well-known one (and every other service's),
    clean and persistent, while another device sends 25 records with stock mosquitto_pub. Every
    attempt is refused, all 25 records are PUBACKed and land in the ledger exactly once, and no
    service connection is pushed off (ingest logged in once, no takeover in the broker's log,
    no restart, no session reset)."""
    from mro_edge.cli import read_statuses

    rng, seen, history = random.Random(43), set(), set()
    alice, _, mallory = attack_devices(broker)
    assert_intake_flows(pipeline, [alice], rng, seen, "nothing yet", history)
    pids = {name: pipeline.procs[name].pid for name in STAGES}
    ids = ids_an_attacker_knows(broker, pipeline.station)
    ingest_id = broker.client_id("ingest")
    ingest_logins = connections_of(broker, ingest_id)
    stop = threading.Event()
    attempts = {"accepted": 0, "refused": 0}

    def loop() -> None:
        n = 0
        while not stop.is_set():
            client_id = ids[n % len(ids)] if n % 3 else ingest_id
            with Attacker(broker, mallory.login, client_id, persistent=bool(n % 2), filters=("#",)) as attempt:
                time.sleep(0.05)
            attempts["accepted" if attempt.accepted else "refused"] += 1
            n += 1

    looper = threading.Thread(target=loop)
    started = time.monotonic()
    looper.start()
    try:
        time.sleep(2.0)
        records = make_records(rng, alice, 25, seen)
        burst = mosquitto_pub_burst(broker.port, alice, records, timeout_s=30)
        time.sleep(max(0.0, 10.0 - (time.monotonic() - started)))
    finally:
        stop.set()
        looper.join(30)
    history |= set(burst.event_ids)
    print(f"{broker.kind}: {attempts} login attempts with service ids in {time.monotonic() - started:.0f} s")
    assert sum(attempts.values()) >= 20 and attempts["accepted"] == 0, attempts
    assert burst.error is None and len(burst.acked) == 25, burst.error
    outcome = settle(pipeline, burst.acked, set(burst.event_ids), stall_s=20, known=history)
    assert_exactly_once(outcome, what=f"{broker.kind}: 25 records during the takeover loop")
    for client in STAGES:
        assert takeover_lines(broker, broker.client_id(client)) == [], client
    assert connections_of(broker, ingest_id) == ingest_logins, "ingest logged in again: it was kicked off"
    assert {name: pipeline.procs[name].pid for name in STAGES} == pids
    statuses = read_statuses(pipeline.config, 3.0)
    assert all(statuses.get(n, {}).get("state") == "up" for n in STAGES), statuses
    assert all(not statuses[n].get("session_resets") for n in STAGES), statuses
