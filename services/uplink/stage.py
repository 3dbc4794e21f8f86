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
from shared.runtime.clock import utc_now
from shared.runtime.handler import Stage
from shared.runtime.messages import SignedRow
from shared.runtime.retention import GatewayHolds
from shared.runtime.store import u64
from shared.runtime.topics import Topics
from shared.runtime.verdicts import Recorded, Verdict
from shared.runtime.work import UnitOfWork


class Uplink(Stage[SignedRow]):
    name = "uplink"
    input_type = SignedRow
    tables = UPLINK_TABLES
    accepted_state = "UPLINK_QUEUED"
    knows_gateway_holds = True  # it tells the other stages how far they may prune

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

    def begin(self, uow: UnitOfWork) -> None:
        self.acked = self.pusher.acked

    def judge(self, item: SignedRow, uow: UnitOfWork) -> Verdict:
        if item.seq > self.acked:  # else the gateway already holds it (re-sent after our ack was stored)
            uow.put(ENTRIES, u64(item.seq), bytes(item.row))
        return Recorded(item.seq)

    def finish(self, uow: UnitOfWork) -> None:
        self.pusher.wake.set()

    def gateway_holds(self) -> GatewayHolds | None:
        pusher = getattr(self, "pusher", None)
        if pusher is None:
            return None
        return GatewayHolds(pusher.acked + 1, pusher.cosigner.cosigned_size, utc_now())

    def status_extra(self) -> dict:
        return {**self.pusher.view(), "oldest_unsent_at": self.pusher.oldest_unsent_at()}
