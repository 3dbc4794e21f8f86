"""The uplink's pusher on a real LMDB store: seq order, holding back at a gap, the durable
acknowledged seq, and the heartbeat's handshake that ends RECONCILING. No network: the
gateway side is covered by tests/integration/test_reconcile.py."""

from __future__ import annotations

import structlog

from services.gateway.bench import make_entries
from services.heartbeat.service import Heartbeat
from services.heartbeat.state import Link
from services.uplink.client import Head
from services.uplink.stage import ENTRIES, Pusher
from shared.config import load_config
from shared.crypto import SigningKey
from shared.ledger import export_row
from shared.ledger_store import LEDGER_TABLE, encode_entry
from shared.stage import RUNTIME_TABLES
from shared.store import Store, u64
from shared.wire import json_encode


def config_for(tmp_path, **env):
    return load_config(env={"MRO_DATA_DIR": str(tmp_path), "MRO_MQTT_USERNAME": "unit", "MRO_MQTT_PASSWORD": "x",
                            **env})


def make_store(tmp_path) -> Store:
    return Store(tmp_path / "uplink", RUNTIME_TABLES + (ENTRIES,), map_size_mb=64)


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
    assert pusher._next_batch() is None
    put(store, [1, 2, 3])
    assert pusher._next_batch() is None, "seq 0 is missing: nothing behind it may go"
    put(store, [0, 5, 6, 7, 8, 9])
    batch = pusher._next_batch()
    assert seqs_of(batch) == [0, 1, 2, 3], "batch size 4, in seq order"
    assert batch.rows == [json_encode(export_row(ENTRY_LIST[s])) for s in range(4)], "rows go out as stored"
    pusher._acknowledge(Head(3, ENTRY_LIST[3].hash))
    assert pusher._next_batch() is None, "seq 4 is missing: 5..9 are held back"
    put(store, [4])
    assert seqs_of(pusher._next_batch()) == [4, 5, 6, 7]
    pusher._acknowledge(Head(7, ENTRY_LIST[7].hash))
    assert seqs_of(pusher._next_batch()) == [8, 9]
    store.close()


def test_acknowledged_seq_is_durable_and_acknowledged_entries_are_dropped(tmp_path) -> None:
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger())
    assert pusher.acked == -1
    put(store, range(10))
    pusher._acknowledge(Head(6, ENTRY_LIST[6].hash))
    assert store.count(ENTRIES) == 3
    pusher._acknowledge(Head(4, ENTRY_LIST[4].hash))  # an older answer never moves it back
    assert pusher.acked == 6
    store.close()
    store = make_store(tmp_path)
    again = Pusher(config_for(tmp_path), store, structlog.get_logger())
    assert again.acked == 6, "the acknowledged seq survives a restart"
    assert seqs_of(again._next_batch()) == [7, 8, 9]
    store.close()


def test_stale_entries_below_the_acknowledged_seq_are_dropped(tmp_path) -> None:
    store = make_store(tmp_path)
    pusher = Pusher(config_for(tmp_path), store, structlog.get_logger())
    put(store, range(5))
    pusher._acknowledge(Head(4, ENTRY_LIST[4].hash))
    put(store, [2, 3])  # arrived while the ack was being stored
    assert store.count(ENTRIES) == 2 and pusher._next_batch() is None
    pusher._drop_stale()
    assert store.count(ENTRIES) == 0
    store.close()


def test_in_sync_needs_a_confirmed_gateway_head_equal_to_the_ledger(tmp_path) -> None:
    config = config_for(tmp_path)
    ledger = Store(tmp_path / "sign", RUNTIME_TABLES + (LEDGER_TABLE,), map_size_mb=64)
    with ledger.write() as txn:
        for entry in ENTRY_LIST[:5]:
            txn.put(u64(entry.seq), encode_entry(entry), db=ledger.table(LEDGER_TABLE))
    ledger.close()  # the pusher opens it read-only; LMDB allows one handle per process
    store = make_store(tmp_path)
    pusher = Pusher(config, store, structlog.get_logger())
    put(store, range(5))
    assert pusher.view()["in_sync"] is False and pusher.view()["backlog"] == 5
    pusher._acknowledge(Head(4, ENTRY_LIST[4].hash))
    view = pusher.view()
    assert view["in_sync"] is True and view["backlog"] == 0 and view["local_head"] == 4
    pusher.set_link_state("ISOLATED")
    assert pusher.view()["in_sync"] is False, "a head from before the outage proves nothing"
    pusher.set_link_state("RECONCILING")
    assert pusher.view()["in_sync"] is False
    pusher.gateway_head = Head(4, "f" * 64)
    assert pusher.view()["in_sync"] is False, "same seq, other hash: not in sync"
    pusher.gateway_head = Head(4, ENTRY_LIST[4].hash)
    assert pusher.view()["in_sync"] is True
    pusher.stop()
    store.close()


def test_heartbeat_ends_reconciling_only_on_a_fresh_in_sync_report(tmp_path) -> None:
    heartbeat = Heartbeat(config_for(tmp_path))
    heartbeat.state = Link.RECONCILING
    up = {"service": "uplink", "state": "up", "in_sync": True}
    heartbeat.on_uplink({**up, "link": "ISOLATED"})
    assert heartbeat.state == Link.RECONCILING, "the uplink has not seen the link come back yet"
    heartbeat.on_uplink({**up, "link": "RECONCILING", "state": "down"})
    assert heartbeat.state == Link.RECONCILING, "a dead uplink's last word does not count"
    heartbeat.on_uplink({**up, "link": "RECONCILING", "in_sync": False})
    assert heartbeat.state == Link.RECONCILING
    heartbeat.on_uplink({**up, "link": "RECONCILING"})
    assert heartbeat.state == Link.CONNECTED
    heartbeat.state = Link.ISOLATED
    heartbeat.on_uplink({**up, "link": "RECONCILING"})
    assert heartbeat.state == Link.ISOLATED, "only RECONCILING ends on an uplink report"
    heartbeat.http.close()
