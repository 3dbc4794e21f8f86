"""An exception in any paho callback of shared.runtime.mqtt.MqttLink ends the process loudly.

Before, an on-connect hook that raised (the uplink's status hook, when sign's store had no
`ledger` table yet) ended paho's network thread and the process lived on, deaf. Now the guard
logs one structured error and exits with FATAL_EXIT, so the supervisor restarts the service.

Each case is a real child process against a real Mosquitto (tests/brokers.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from shared.runtime.mqtt import FATAL_EXIT
from tests.brokers import start_broker
from tests.pipeline import ROOT

pytestmark = pytest.mark.timeout(120)

TOPIC = "mro/HGR1/alarm"  # the operator (the link's default login) reads it, the supervisor writes it

CHILD = textwrap.dedent("""
    import sys, time
    from shared.runtime.config import load_config
    from shared.runtime.logs import configure_logging
    from shared.runtime.mqtt import MqttLink

    case = sys.argv[1]
    configure_logging("fatal-probe", "HGR1")
    config = load_config()
    link = MqttLink(config, client_id="test-fatal-" + case, subscriptions=[(sys.argv[2], 1)], persistent=False)

    def broken_hook():
        raise KeyError("no table 'ledger' (yet)")

    def broken_handler(_message):
        raise ValueError("cannot handle this")

    if case == "hook":
        link.on_connect_hooks.append(broken_hook)
    elif case == "direct":
        link.direct[sys.argv[2]] = broken_handler
    elif case == "watch":
        link.watch[sys.argv[2]] = broken_handler
    link.start(wait_s=20)
    print("READY", flush=True)
    time.sleep(30)  # the main thread carries on: only the guard can end the process
    print("STILL ALIVE", flush=True)
""")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    proc = start_broker("mosquitto", tmp_path_factory.mktemp("fatal") / "data")
    yield proc
    proc.stop()


@pytest.mark.parametrize(("case", "callback", "error"), [
    ("hook", "on_connect hook broken_hook", "KeyError"),
    ("direct", f"handler broken_handler of {TOPIC}", "ValueError"),
    ("watch", f"handler broken_handler of {TOPIC}", "ValueError"),
])
def test_an_exception_in_a_callback_ends_the_process_loudly(broker, case, callback, error) -> None:
    env = dict(os.environ, MRO_MQTT_URL=broker.url, MRO_DATA_DIR=str(broker.data_dir), PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, case, TOPIC], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        if case != "hook":
            assert child.stdout.readline().strip() == "READY"
            started = time.monotonic()
            code = _poison_until_exit(child, broker)
        else:
            code = child.wait(timeout=20)
        out, err = child.communicate(timeout=5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == FATAL_EXIT, f"exit {code}; stdout {out!r}; stderr {err!r}"
    assert "STILL ALIVE" not in out
    assert time.monotonic() - started < 10
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    fatal = [line for line in lines if line.get("state_transition") == "FATAL"]
    assert len(fatal) == 1, err
    record = fatal[0]
    assert record["level"] == "critical" and record["service"] == "fatal-probe" and record["station"] == "HGR1"
    assert record["callback"] == callback and record["error"] == error and record["exit_code"] == FATAL_EXIT
    assert any(":broken_" in frame for frame in record["where"]), record["where"]
    assert "poison" not in err, "the payload never reaches the log"


def _poison_until_exit(child: subprocess.Popen, broker) -> int:
    """Publish the poison until the child exits (at most 20 s). READY comes once the child is
    connected, but its SUBSCRIBE may still be on its way to the broker: a poison published before
    the subscription holds reaches nobody, so it is sent again every 2 s."""
    deadline = time.monotonic() + 20
    while True:
        _publish(broker, TOPIC, b'{"poison": true}')
        try:
            return child.wait(timeout=min(2, max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise


def _publish(broker, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-fatal-pub-{time.monotonic_ns()}",
                         protocol=paho.MQTTv311)
    client.username_pw_set(*broker.login("supervisor"))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
