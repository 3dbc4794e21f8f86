"""The uplink's pusher on a real LMDB store: seq order, holding back at a gap, the durable
acknowledged seq, the link state it trusts, and the heartbeat's handshake that ends
RECONCILING. No broker: messages are handed over as shared.runtime.mqtt delivers them; the gateway
side is covered by tests/integration/test_reconcile.py and test_link.py."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import structlog

from services.heartbeat.service import Heartbeat
from services.heartbeat.state import Link, UplinkView, decode_uplink_view
from services.uplink.client import Head
from services.uplink.link import RETAINED_WAIT_S
from services.uplink.pusher import Pusher
from services.uplink.store import ENTRIES, UPLINK_TABLES, acknowledged_count
from shared.ledger.entry import GENESIS_PREV, export_row
from shared.ledger.keys import SigningKey
from shared.ledger.store import LEDGER_TABLE, encode_entry
from shared.runtime.config import load_config
from shared.runtime.messages import json_encode
from shared.runtime.mqtt import Inbound
from shared.runtime.stage import RUNTIME_TABLES
from shared.runtime.store import Store, u64
from tests.pipeline import ROOT
from tests.support.gateway import make_entries


def config_for(tmp_path, **env):
    return load_config(env={"MRO_DATA_DIR": str(tmp_path), "MRO_MQTT_USERNAME": "unit",
                            "MRO_MQTT_PASSWORD": "x", **env})


def make_store(tmp_path) -> Store:
    return Store(tmp_path / "uplink", RUNTIME_TABLES + UPLINK_TABLES, map_size_mb=64)


ENTRY_LIST = list(make_entries(SigningKey.generate(), "mro-edge/HGR1", 30))


def put(store: Store, seqs) -> None:
    with store.write() as txn:
        for seq in seqs:
            txn.put(u64(seq), json_encode(export_row(ENTRY_LIST[seq])), db=store.table(ENTRIES))


def seqs_of(batch) -> list[int]:
    return list(range(batch.first, batch.last + 1)) if batch else []


def test_batches_are_contiguous_from_the_acknowledged_seq_and_stop_at_a_gap(tmp_path) -> None:
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path, MRO_UPLINK_BATCH="4"), store, structlog.get_logger())
    assert pusher.drain.next_batch() is None
    put(store, [1, 2, 3])
    assert pusher.drain.next_batch() is None, "seq 0 is missing: nothing behind it may go"
    put(store, [0, 5, 6, 7, 8, 9])
    batch = pusher.drain.next_batch()
    assert seqs_of(batch) == [0, 1, 2, 3], "batch size 4, in seq order"
    assert batch.rows == [json_encode(export_row(ENTRY_LIST[s])) for s in range(4)], "rows go out as stored"
    pusher.drain.acknowledge(Head(3, ENTRY_LIST[3].hash))
    assert pusher.drain.next_batch() is None, "seq 4 is missing: 5..9 are held back"
    put(store, [4])
    assert seqs_of(pusher.drain.next_batch()) == [4, 5, 6, 7]
    pusher.drain.acknowledge(Head(7, ENTRY_LIST[7].hash))
    assert seqs_of(pusher.drain.next_batch()) == [8, 9]
    store.close()


def test_acknowledged_seq_is_durable_and_acknowledged_entries_are_dropped(tmp_path) -> None:
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger())
    assert pusher.acked == -1
    put(store, range(10))
    pusher.drain.acknowledge(Head(6, ENTRY_LIST[6].hash))
    assert store.count(ENTRIES) == 3
    pusher.drain.acknowledge(Head(4, ENTRY_LIST[4].hash))  # an older answer never moves it back
    assert pusher.acked == 6
    store.close()
    store = make_store(tmp_path)
    again = Pusher(config_for(tmp_path), store, structlog.get_logger())
    assert again.acked == 6, "the acknowledged seq survives a restart"
    assert seqs_of(again.drain.next_batch()) == [7, 8, 9]
    store.close()


def test_stale_entries_below_the_acknowledged_seq_are_dropped(tmp_path) -> None:
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger())
    put(store, range(5))
    pusher.drain.acknowledge(Head(4, ENTRY_LIST[4].hash))
    put(store, [2, 3])  # arrived while the ack was being stored
    assert store.count(ENTRIES) == 2 and pusher.drain.next_batch() is None
    pusher.drain.drop_stale()
    assert store.count(ENTRIES) == 0
    store.close()


def test_in_sync_needs_a_confirmed_gateway_head_equal_to_the_ledger(tmp_path) -> None:
    config = config_for(tmp_path)
    write_ledger(tmp_path, 5)
    store = make_store(tmp_path)
    pusher = Pusher(config, store, structlog.get_logger())
    put(store, range(5))
    assert pusher.view()["in_sync"] is False and pusher.view()["backlog"] == 5
    pusher.drain.acknowledge(Head(4, ENTRY_LIST[4].hash))
    view = pusher.view()
    assert view["in_sync"] is True and view["backlog"] == 0 and view["local_head"] == 4
    pusher.set_link_state("ISOLATED")
    assert pusher.view()["in_sync"] is False, "a head from before the outage proves nothing"
    pusher.set_link_state("RECONCILING")
    assert pusher.view()["in_sync"] is False
    pusher.drain.gateway_head = Head(4, "f" * 64)
    assert pusher.view()["in_sync"] is False, "same seq, other hash: not in sync"
    pusher.drain.gateway_head = Head(4, ENTRY_LIST[4].hash)
    assert pusher.view()["in_sync"] is True
    pusher.stop()
    store.close()


def write_ledger(tmp_path, count: int) -> None:
    ledger = Store(tmp_path / "sign", RUNTIME_TABLES + (LEDGER_TABLE,), map_size_mb=64)
    with ledger.write() as txn:
        for entry in ENTRY_LIST[:count]:
            txn.put(u64(entry.seq), encode_entry(entry), db=ledger.table(LEDGER_TABLE))
    ledger.close()  # the pusher opens it read-only; LMDB allows one handle per process


def test_a_remembered_gateway_head_is_forgotten_when_the_link_changes(tmp_path) -> None:
    """The gateway was away (DEGRADED) and is back: it may have been restored from an older
    backup, so the head it had before proves nothing until it says so again."""
    write_ledger(tmp_path, 5)
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger())
    pusher.set_link_state("CONNECTED", 1)
    pusher.drain.acknowledge(Head(4, ENTRY_LIST[4].hash))
    assert pusher.view()["in_sync"] is True
    pusher.set_link_state("DEGRADED", 2)
    assert pusher.view()["in_sync"] is False and pusher.view()["gateway_head"] is None
    pusher.drain.gateway_head = Head(4, ENTRY_LIST[4].hash)
    pusher.set_link_state("CONNECTED", 3)
    assert pusher.view()["in_sync"] is False, "a head from before the gateway was away"
    pusher.stop()
    store.close()


def test_a_gateway_that_lost_entries_gets_them_again_and_the_status_shows_it_first(tmp_path) -> None:
    write_ledger(tmp_path, 10)
    store = make_store(tmp_path)
    published: list[tuple[str, dict]] = []
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger(),
                    publish_status=lambda: published.append(("status", pusher.view())),
                    publish=lambda topic, payload: published.append(("alarm", msgspec.json.decode(payload))))
    put(store, range(10))
    pusher.drain.acknowledge(Head(9, ENTRY_LIST[9].hash))
    assert store.count(ENTRIES) == 0
    pusher.drain.gateway_head = Head(4, ENTRY_LIST[4].hash)  # restored: it holds seq 0..4 again
    pusher.drain.resync(4)
    assert [kind for kind, _ in published] == ["status", "alarm"]
    status, alarm = published[0][1], published[1][1]
    assert status["acked_seq"] == 4 and status["queued"] == 5 and status["in_sync"] is False
    assert alarm["alarm"] == "gateway_behind" and alarm["service"] == "uplink"
    assert seqs_of(pusher.drain.next_batch()) == [5, 6, 7, 8, 9], "sent again from the ledger"
    assert pusher.drain.next_batch().rows == [json_encode(export_row(ENTRY_LIST[s])) for s in range(5, 10)]
    pusher.stop()
    store.close()
    assert acknowledged_count(config_for(tmp_path)) == 5, "the count moved back durably"


def uplink_view(status: dict) -> UplinkView:
    """The heartbeat's view of an uplink status, decoded from its JSON as the heartbeat does."""
    view = decode_uplink_view(json_encode(status))
    assert view is not None
    return view


def test_heartbeat_ends_reconciling_only_on_a_fresh_in_sync_report(tmp_path) -> None:
    heartbeat = Heartbeat(config_for(tmp_path))
    heartbeat.state = Link.RECONCILING
    epoch = heartbeat.epoch
    up = {"service": "uplink", "state": "up", "in_sync": True, "link": "RECONCILING", "link_epoch": epoch}
    heartbeat.on_uplink(uplink_view({**up, "link": "ISOLATED"}))
    assert heartbeat.state == Link.RECONCILING, "the uplink has not seen the link come back yet"
    heartbeat.on_uplink(uplink_view({**up, "link": "CONNECTED", "link_epoch": epoch - 3}))
    assert heartbeat.state == Link.RECONCILING, "a status from before the outage"
    heartbeat.on_uplink(uplink_view({**up, "link_epoch": epoch - 1}))
    assert heartbeat.state == Link.RECONCILING, "a status from an earlier RECONCILING"
    heartbeat.on_uplink(uplink_view({key: value for key, value in up.items() if key != "link_epoch"}))
    assert heartbeat.state == Link.RECONCILING, "a status that names no epoch"
    heartbeat.on_uplink(uplink_view({**up, "state": "down"}))
    assert heartbeat.state == Link.RECONCILING, "a dead uplink's last word does not count"
    heartbeat.on_uplink(uplink_view({**up, "in_sync": False}))
    assert heartbeat.state == Link.RECONCILING
    heartbeat.on_uplink(uplink_view(up))
    assert heartbeat.state == Link.CONNECTED and heartbeat.epoch == epoch + 1
    heartbeat.state = Link.ISOLATED
    heartbeat.on_uplink(uplink_view({**up, "link_epoch": heartbeat.epoch}))
    assert heartbeat.state == Link.ISOLATED, "only RECONCILING ends on an uplink report"
    heartbeat.http.close()


def test_heartbeat_acts_only_on_the_newest_waiting_status(tmp_path) -> None:
    """Statuses queued while the probes hung are read at once on restore, and only the newest
    counts: an in_sync:true one from just after the cut, followed by the current in_sync:false
    one, keeps RECONCILING; and the inbox is read even when no time is left (timeout 0)."""
    heartbeat = Heartbeat(config_for(tmp_path))
    heartbeat.state = Link.RECONCILING
    topic = heartbeat.topics.status("uplink")
    old = {"service": "uplink", "state": "up", "in_sync": True, "link": "RECONCILING",
           "link_epoch": heartbeat.epoch}
    now = {**old, "in_sync": False, "backlog": 3000}
    for status in (old, old, now):
        heartbeat.link.inbox.put(Inbound(topic, json_encode(status), 0, 0, 1))
    heartbeat.read_inbox(0)
    assert heartbeat.link.inbox.empty(), "everything waiting was read"
    assert heartbeat.state == Link.RECONCILING and heartbeat.uplink.backlog == 3000
    heartbeat.link.inbox.put(Inbound(topic, json_encode({**now, "in_sync": True, "backlog": 0}), 0, 0, 1))
    heartbeat.read_inbox(0)
    assert heartbeat.state == Link.CONNECTED
    heartbeat.http.close()


def test_pusher_calls_nothing_until_a_retained_state_says_the_link_is_usable(tmp_path) -> None:
    """A real HTTP peer (tests/linkfault.py answering 503, keeping every request line) stands
    in for the gateway: the pusher's only way to show a call."""
    from tests.brokers import free_port
    from tests.linkfault import LinkFault

    with LinkFault(free_port()) as proxy:
        proxy.set("http_error", status=503)
        store = make_store(tmp_path)
        pusher = Pusher(config_for(tmp_path, MRO_LINK_GATEWAY_URL=proxy.url, MRO_LINK_TOKEN="t",
                                   MRO_UPLINK_RETRY_ATTEMPTS="1"), store, structlog.get_logger())
        put(store, range(3))
        assert pusher.link.state == "UNKNOWN" and not pusher.link.usable()
        pusher.on_mqtt_connect()
        pusher.step()
        kept = lambda state, epoch: json_encode({"state": state, "epoch": epoch})  # noqa: E731
        # what the broker kept for our session while we were away: older than the retained state
        pusher.on_connectivity(Inbound("t", kept("CONNECTED", 10), 1, 1, 1, retain=False))
        pusher.on_connectivity(Inbound("t", kept("DEGRADED", 11), 1, 2, 1, retain=False))
        pusher.step()
        assert pusher.link.state == "UNKNOWN"
        pusher.on_connectivity(Inbound("t", kept("ISOLATED", 12), 1, 3, 1, retain=True))
        pusher.step()
        assert pusher.link.state == "ISOLATED" and pusher.link.epoch == 12
        pusher.on_connectivity(Inbound("t", kept("CONNECTED", 10), 1, 4, 1))
        assert pusher.link.state == "ISOLATED", "an older epoch delivered late is ignored"
        pusher.step()
        assert proxy.requests_since(0) == [], "no call before the link was known to be usable"
        pusher.on_connectivity(Inbound("t", kept("RECONCILING", 13), 1, 5, 1))
        assert pusher.view()["link_epoch"] == 13 and pusher.view()["in_sync"] is False
        pusher.step()
        assert any(line.startswith("POST /v1/entries ") for line in proxy.requests_since(0))
        pusher.stop()
        store.close()


def test_pusher_takes_the_newest_kept_state_when_none_is_retained(tmp_path) -> None:
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger())
    pusher.on_connectivity(Inbound("t", json_encode({"state": "DEGRADED", "epoch": 4}), 1, 1, 1))
    pusher.on_connectivity(Inbound("t", json_encode({"state": "ISOLATED", "epoch": 5}), 1, 2, 1))
    pusher.on_mqtt_connect()
    pusher.link.adopt_pending()
    assert pusher.link.state == "UNKNOWN", "the retained state may still be on its way"
    pusher.link._connected_at -= RETAINED_WAIT_S
    pusher.link.adopt_pending()
    assert pusher.link.state == "ISOLATED" and pusher.link.epoch == 5
    store.close()


def test_local_head_of_a_sign_store_without_its_ledger_table(tmp_path) -> None:
    """Sign's store exists but has no `ledger` table yet (sign is starting): the empty ledger,
    not a KeyError (which, raised in the on-connect status hook, used to end paho's thread)."""
    Store(tmp_path / "sign", ("meta",), map_size_mb=64).close()
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger())
    assert pusher.ledger.head() == Head(-1, GENESIS_PREV)
    assert pusher.view()["local_head"] == -1 and pusher.view()["backlog"] == 0
    # sign, in its own process (LMDB allows one handle per environment and process), makes the table
    script = ("import sys; from shared.runtime.store import Store, u64; "
              "from shared.runtime.stage import RUNTIME_TABLES; "
              "s = Store(sys.argv[1], RUNTIME_TABLES + ('ledger',), map_size_mb=64); "
              "t = s.env.begin(write=True); "
              "t.put(u64(0), bytes.fromhex(sys.argv[2]), db=s.table('ledger')); t.commit(); s.close()")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "sign"), encode_entry(ENTRY_LIST[0]).hex()],
                   check=True, cwd=ROOT, timeout=60)
    assert pusher.ledger.head() == Head(0, ENTRY_LIST[0].hash), "the table is found once sign has made it"
    pusher.stop()
    store.close()
