"""Retention: what a stage may forget once the gateway holds it (issue 12; `[retention]` in edge.toml).

A stage's `seen` table (its fates, the dedupe state) grows with every record. A fate can go
once three things hold: the record is `recorded` in the ledger at seq S (`in_ledger_at`), the gateway has
acknowledged AND cosigned the ledger up to past S (`GatewayHolds.prunable_below`), and the
stage first saw the record longer ago than the dedupe window (`retention.seen_days`).
Rejected, held and in-flight fates are never pruned (a redrive needs the rejected ones), nor is
the ledger. DLQ rows go once exported (`mro-edge dlq export`) and older than `retention.dlq_days`.

What the gateway holds is told by the uplink (the one process that talks to it) on the sealed,
retained `pipeline/retention` topic (`GatewayHolds`); no stage reads another's tables. Until a
stage has heard it (gateway down, never cosigned), nothing is pruned.

The age of a fate comes from the `seen_age` index (`age_key`: u64 seconds, then the key),
written when a key's first fate is (`UnitOfWork.set_fate`). Fates stored before the index
existed get one at the pruner's first round (`shared.runtime.prune`), aged from then.

Time comes through one seam, `now_s`: the wall clock, plus the offset in seconds written in
the file `$MRO_RETENTION_CLOCK_FILE` names when that is set (tests move days forward without
waiting; never set in production).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from shared.runtime.messages import Fate, outcomes_decoder
from shared.runtime.store import u64

if TYPE_CHECKING:
    from shared.runtime.work import UnitOfWork

SEEN_AGE = "seen_age"
CLOCK_FILE_ENV = "MRO_RETENTION_CLOCK_FILE"
DAY_S = 86400.0
DLQ_EXPORTED_FILE = "dlq.exported"  # in the stage's directory: the last DLQ row id exported


def now_s() -> float:
    """Seconds since the epoch for retention ages (the one seam tests move time through)."""
    path = os.environ.get(CLOCK_FILE_ENV)
    if not path:
        return time.time()
    try:
        return time.time() + float(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return time.time()


def age_key(at_s: float, key: bytes) -> bytes:
    """The `seen_age` row of a key first seen at `at_s`: ordered by time, then key."""
    return u64(int(at_s)) + key


class GatewayHolds(msgspec.Struct, frozen=True, tag="gateway-holds/1"):
    """What the gateway holds of this box's ledger, as the uplink last learnt it.

    `acknowledged`: entries the gateway acknowledged (seq 0 .. acknowledged - 1);
    `cosigned`: the tree size of the newest checkpoint it cosigned (the box's receipt).
    """

    acknowledged: int
    cosigned: int
    at: str

    @property
    def prunable_below(self) -> int:
        """Records at a seq below this are both acknowledged and cosigned."""
        return max(0, min(self.acknowledged, self.cosigned))


gateway_holds_decoder = msgspec.json.Decoder(GatewayHolds)


class ExportedMark(msgspec.Struct, frozen=True):
    """`mro-edge dlq export` wrote out every DLQ row of the stage up to id `through` at `at`."""

    through: int
    at: str


exported_decoder = msgspec.json.Decoder(ExportedMark)


def read_exported(stage_dir: Path) -> ExportedMark | None:
    """The stage's DLQ export mark, None if nothing was exported (or the mark is unreadable)."""
    try:
        return exported_decoder.decode((Path(stage_dir) / DLQ_EXPORTED_FILE).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def learn_recorded(uow: UnitOfWork, payload: bytes) -> None:
    """Outcome notices at a stage that `learns_recorded` (validate): a fate it passed on learns the
    seq its record was recorded at, so the pruner can tell when the gateway holds it. The fate
    stays `validated` (this stage did not record it: a re-send's query still goes on to sign,
    the one stage that tells `recorded`); held and rejected fates stay as the stage decided them."""
    for told in outcomes_decoder.decode(payload).outcomes:
        if told.status != "recorded" or told.seq is None:
            continue
        fate = uow.fate(told.key)
        if fate is not None and fate.status == "validated" and fate.seq is None:
            uow.set_fate(told.key, Fate("validated", told.seq, redrive=fate.redrive))


def in_ledger_at(fate: Fate) -> int | None:
    """The seq a fate says its record is recorded at: a `recorded` fate's, or the one a
    `validated` fate learnt (`learn_recorded`); None if it does not say."""
    if fate.status in ("recorded", "validated"):
        return fate.seq
    return None
