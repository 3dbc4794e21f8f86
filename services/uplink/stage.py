"""Uplink: keep the signed entries from the sign stage and push them to the central gateway.

Entries land in this stage's LMDB (services.uplink.store) under the stage protocol, receipted
to sign only once stored. The pusher thread (services.uplink.pusher) drains them to the gateway
in seq order (services.uplink.drain) and has the ledger's checkpoints cosigned
(services.uplink.cosign), beside the stage loop, so a long drain never stops new entries from
being taken in. The link state comes from the heartbeat (retained `status/connectivity`,
services.uplink.link): while ISOLATED the pusher makes no calls at all.
"""

from __future__ import annotations

from services.uplink.pusher import Pusher
from services.uplink.store import ENTRIES, UPLINK_TABLES
from shared.runtime.messages import Item, json_encode
from shared.runtime.stage import Stage, UnitOfWork
from shared.runtime.store import u64
from shared.runtime.topics import Topics


class Uplink(Stage):
    name = "uplink"
    tables = UPLINK_TABLES

    def notice_topics(self, topics: Topics) -> tuple[str, ...]:
        return (topics.status("connectivity"),)

    def open(self, runtime) -> None:
        self.pusher = Pusher(runtime.config, runtime.store, runtime.log,
                             publish_status=runtime.publish_status, publish=runtime.link.publish,
                             topics=runtime.topics)
        # handled in paho's thread, with the retain flag, instead of as a notice in a batch
        runtime.link.watch[runtime.topics.status("connectivity")] = self.pusher.on_connectivity
        runtime.link.on_connect_hooks.append(self.pusher.on_mqtt_connect)
        self.pusher.start()

    def close(self) -> None:
        self.pusher.stop()

    def handle(self, items: list[Item], uow: UnitOfWork) -> None:
        acked = self.pusher.acked
        for item in items:
            if uow.seen(item.key) is not None:
                continue
            row = item.data["row"]
            seq = row["seq"]
            uow.remember(item.key, u64(seq))
            if seq <= acked:
                continue  # the gateway already holds it (re-sent after our ack was stored)
            uow.put(ENTRIES, u64(seq), json_encode(row))
            uow.transition(item.data.get("event_id"), item.key, "UPLINK_QUEUED", seq=seq)
        self.pusher.wake.set()

    def status_extra(self) -> dict:
        return self.pusher.view()
