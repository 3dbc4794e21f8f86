"""The real gateway (SQLite and PostgreSQL) flags, and still accepts, an origin's entries whose
recorded_at goes backwards: the chain is valid and the edge cannot rewrite it."""

from __future__ import annotations

from tests.support.gateway import gateway_reader, make_entries

STAMPS = ["2026-03-01T10:00:00.000Z", "2026-03-01T10:00:01.000Z", "2026-03-01T10:00:01.000Z",
          "2026-03-01T09:00:00.000Z", "2026-03-01T09:00:05.000Z", "2026-03-01T08:59:00.000Z"]


def test_recorded_at_going_backwards_is_accepted_and_flagged_per_origin(edge, db_url):
    chain = list(make_entries(edge.key, edge.origin, len(STAMPS), recorded_at=lambda seq: STAMPS[seq]))
    first = edge.post(chain[:3])
    assert first.status_code == 200 and "time_backwards" not in first.json(), first.text
    # the batch starts right after the head: the first row is compared with the stored head's time
    second = edge.post(chain[3:])
    assert second.status_code == 200, second.text
    answer = second.json()
    assert answer["accepted"] == 3 and answer["head"]["seq"] == 5
    assert [(b["seq"], b["previous_seq"], b["previous"]) for b in answer["time_backwards"]] == [
        (3, 2, "2026-03-01T10:00:01.000Z"), (5, 4, "2026-03-01T09:00:05.000Z")]
    assert "recorded_at goes backwards at seq 3" in answer["time_backwards"][0]["message"]
    assert [r["entry"] for r in edge.stored()] == [e.entry for e in chain]
    with gateway_reader(db_url) as tx:
        flags = tx.time_flags(edge.origin)
    assert [(f["seq"], f["recorded_at"], f["previous_seq"]) for f in flags] == [
        (3, "2026-03-01T09:00:00.000Z", 2), (5, "2026-03-01T08:59:00.000Z", 4)]
    # a replay of the same rows stores nothing and flags nothing again
    again = edge.post(chain[3:])
    assert again.status_code == 200 and again.json()["replayed"] == 3 and "time_backwards" not in again.json()
    with gateway_reader(db_url) as tx:
        assert len(tx.time_flags(edge.origin)) == 2
