"""docs/prometheus-alerts.yml and docs/grafana-dashboard.json name only metrics that exist.

The metric names are taken from real expositions (the MCC's of a box model holding every kind of
figure, the gateway's of one origin), so renaming a metric without the docs fails here. The
alert rules are loaded as YAML, and checked by promtool too where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import exposition as gateway_exposition
from services.mcc.metrics import exposition
from services.mcc.state import BoxState
from shared.runtime.status import StageFigures

DOCS = Path(__file__).resolve().parents[2] / "docs"
T0 = 1_800_000_000.0
METRIC = re.compile(r"\b(mro_[a-z_]+)\b")


def exposed() -> set[str]:
    state = BoxState("HGR1", ("ingest", "uplink"))
    storage = {"used_bytes": 5 << 30, "budget_bytes": 24 << 30, "filesystem_free_bytes": 20 << 30, "refusing": "",
               "classes": {"ledger": {"used_bytes": 3 << 30, "budget_bytes": 13 << 30}}}
    state.on_status("ingest", {"state": "up", "storage": {**storage, "at": T0 - 5}}, T0 - 5)
    storage["used_bytes"] += 1 << 20  # growing: the fill forecast is exposed too
    state.on_status("ingest", {"state": "up", "queue_depth": 1, "outbox_oldest_s": 0.5, "dlq_rows": 0,
                               "dlq_bytes": 0, "store": {"used_mb": 10.5, "map_mb": 64, "max_mb": 512},
                               "storage": {**storage, "at": T0}, **StageFigures().payload()}, T0)
    for at, acked in ((T0, 1), (T0 + 5, 9)):
        state.on_status("uplink", {"state": "up", "backlog": 3, "acked_seq": acked, "cosigned_size": 2,
                                   "breaker": "CLOSED", "oldest_unsent_at": "2027-01-15T07:00:00.000Z"}, at)
    state.on_status("connectivity", {"state": "CONNECTED", "epoch": 1, "last_probe_ms": 12.0}, T0)
    state.on_dlq("ingest", {"errors": []}, T0)
    state.on_alarm({"alarm": "link_isolated"}, T0)
    texts = [exposition(state, threading.Lock(), lambda: T0 + 6).decode(),
             gateway_exposition([("mro-edge/HGR1", 3, "2027-01-15T07:00:00.000Z", 2)], T0).decode()]
    return {sample.name for text in texts for family in text_string_to_metric_families(text)
            for sample in family.samples}


def test_the_alert_rules_load_and_use_exposed_metrics_only() -> None:
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    names = exposed()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {"MroOldestUnsentOverAnHour", "MroLinkIsolated", "MroStageFrozen", "MroDlqRate"} <= {
        a["alert"] for a in alerts}
    for alert in alerts:
        assert alert["expr"] and alert["annotations"]["summary"], alert["alert"]
        used = set(METRIC.findall(alert["expr"]))
        assert used <= names, f"{alert['alert']} uses metrics nobody exposes: {used - names}"
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "rules", str(DOCS / "prometheus-alerts.yml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_is_json_and_queries_exposed_metrics_only() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    names = exposed()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs and dashboard["uid"] == "mro-edge-box"
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used and used <= names, f"{expr}: {used - names}"
