"""The reference gateway's /metrics over real HTTP, on SQLite and PostgreSQL: per origin, the
head it holds, how long ago that head entry was recorded, and the cosigned checkpoint size."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_gateway_checkpoints import checkpoint_of, post_checkpoint


def figures(url: str) -> dict[tuple[str, str], float]:
    response = httpx.get(url + "/metrics", timeout=10)  # no token, like /health
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, s.labels.get("origin", "")): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_show_each_origins_head_lag_and_cosigned_size(edge, gateway):
    before = figures(gateway.url)
    assert before[("mro_gateway_head_seq", edge.origin)] == -1  # registered, nothing held yet
    assert ("mro_gateway_lag_seconds", edge.origin) not in before
    assert before[("mro_gateway_cosigned_size", edge.origin)] == 0

    batch = edge.extend(40)
    assert edge.post(batch).status_code == 200
    assert post_checkpoint(edge, checkpoint_of(batch[:30], edge.origin, edge.key)).status_code == 200
    after = figures(gateway.url)
    assert after[("mro_gateway_head_seq", edge.origin)] == 39
    assert after[("mro_gateway_cosigned_size", edge.origin)] == 30
    recorded = datetime.fromisoformat(edge.stored()[-1]["recorded_at"].replace("Z", "+00:00")).timestamp()
    assert abs(after[("mro_gateway_lag_seconds", edge.origin)] - (time.time() - recorded)) < 60
