"""A service whose session another client keeps taking over says so: status `contested` and an
alarm, never `up`. Only a holder of the service's own password can do it (its client id is
derived from that password, and the embedded broker binds it to the service's user,
tests/integration/test_embedded_broker.py): a second copy of the service itself, as here."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.brokers import start_broker
from tests.mqttclient import Client
from tests.pipeline import Pipeline, wait_until


def test_a_service_kicked_off_repeatedly_reports_contested_and_raises_an_alarm(tmp_path: Path) -> None:
    broker = start_broker("mosquitto", tmp_path / "data")
    pipeline = Pipeline(broker, tmp_path / "data")
    try:
        pipeline.start("ingest")
        watcher = Client(broker, broker.service_user)  # the operator: status and alarms
        assert watcher.connect() == 0
        watcher.subscribe("mro/HGR1/alarm")
        watcher.subscribe("mro/HGR1/status/ingest")
        for _ in range(4):
            intruder = Client(broker, broker.login("ingest"), client_id=broker.client_id("ingest"))
            assert intruder.connect() == 0
            time.sleep(0.3)
            intruder.close()
            time.sleep(0.7)

        def alarm() -> bool:
            return any(topic.endswith("/alarm") and json.loads(payload).get("alarm") == "session_contested"
                       for topic, payload in watcher.seen())

        wait_until(alarm, 15, message="a session_contested alarm")

        def contested() -> bool:
            states = [json.loads(p)["state"] for t, p in watcher.seen() if t.endswith("/status/ingest")]
            return "contested" in states

        wait_until(contested, 10, message="status contested")
        watcher.close()
    finally:
        pipeline.stop()
        broker.stop()
