"""Hop authentication benchmark: what sealing and opening a pipeline message costs per record.

``run_hopauth_bench(quick=False)`` builds the validate -> sign hop exactly as the runtime does
(real ``ValidatedRecord`` torque events as the outbox stores them, ``encode_envelope``, the
Ed25519 hop keys of ``shared.runtime.hopauth`` in a temporary data directory) and times, per
envelope of 1, 10, 50 and 250 records (``stage.outbox_batch``, the largest a stage sends):

- ``decode``: the plain decode of the envelope into typed items (what every stage paid before);
- ``seal``: the sender's Ed25519 seal over topic, source and body;
- ``open_decode``: the receiver's check of the seal, then the same decode.

Both sides run in this one process, so the figures share their machine load. Run:
``python -m bench --quick --only hopauth`` (a few seconds).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from shared.runtime.hopauth import HopAuth, ensure_hop_keys
from shared.runtime.messages import FateQuery, ValidatedRecord, encode_envelope, envelope_decoder, item_encoder
from shared.runtime.topics import Topics
from tests.support.sign import record_item

SIZES = (1, 10, 50, 250)


def _per_record_us(run, envelopes: int, size: int) -> float:
    """Median of 5 timings of `run` over every envelope, in microseconds per record."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    return round(times[2] / (envelopes * size) * 1e6, 2)


def run_hopauth_bench(quick: bool = False) -> dict[str, Any]:
    records = 5_000 if quick else 25_000
    topics = Topics("HGR1")
    topic = topics.stage_input("sign")
    with tempfile.TemporaryDirectory(prefix="mro-bench-hopauth-") as tmp:
        ensure_hop_keys(Path(tmp))
        validate = HopAuth.for_service(Path(tmp), topics, "validate", ())
        sign = HopAuth.for_service(Path(tmp), topics, "sign", (topic,))
    items = [item_encoder.encode(record_item(i)) for i in range(max(SIZES))]
    decoder = envelope_decoder(ValidatedRecord | FateQuery)
    rows = []
    for size in SIZES:
        envelopes = max(1, records // size)
        body = encode_envelope("validate", items[:size])
        sealed = validate.seal(topic, body)
        assert decoder.decode(sign.open(topic, sealed)[1]).items == decoder.decode(body).items

        def decode(body: bytes = body, n: int = envelopes) -> None:
            for _ in range(n):
                decoder.decode(body)

        def seal(body: bytes = body, n: int = envelopes) -> None:
            for _ in range(n):
                validate.seal(topic, body)

        def open_decode(sealed: bytes = sealed, n: int = envelopes) -> None:
            for _ in range(n):
                decoder.decode(sign.open(topic, sealed)[1])

        row = {"records_per_envelope": size, "envelope_bytes": len(body), "sealed_bytes": len(sealed),
               "decode_us_per_record": _per_record_us(decode, envelopes, size),
               "seal_us_per_record": _per_record_us(seal, envelopes, size),
               "open_decode_us_per_record": _per_record_us(open_decode, envelopes, size)}
        added = row["seal_us_per_record"] + row["open_decode_us_per_record"] - row["decode_us_per_record"]
        row["auth_added_us_per_record"] = round(added, 2)
        rows.append(row)
        print(f"  {size:>4} records/envelope ({len(body):>7} B): decode {row['decode_us_per_record']:>7} us/rec, "
              f"seal {row['seal_us_per_record']:>7}, open+decode {row['open_decode_us_per_record']:>7}, "
              f"added by the seal {added:>7.2f} us/rec", flush=True)
    return {"records": records, "by_batch": rows}
