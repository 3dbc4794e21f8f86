"""The cosign: have the gateway cosign the newest checkpoint of the ledger it can check.

Once the gateway holds the entries a signed checkpoint covers, the checkpoint is posted
(`POST /v1/checkpoints`); the gateway checks it against what it holds and cosigns it, and the
cosigned note is kept in the uplink's store as the box's receipt. `cosigned_size` says how far
that receipt reaches.
"""

from __future__ import annotations

import time

from services.uplink.client import GatewayError, GatewaySession, GatewayUnavailable, Head
from services.uplink.drain import Alarm
from services.uplink.ledger import LedgerView
from services.uplink.store import UplinkStore
from shared.runtime.breaker import CircuitBreaker

CHECKPOINT_EVERY_S = 2.0


class Cosigner:
    """Posts checkpoints (at most every CHECKPOINT_EVERY_S) and keeps the cosigned note."""

    def __init__(self, store: UplinkStore, ledger: LedgerView, gateway: GatewaySession,
                 breaker: CircuitBreaker, log, alarm: Alarm):
        self.store = store
        self.ledger = ledger
        self.gateway = gateway
        self.breaker = breaker
        self.log = log
        self.alarm = alarm
        self.cosigned_size = store.cosigned_size()
        self._tried = 0.0
        self._refused_size = 0

    def post(self, gateway_head: Head | None) -> None:
        """In step with the gateway: have the newest checkpoint it can check cosigned."""
        now = time.monotonic()
        if gateway_head is None or now - self._tried < CHECKPOINT_EVERY_S:
            return
        self._tried = now
        note = self.ledger.checkpoint_at_most(gateway_head.seq + 1)  # its entries are all at the gateway
        size = checkpoint_size(note) if note else None
        if note is None or size is None or size <= self.cosigned_size or size == self._refused_size:
            return
        try:
            answer = self.gateway.client().post_checkpoint(note)
        except GatewayUnavailable:
            self.breaker.failure()
            return
        except GatewayError as exc:
            self._refused(size, exc)
            return
        self.breaker.success()
        cosigned = answer.get("cosigned_checkpoint")
        if not isinstance(cosigned, str) or answer.get("size") != size:
            self.alarm("checkpoint_receipt", f"unexpected answer to checkpoint {size}: {str(answer)[:300]}")
            self._refused_size = size
            return
        self.store.record_cosigned(cosigned, size)
        self.cosigned_size = size
        self.log.info("checkpoint cosigned by the gateway", size=size, cosigner=answer.get("cosigner"),
                      state_transition="CHECKPOINT_COSIGNED")

    def _refused(self, size: int, exc: GatewayError) -> None:
        code = str(exc.detail.get("code", "checkpoint_refused"))
        if code == "not_held":
            return  # asked again later
        self._refused_size = size
        if code == "stale_checkpoint":
            self.log.warning("the gateway holds a newer checkpoint", size=size,
                             last_size=exc.detail.get("last_size"))
            return
        self.alarm(f"checkpoint_{code}", str(exc))


def checkpoint_size(note: bytes) -> int | None:
    """The tree size of a C2SP checkpoint note (its second line), without checking it: the
    gateway checks it, against the entries it holds."""
    lines = note.split(b"\n", 2)
    return int(lines[1]) if len(lines) > 2 and lines[1].isdigit() else None
