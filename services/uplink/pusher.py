"""The uplink's pusher thread: runs the drain and the cosign beside the stage loop, so a long
drain never stops new entries from being taken in.

It makes calls only while the link state from the heartbeat (services.uplink.link) is usable.
`in_sync` in the status (what ends RECONCILING) is only claimed after the gateway itself has
told us its head since the link came back: a head remembered from before an outage proves
nothing. The status names the connectivity `link_epoch` it was computed under; the gateway's
head is forgotten before any new link state or epoch is taken, so a status with the epoch of a
RECONCILING is based on what the gateway said after it began.

The status is published by the stage runtime every `stage.status_interval_s`; the pusher adds
one at once (at most every STATUS_MIN_GAP_S) when something the heartbeat or an operator acts
on changes: the breaker's state, the link state or epoch, `in_sync` while RECONCILING, and
the acknowledged seq moving back (before the `gateway_behind` alarm).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from services.uplink.client import GatewayClient, GatewaySession
from services.uplink.cosign import Cosigner
from services.uplink.drain import Drain
from services.uplink.ledger import LedgerView
from services.uplink.link import RECONCILING, USABLE, LinkWatch
from services.uplink.store import UplinkStore
from shared.runtime.alarms import alarm_payload
from shared.runtime.breaker import CircuitBreaker
from shared.runtime.config import Config
from shared.runtime.mqtt import Inbound
from shared.runtime.store import Store
from shared.runtime.topics import Topics

STATUS_MIN_GAP_S = 0.2
IDLE_S = 0.5


class StatusGate:
    """Publishes a status at once when what `shown` covers changed, at most every STATUS_MIN_GAP_S;
    one held back by that limit waits (`waiting`) until the pusher's idle loop sends it."""

    def __init__(self, publish: Callable[[], None], shown: Callable[[], tuple]):
        self._publish = publish
        self._shown = shown
        self.due = False
        self.waiting = False
        self._last_at = 0.0
        self._last_shown: tuple | None = None

    def wait_s(self, remaining: float) -> float:
        """How long the idle loop may sleep: `remaining`, or less when a status is waiting."""
        if not self.waiting:
            return remaining
        return min(remaining, max(0.0, self._last_at + STATUS_MIN_GAP_S - time.monotonic()))

    def publish_now(self) -> None:
        """Regardless of the limit: for what must be seen before what follows (an alarm)."""
        self.due = True
        self._last_at = 0.0
        self.publish()

    def publish(self) -> None:
        shown = self._shown()
        if not (self.due or self.waiting or shown != self._last_shown):
            return
        now = time.monotonic()
        if now - self._last_at < STATUS_MIN_GAP_S:
            self.waiting = True
            return
        self.due = self.waiting = False
        self._last_at = now
        self._last_shown = shown
        self._publish()


class Pusher(threading.Thread):
    """Drains the uplink store to the gateway in seq order and has its checkpoints cosigned."""

    def __init__(self, config: Config, store: Store, log, *, publish_status: Callable[[], None] | None = None,
                 publish: Callable[..., object] | None = None, topics: Topics | None = None,
                 client: GatewayClient | None = None):
        super().__init__(name="uplink-pusher", daemon=True)
        self.config = config
        self.log = log
        self.topics = topics or Topics(config.station)
        self._publish = publish or (lambda *a, **k: None)
        self.wake = threading.Event()
        self._halt = threading.Event()
        self.store = UplinkStore(store)
        self.ledger = LedgerView(config)
        self.gateway = GatewaySession(config, client)
        self.breaker = CircuitBreaker(config.uplink.breaker_failures, config.uplink.breaker_reset_s)
        self.link = LinkWatch(log, self._link_changing)
        self.status = StatusGate(publish_status or (lambda: None), self._shown)
        self.drain = Drain(config, self.store, self.ledger, self.gateway, self.breaker, log, self.alarm,
                           link_usable=self.link.usable, halt=self._halt, on_rewind=self.status.publish_now)
        self.cosigner = Cosigner(self.store, self.ledger, self.gateway, self.breaker, log, self.alarm)

    @property
    def acked(self) -> int:
        return self.drain.acked

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout=self.config.uplink.request_timeout_s + 2)
        self.gateway.close()
        self.ledger.close()

    # the heartbeat's view of the link, in paho's thread
    def on_mqtt_connect(self) -> None:
        self.link.on_mqtt_connect()

    def on_connectivity(self, message: Inbound) -> None:
        if self.link.on_connectivity(message):
            self._link_changed()

    def set_link_state(self, state: str, epoch: int | None = None) -> None:
        if self.link.set(state, epoch):
            self._link_changed()

    def _link_changing(self, previous: str, state: str, new_epoch: bool) -> None:
        """Before the state is taken: the gateway's head is unknown until it says so again (the
        heartbeat saw the link change; the gateway may have been away, and back restored)."""
        self.drain.gateway_head = None
        self.drain.ask_head_now()
        if previous not in USABLE and state in USABLE:
            self.breaker.trial()  # the heartbeat just saw the gateway answer: try now, not after reset_s

    def _link_changed(self) -> None:
        self.status.due = True  # published by the pusher thread
        self.wake.set()

    # what the heartbeat and `mro-edge status` see
    def view(self) -> dict:
        link, epoch = self.link.state, self.link.epoch  # before the gateway's head: see _link_changing
        queued = self.store.queued()
        local = self.ledger.head()
        gateway = self.drain.gateway_head
        acked = self.drain.acked
        return {"backlog": max(local.seq - acked, 0), "queued": queued, "acked_seq": acked,
                "local_head": local.seq, "gateway_head": gateway.seq if gateway else None,
                "in_sync": queued == 0 and gateway is not None and gateway == local,
                "breaker": self.breaker.state, "link": link, "link_epoch": epoch,
                "cosigned_size": self.cosigner.cosigned_size}

    def oldest_unsent_at(self) -> str | None:
        """When the oldest entry the gateway does not hold yet was recorded; None: it holds all."""
        if self.ledger.head().seq <= self.drain.acked:
            return None
        return self.ledger.recorded_at(self.drain.acked + 1)

    def _shown(self) -> tuple:
        """What a status is published at once for: the breaker's state (every one shows,
        HALF_OPEN included), the link state and epoch, and `in_sync` while RECONCILING (it ends
        RECONCILING). Backlog figures wait for the periodic status."""
        view = self.view()
        return (self.breaker.state, view["link"], view["link_epoch"],
                view["in_sync"] if view["link"] == RECONCILING else None)

    def alarm(self, kind: str, detail: str) -> None:
        self.log.error("uplink alarm", alarm=kind, detail=detail[:500], state_transition="ALARM")
        self._publish(self.topics.alarm, alarm_payload("uplink", kind, detail))

    # the thread
    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.step()
            except Exception as exc:  # never let the pusher thread die: the stage would look healthy
                self.log.exception("uplink pusher error; retrying", error=type(exc).__name__)
                self._halt.wait(1.0)

    def step(self) -> None:
        if not self.link.known and self.link.adopt_pending():
            self.status.due = True
        if not self.link.usable() or not self.breaker.allow():
            self.status.publish()
            self._idle(IDLE_S)
            return
        batch = self.drain.next_batch()
        if batch is None:
            self.drain.drop_stale()
            self.drain.check_head()
            self.cosigner.post(self.drain.gateway_head)
            self.status.publish()
            self._idle(IDLE_S)
            return
        self.status.publish()  # shows HALF_OPEN while the trial call is out
        self.drain.push(batch)
        self.cosigner.post(self.drain.gateway_head)  # also during a long drain or steady traffic
        self.status.publish()

    def _idle(self, seconds: float) -> None:
        """Wait until woken or `seconds` passed; a status held back by the rate limit goes out
        as soon as the limit allows."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.wake.wait(self.status.wait_s(remaining)):
                break
            if self.status.waiting:
                self.status.publish()
        self.wake.clear()
