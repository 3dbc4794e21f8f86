"""The operator's side of `mro-edge run` and the CLI (issue 9): one instance per data directory,
children that die with their supervisor, hung children restarted, ports and broker problems
reported before anything starts, endpoints found through run.json, JSON logs without secrets.

Everything is a real process tree on a real Mosquitto (tests/brokers.py); a taken port is a
real listening socket. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time

import psutil
import pytest

from mro_edge.instance import run_lock, service_lock
from mro_edge.supervisor import run_services
from services.registry import Kind, service_names
from shared.runtime.config import load_config
from shared.runtime.mqtt import mqtt_connack
from shared.runtime.topics import Topics
from tests.brokers import free_port, start_broker
from tests.edge import TopicRecorder
from tests.pipeline import ROOT, wait_until
from tests.runstack import AnonymousMosquitto, RunProc, cli, cli_env, gone

pytestmark = pytest.mark.timeout(300)

HUNG_AFTER_S = 5
# what `mro-edge run --no-broker` starts: the registry's services but the embedded broker
RUN_NO_BROKER = {s.name for s in run_services(with_broker=False, with_gateway=True)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Mosquitto and a `mro-edge run --no-broker` with its reference gateway, on one data dir."""
    data_dir = tmp_path_factory.mktemp("operator") / "data"
    broker = start_broker("mosquitto", data_dir)
    run = RunProc(data_dir, broker.url, "--no-broker", MRO_SUPERVISOR_HUNG_AFTER_S=str(HUNG_AFTER_S),
                  MRO_SUPERVISOR_CONSOLE_INTERVAL_S="1")
    run.start()
    run.broker = broker
    yield run
    run.stop()
    broker.stop()


def only_data_dir(run: RunProc, **extra: str) -> dict[str, str]:
    """A client command's environment: the data directory and nothing else of the stack."""
    env = {k: v for k, v in run.env.items() if k not in ("MRO_MQTT_URL", "MRO_GATEWAY_LISTEN")}
    env.update(extra)
    return env


def status_json(run: RunProc) -> dict:
    result = cli("status", "--json", env=only_data_dir(run))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- one instance per data directory ---------------------------------------------------------------

def test_a_second_run_on_a_busy_data_dir_is_refused(stack):
    children = stack.children()
    result = cli("run", "--no-broker", env=dict(stack.env, MRO_GATEWAY_LISTEN=f"127.0.0.1:{free_port()}"))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert f"in use by mro-edge run (pid {stack.pid}" in message and f"kill {stack.pid}" in message, message
    assert "MRO_DATA_DIR" in message and "Traceback" not in message
    assert stack.children() == children  # nothing else started, nothing restarted
    assert json.loads((stack.data_dir / "run.json").read_text())["pid"] == stack.pid


def test_a_second_service_on_a_busy_data_dir_is_refused(stack):
    result = cli("service", "sign", env=stack.env, timeout=30)
    assert result.returncode == 3
    assert f"managed by mro-edge run (pid {stack.pid}" in result.stderr, result.stderr


def test_a_standalone_service_holds_its_store(tmp_path):
    data_dir = tmp_path / "data"
    broker = start_broker("mosquitto", data_dir)
    env = cli_env(data_dir, broker.url)
    first = subprocess.Popen(
        [*_python_m(), "service", "ingest"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        holder = wait_until(lambda: service_lock(data_dir, "ingest").holder(), 30, 0.1, "ingest's lock")
        assert holder["pid"] == first.pid
        second = cli("service", "ingest", env=env, timeout=30)
        assert second.returncode == 3
        assert f"already runs: mro-edge service ingest (pid {first.pid}" in second.stderr, second.stderr
        run = cli("run", "--no-broker", "--no-gateway", env=env)
        assert run.returncode == 2
        assert f"ingest already runs as mro-edge service ingest (pid {first.pid}" in run.stderr, run.stderr
        assert not (data_dir / "run.json").exists()
    finally:
        first.terminate()
        first.wait(30)
        broker.stop()


def _python_m() -> list[str]:
    import sys

    return [sys.executable, "-m", "mro_edge"]


# -- endpoints, data directory, secrets --------------------------------------------------------------

def test_run_records_its_endpoints_and_the_cli_finds_them(stack):
    record = json.loads((stack.data_dir / "run.json").read_text())
    listen = stack.env["MRO_GATEWAY_LISTEN"]
    assert record["mqtt_url"] == stack.broker.url
    assert record["gateway_url"] == f"http://{listen}"  # derived from the one setting
    assert record["pid"] == stack.pid and record["service_secret"].endswith("secrets/operator/password")
    statuses = status_json(stack)  # no MRO_MQTT_URL: the address comes from run.json
    children = stack.children()
    for name in RUN_NO_BROKER:
        assert statuses[name]["state"] == "up", (name, statuses[name])
        assert statuses[name]["pid"] == children[name], name
    assert statuses["supervisor"]["pid"] == stack.pid
    # MRO_* still wins over run.json
    closed = f"mqtt://127.0.0.1:{free_port()}"
    result = cli("status", env=only_data_dir(stack, MRO_MQTT_URL=closed))
    assert result.returncode == 2 and f"no MQTT broker answers at {closed}" in result.stderr, result.stderr


def test_run_with_its_embedded_broker_and_simulator_prints_no_password(tmp_path):
    """`mro-edge run --simulate` on free ports, briefly: neither its console, its log file,
    `devices init` nor run.json ever carries a service's password; each child got its own
    login (user and password file), never another's."""
    data_dir = tmp_path / "data"
    run = RunProc(data_dir, f"mqtt://127.0.0.1:{free_port()}", "--simulate", "--rate", "20",
                  MRO_GATEWAY_LISTEN=f"127.0.0.1:{free_port()}")
    run.start()
    try:
        wait_until(lambda: "signed" in run.console(), 30, 0.5, "a summary line")
        init = cli("devices", "init", env=run.env)
        children = run.children()
        environments = {name: psutil.Process(pid).environ() for name, pid in children.items()}
    finally:
        run.stop()
    assert init.returncode == 0, init.stderr
    secrets = {path.parent.name: path.read_text().strip() for path in (data_dir / "secrets").glob("*/password")}
    assert len(secrets) >= 7
    outputs = [run.console(), init.stdout + init.stderr, (data_dir / "run.json").read_text()]
    outputs += [log.read_text(errors="replace") for log in (data_dir / "logs").glob("mro-edge.log*")]
    fleet = json.loads((data_dir / "broker" / "simulator-devices.json").read_text())
    secrets |= {device_id: login[1] for device_id, (_, login) in fleet.items()}  # the simulated devices'
    for name, secret in secrets.items():
        for text in outputs:
            assert secret not in text, name
        for child, environ in environments.items():
            assert secret not in "\n".join(environ.values()), (name, child)
    for name in ("ingest", "validate", "sign", "uplink", "heartbeat", "torque"):
        assert environments[name]["MRO_MQTT_USERNAME"] == f"mro-{name}", name
        assert environments[name]["MRO_MQTT_PASSWORD_FILE"] == str(data_dir / "secrets" / name / "password")
    assert "MRO_MQTT_PASSWORD_FILE" not in environments["broker"]


def test_devices_add_refuses_an_id_with_a_trailing_newline(stack):
    """`$` of a regex also matches before a final newline: the id is matched whole, and refused."""
    env = only_data_dir(stack)
    before = (stack.data_dir / "broker" / "passwd").read_text()
    for bad in ("EVIL\n", "EVIL\nmro-ingest", "mro-evil", "EV IL", ""):
        result = cli("devices", "add", bad, "--kind", "tablet", env=env)
        assert result.returncode == 2, (bad, result.stdout)
        assert "Traceback" not in result.stderr
        assert f"device id {bad!r} is not valid" in result.stderr, result.stderr
    assert (stack.data_dir / "broker" / "passwd").read_text() == before


def test_outside_a_project_the_cli_says_where_it_looked(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    env["PYTHONPATH"] = str(ROOT)
    for args in (("status",), ("devices", "add", "TQW-01", "--kind", "torque_wrench"), ("dlq", "list")):
        result = cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert f"no data directory at {tmp_path / 'var'}" in result.stderr, result.stderr
        assert "nothing was created" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_secret_on_the_console_in_run_json_status_or_logs(stack):
    files = sorted((stack.data_dir / "secrets").glob("*/password"))
    assert {f.parent.name for f in files} >= {"ingest", "validate", "sign", "uplink", "heartbeat", "supervisor",
                                              "operator"}
    operator = stack.data_dir / "secrets" / "operator" / "password"
    assert f'-u mro-operator -P "$(cat {operator})"' in stack.console()
    for path in files:
        secret = path.read_text().strip()
        assert len(secret) > 20 and path.stat().st_mode & 0o077 == 0, path
        assert secret not in stack.console(), path
        assert secret not in (stack.data_dir / "run.json").read_text(), path
        assert secret not in json.dumps(status_json(stack)), path
        for log in (stack.data_dir / "logs").glob("mro-edge.log*"):
            assert secret not in log.read_text(errors="replace"), (log, path)


def test_every_log_line_is_json_uvicorn_included_and_the_console_summarises(stack):
    wait_until(
        lambda: len(re.findall(r"services \d+/\d+ up", stack.console())) >= 2, 30, 0.5, "summary lines"
    )
    logs = sorted((stack.data_dir / "logs").glob("mro-edge.log*"))
    assert logs
    events = []
    for log in logs:
        for line in log.read_text().splitlines():
            events.append(json.loads(line))  # raises on a line that is not JSON
    assert any(e.get("logger", "").startswith("uvicorn") for e in events)
    assert {e.get("service") for e in events} >= {*service_names(Kind.STAGE), "gateway", "run"}
    summary = re.findall(r".*services \d+/\d+ up.*", stack.console())[-1]
    for word in ("signed", "/s", "backlog", "link", "DLQ"):
        assert word in summary, summary
    assert "INFO:" not in stack.console()


def test_devices_add_prints_a_ready_mosquitto_pub_line_then_list_and_remove(stack):
    env = only_data_dir(stack)
    pid_file = str(stack.broker.pid_file)
    added = cli("devices", "add", "TQW-77", "--kind", "torque_wrench", "--mosquitto-pub",
                "--mosquitto-pid-file", pid_file, env=env)
    assert added.returncode == 0, added.stderr
    line = added.stdout.strip()
    assert len(added.stdout.splitlines()) == 1 and line.startswith("mosquitto_pub ")
    argv = shlex.split(line)
    password = argv[argv.index("-P") + 1]
    assert argv[argv.index("-p") + 1] == str(stack.broker.port)
    assert argv[argv.index("-t") + 1] == "mro/HGR1/in/torque_wrench/TQW-77"

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    receipts: list[dict] = []
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id="TQW-77-receipts", clean_session=True)
    device.username_pw_set("TQW-77", password)
    device.on_connect = lambda c, *_: c.subscribe("mro/HGR1/receipt/TQW-77", qos=1)
    device.on_message = lambda _c, _u, m: receipts.append(json.loads(m.payload))
    wait_until(lambda: mqtt_connack(stack.broker.port, "TQW-77", password, timeout=10) == 0, 10, 0.2,
               "the device login")
    device.connect("127.0.0.1", stack.broker.port)
    device.loop_start()
    try:
        time.sleep(0.5)
        published = subprocess.run([*argv, "-m", "{}"], capture_output=True, text=True, timeout=30)
        assert published.returncode == 0, published.stderr
        wait_until(
            lambda: any(r.get("status") == "rejected" for r in receipts), 30, 0.2, "a rejected receipt"
        )
    finally:
        device.loop_stop()
        device.disconnect()

    listed = json.loads(cli("devices", "list", "--json", env=env).stdout)
    assert {
        "id": "TQW-77",
        "kind": "torque_wrench",
        "publishes_to": "mro/HGR1/in/torque_wrench/TQW-77",
    } in listed
    removed = cli("devices", "remove", "TQW-77", "--mosquitto-pid-file", pid_file, env=env)
    assert removed.returncode == 0, removed.stderr
    assert "TQW-77" not in cli("devices", "list", env=env).stdout
    wait_until(
        lambda: mqtt_connack(stack.broker.port, "TQW-77", password) != 0, 10, 0.2, "the login to be gone"
    )
    again = cli("devices", "remove", "TQW-77", env=env)
    assert again.returncode == 2 and "no device 'TQW-77'" in again.stderr


# -- a hung child --------------------------------------------------------------------------------------

def test_a_stopped_child_is_reported_hung_alarmed_killed_and_restarted(stack):
    config = load_config(env=dict(only_data_dir(stack), MRO_MQTT_URL=stack.broker.url))
    config.mqtt.username, config.mqtt.password = stack.broker.service_user
    topics = Topics("HGR1")
    recorder = TopicRecorder(config, (topics.status("sign"), topics.alarm)).start()
    old = stack.children()["sign"]
    os.kill(old, signal.SIGSTOP)
    try:
        hung = wait_until(
            lambda: [
                r.payload for r in recorder.of(topics.status("sign")) if r.payload.get("state") == "hung"
            ],
            HUNG_AFTER_S + 30,
            0.2,
            "status hung",
        )
        assert hung[0]["pid"] == old
        alarm = wait_until(
            lambda: [
                r.payload
                for r in recorder.of(topics.alarm)
                if r.payload.get("alarm") == "hung" and r.payload.get("service") == "sign"
            ],
            10,
            0.2,
            "the hung alarm",
        )
        assert f"pid {old}" in alarm[0]["detail"]
        wait_until(lambda: gone(old), 15, 0.2, "the hung sign to be killed")

        def restarted():
            statuses = status_json(stack)
            sign = statuses["sign"]
            return sign if sign["state"] == "up" and sign["pid"] not in (old, None) else None

        sign = wait_until(restarted, 60, 0.5, "a new sign to be up")
        assert sign["hung"] == 1 and sign["restarts"] >= 1
        assert sign["pid"] == stack.children()["sign"]
        assert f"sign (pid {old}) is hung" in stack.console()
    finally:
        if not gone(old):
            os.kill(old, signal.SIGCONT)
        recorder.stop()


# -- children die with their supervisor ---------------------------------------------------------------------

def test_kill_9_of_run_takes_every_child_along(tmp_path):
    data_dir = tmp_path / "data"
    broker = start_broker("mosquitto", data_dir)
    try:
        run = RunProc(data_dir, broker.url, "--no-broker").start()
        children = run.children()
        assert set(children) == RUN_NO_BROKER, children
        run.kill()
        wait_until(lambda: all(gone(pid) for pid in children.values()), 30, 0.2,
                   f"every child of the killed run to end: {children}")
        assert run_lock(data_dir).holder() is None
        assert all(service_lock(data_dir, name).holder() is None for name in children)
    finally:
        for pid in locals().get("children", {}).values():
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        broker.stop()


# -- reported before anything starts -------------------------------------------------------------------------

def test_taken_ports_are_reported_together_with_one_command_that_fixes_them(tmp_path):
    taken = []
    for _ in range(2):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken.append(listener)
    mqtt_port, gateway_port = (s.getsockname()[1] for s in taken)
    env = cli_env(
        tmp_path / "data", f"mqtt://127.0.0.1:{mqtt_port}", MRO_GATEWAY_LISTEN=f"127.0.0.1:{gateway_port}"
    )
    try:
        result = cli("run", "--simulate", env=env)
        assert result.returncode == 2
        message = result.stderr
        assert (
            f"127.0.0.1:{mqtt_port} (MQTT broker)" in message
            and f"127.0.0.1:{gateway_port} (reference gateway)" in message
        ), message
        fix = re.search(r"MRO_MQTT_URL=mqtt://127\.0\.0\.1:(\d+) MRO_GATEWAY_LISTEN=127\.0\.0\.1:(\d+) "
                        r"mro-edge run --simulate", message)
        assert fix, message
        new_mqtt, new_gateway = map(int, fix.groups())
        assert len({new_mqtt, new_gateway, mqtt_port, gateway_port}) == 4
        for port in (new_mqtt, new_gateway):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))  # free
        assert not (tmp_path / "data" / "run.json").exists() and not (tmp_path / "data" / "broker").exists()
        via_make = cli("run", env=dict(env, MAKELEVEL="1"))
        assert via_make.returncode == 2 and re.search(r"MRO_GATEWAY_LISTEN=\S+ make run", via_make.stderr)
    finally:
        for listener in taken:
            listener.close()


def test_an_unreachable_broker_is_one_line_and_nothing_runs(tmp_path):
    closed = f"mqtt://127.0.0.1:{free_port()}"
    result = cli("run", "--no-broker", env=cli_env(tmp_path / "data", closed))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mro-edge: no MQTT broker answers at {closed}"), (
        result.stderr
    )
    assert "running" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "run.json").exists()


def test_a_refused_login_says_not_authorised_at_once(tmp_path):
    data_dir = tmp_path / "data"
    broker = start_broker("mosquitto", data_dir)
    try:
        wrong = cli_env(data_dir, broker.url, MRO_MQTT_USERNAME="mro-services", MRO_MQTT_PASSWORD="wrong")
        for args in (("status",), ("run", "--no-broker")):
            started = time.monotonic()
            result = cli(*args, env=wrong)
            elapsed = time.monotonic() - started
            assert result.returncode == 2, (args, result.stderr)
            assert f"the broker at {broker.url} refused user 'mro-services'" in result.stderr, result.stderr
            assert re.search(r"(not authorised|bad user name or password) \(CONNACK [45]\)", result.stderr)
            assert "no MQTT broker" not in result.stderr and "Traceback" not in result.stderr
            assert elapsed < 8, (args, elapsed)  # no 10 s wait for a CONNACK that already said no
        assert not (data_dir / "run.json").exists()
    finally:
        broker.stop()


def test_a_password_without_a_username_is_refused(tmp_path):
    env = cli_env(tmp_path, "mqtt://127.0.0.1:1883", MRO_MQTT_PASSWORD="secret")
    for args in (("status",), ("run", "--no-broker"), ("service", "ingest")):
        result = cli(*args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert "MRO_MQTT_PASSWORD (mqtt.password) is set but MRO_MQTT_USERNAME" in result.stderr
        assert "secret" not in result.stderr.replace("service.secret", "")


def test_a_broker_open_to_anonymous_publishers_is_refused_unless_overridden(tmp_path):
    broker = AnonymousMosquitto(tmp_path / "anonymous")
    data_dir = tmp_path / "data"
    try:
        refused = cli("run", "--no-broker", "--no-gateway", env=cli_env(data_dir, broker.url))
        assert refused.returncode == 2
        assert f"the broker at {broker.url} lets anonymous clients publish device records" in refused.stderr
        assert "--allow-anonymous-broker" in refused.stderr and "Traceback" not in refused.stderr
        assert not (data_dir / "run.json").exists()

        config = load_config(env=cli_env(data_dir, broker.url, MRO_MQTT_USERNAME="observer"))
        recorder = TopicRecorder(config, (Topics("HGR1").alarm, Topics("HGR1").status("supervisor"))).start()
        run = RunProc(data_dir, broker.url, "--no-broker", "--no-gateway", "--allow-anonymous-broker")
        try:
            run.start()
            alarms = wait_until(
                lambda: [
                    r.payload
                    for r in recorder.of(Topics("HGR1").alarm)
                    if r.payload.get("alarm") == "anonymous_broker"
                ],
                20,
                0.2,
                "the alarm",
            )
            assert "--allow-anonymous-broker" in alarms[0]["detail"]
            assert "[alarm] anonymous_broker" in run.console()
            supervisor = wait_until(
                lambda: [
                    r.payload
                    for r in recorder.of(Topics("HGR1").status("supervisor"))
                    if r.payload.get("state") == "up"
                ],
                20,
                0.2,
                "the supervisor status",
            )
            assert supervisor[-1]["warnings"] == ["anonymous_broker"]
            log = (data_dir / "logs" / "mro-edge.log").read_text()
            assert "OVERRIDE_ANONYMOUS_BROKER" in log
        finally:
            run.stop()
            recorder.stop()
    finally:
        broker.stop()
