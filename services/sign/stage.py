"""Sign: append each validated record to the hash-chained, Ed25519-signed ledger exactly once.

The dedupe check, the entry, the chain head and the seen-key land in one transaction, so a
record delivered twice (re-send, redelivery, restart) is appended once. Device `recorded`
receipts and outcome notices leave only after the commit.
"""

from __future__ import annotations

from shared.crypto import SigningKey
from shared.ledger import GENESIS_PREV, entry_bytes, export_row, sign_entry
from shared.ledger_store import LEDGER_TABLE, decode_entry, encode_entry
from shared.stage import Stage, UnitOfWork
from shared.store import from_u64, u64
from shared.wire import DeviceReceipt, Item, Outcome, Outcomes, json_encode, utc_now


class Sign(Stage):
    name = "sign"
    downstream = "uplink"
    tables = (LEDGER_TABLE,)

    def open(self, runtime) -> None:
        self.key = SigningKey.load_or_create(runtime.config.data_path / "keys")
        self.origin = runtime.config.origin

    def handle(self, items: list[Item], uow: UnitOfWork) -> None:
        last = uow.last(LEDGER_TABLE)
        head = decode_entry(last[1]) if last else None
        seq, prev = (head.seq + 1, head.hash) if head else (0, GENESIS_PREV)
        recorded: list[Outcome] = []
        for item in items:
            prior = uow.seen(item.key)
            if prior is not None:
                if item.data.get("resend"):
                    self._answer_resend(item, from_u64(prior), uow, recorded)
                continue
            body = item.data["body"]
            entry = entry_bytes(origin=self.origin, seq=seq, prev=prev, idem=item.key, kid=self.key.kid,
                                recorded_at=utc_now(), type=body["type"], body=body)
            signed = sign_entry(self.key, entry, seq, item.key)
            uow.put(LEDGER_TABLE, u64(seq), encode_entry(signed), append=True)
            uow.remember(item.key, u64(seq))
            uow.forward(item.key, {"event_id": body["event_id"], "row": export_row(signed)})
            uow.device_receipt(item.data["device"]["id"],
                               DeviceReceipt("recorded", utc_now(), body["event_id"], item.key, seq=seq))
            uow.transition(body["event_id"], item.key, "SIGNED", seq=seq)
            recorded.append(Outcome(item.key, "recorded", seq=seq))
            seq, prev = seq + 1, signed.hash
        if recorded:
            uow.publish(uow.topics.outcomes, json_encode(Outcomes(recorded)))

    def _answer_resend(self, item: Item, seq: int, uow: UnitOfWork, recorded: list[Outcome]) -> None:
        """A device asked again about a record already in the ledger: tell it (and ingest) the seq."""
        body = item.data["body"]
        uow.device_receipt(item.data["device"]["id"],
                           DeviceReceipt("duplicate", utc_now(), body["event_id"], item.key, seq=seq))
        recorded.append(Outcome(item.key, "recorded", seq=seq))
