"""A flood of refusals becomes one log line per interval, carrying the count."""

from __future__ import annotations

import io
import json

from services.gateway.server import Throttled
from shared.runtime.logs import configure_logging


def test_a_flood_is_one_line_per_interval_with_the_count() -> None:
    out = io.StringIO()
    configure_logging("gateway", "-", stream=out)
    throttled = Throttled("refused", interval_s=3600)
    for _ in range(1000):
        throttled(limit=2)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if '"refused"' in line]
    assert [line["count"] for line in lines] == [1]
    assert throttled.count == 999
    throttled.interval_s = 0
    throttled(limit=2)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if '"refused"' in line]
    assert [line["count"] for line in lines] == [1, 1000]
