"""A service whose session another client keeps taking over says so: status `contested` and an
alarm, never `up`. Only a holder of the service's own password can do it: both brokers bind a
service's client ids to its user (the embedded broker itself, Mosquitto through the mro_clientid
plugin), so the only possible intruder is a second copy of the service itself, as here. Another
user's login with the id, even with the tagged id from Mosquitto's log, is refused and contests
nothing."""

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


def test_other_users_with_the_services_tagged_id_are_refused_and_contest_nothing(tmp_path: Path) -> None:
    broker = start_broker("mosquitto", tmp_path / "data")
    pipeline = Pipeline(broker, tmp_path / "data")
    try:
        pipeline.start("ingest")
        watcher = Client(broker, broker.service_user)
        assert watcher.connect() == 0
        watcher.subscribe("mro/HGR1/alarm")
        watcher.subscribe("mro/HGR1/status/ingest")
        ingest_id = broker.client_id("ingest")
        wait_until(lambda: f"as {ingest_id} (" in broker.log_path.read_text(), 15, message="ingest connected")
        device = broker.credentials.add_device("TAB-X", "tablet")
        broker.reload()
        time.sleep(0.5)
        for login in (device, broker.login("sign"), broker.service_user) * 2:
            intruder = Client(broker, login, client_id=ingest_id)
            assert str(intruder.connect()) == "Not authorized", login[0]
            time.sleep(0.3)
        time.sleep(3)
        alarms = [json.loads(p).get("alarm") for t, p in watcher.seen() if t.endswith("/alarm")]
        states = [json.loads(p)["state"] for t, p in watcher.seen() if t.endswith("/status/ingest")]
        assert "session_contested" not in alarms and "contested" not in states, (alarms, states)
        assert broker.log_path.read_text().count(f"as {ingest_id} (") == 1, "ingest was kicked off"
        watcher.close()
    finally:
        pipeline.stop()
        broker.stop()
