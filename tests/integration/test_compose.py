"""compose.yaml stays honest without a Docker engine.

`docker-compose config` (Debian's docker-compose, installed here if missing) must accept the
file, and the rendered services must match what the project ships: the commands the CLI
provides, the Mosquitto config the broker tests run, and the paths that config expects.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.brokers import MOSQUITTO_CONF, REPO

# The one list of compose services besides mosquitto, with their exact commands.
PIPELINE = ("ingest", "validate", "sign")
LINK = ("uplink", "heartbeat")
COMMANDS = {
    "init": ["mro-edge", "devices", "init"],
    **{name: ["mro-edge", "service", name] for name in PIPELINE + LINK},
    "simulator": ["mro-edge", "simulate", "--duration", "0", "--rate", "5"],
}
DEMO_ONLY = {"simulator"}
ONE_SHOT = {"init"}
BROKER = "mosquitto"
# The demo profile's stand-in for the central data lake: not an edge service.
GATEWAY = "gateway"
GATEWAY_REGISTER = "gateway-register"
CENTRAL = {GATEWAY, GATEWAY_REGISTER}
SERVICE_UID = "1883"


def docker_compose() -> str:
    """Path of docker-compose, installing Debian's package when it is missing (never skips)."""
    found = shutil.which("docker-compose")
    if found:
        return found
    where = "in CI" if os.environ.get("CI") else "locally"
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.fail(f"docker-compose is missing and cannot be installed {where} (needs root and apt-get); "
                    "install the Debian package `docker-compose`")
    install = ["apt-get", "install", "-y", "-q", "docker-compose"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"could not install docker-compose {where}:\n{result.stderr[-2000:]}")
    found = shutil.which("docker-compose")
    if not found:
        pytest.fail("apt-get installed docker-compose but it is not on PATH")
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRO_", "COMPOSE_", "DOCKER_"))}
    result = subprocess.run(
        [docker_compose(), "-f", str(REPO / "compose.yaml"), "--profile", "demo", "config"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"docker-compose config rejected compose.yaml:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or absolute host path) of a rendered service."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = str(volume["source"])
        else:
            source, target = volume.split(":")[:2]
            found[target] = source
    return found


def conf_directives() -> dict[str, str]:
    directives = {}
    for line in MOSQUITTO_CONF.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives.setdefault(key, value.strip())
    return directives


def test_services_are_exactly_the_known_ones(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(COMMANDS) | {BROKER} | CENTRAL
    for name, expected in COMMANDS.items():
        service = compose["services"][name]
        assert service["command"] == expected, name
        assert service["image"] == compose["services"]["init"]["image"], "one image for every app service"
        assert (service.get("profiles") == ["demo"]) == (name in DEMO_ONLY), name
        assert service["restart"] == ("no" if name in ONE_SHOT else "unless-stopped"), name


def test_app_services_share_environment_and_volumes(compose: dict[str, Any]) -> None:
    listener_port = conf_directives()["listener"].split()[0]
    for name in COMMANDS:
        service = compose["services"][name]
        env = service["environment"]
        assert env["MRO_MQTT_URL"] == f"mqtt://{BROKER}:{listener_port}", name
        assert env["MRO_DATA_DIR"] == "/data", name
        assert env["MRO_STATION"], name
        assert mounts(service)["/data/broker"] == mounts(compose["services"][BROKER])["/mosquitto/auth"], name
        if name not in ONE_SHOT:
            assert service["depends_on"] == {
                "init": {"condition": "service_completed_successfully"},
                BROKER: {"condition": "service_healthy"},
            }, name


def test_pipeline_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name in PIPELINE + LINK:
        check = compose["services"][name]["healthcheck"]
        assert check["test"] == ["CMD", "mro-edge", "status", "--service", name, "--check"]


def test_link_services_point_at_the_gateway(compose: dict[str, Any]) -> None:
    """uplink and heartbeat talk to the same gateway: the demo one unless MRO_LINK_GATEWAY_URL
    names the real central gateway."""
    urls = {compose["services"][name]["environment"]["MRO_LINK_GATEWAY_URL"] for name in LINK}
    gateway = compose["services"][GATEWAY]
    host, port = gateway["environment"]["MRO_GATEWAY_LISTEN"].rsplit(":", 1)
    assert urls == {f"http://{GATEWAY}:{port}"}
    assert host == "0.0.0.0", "the demo gateway must listen beyond its own container"
    raw = yaml.safe_load((REPO / "compose.yaml").read_text())
    for name in LINK:
        assert raw["services"][name]["environment"]["MRO_LINK_GATEWAY_URL"] == \
            f"${{MRO_LINK_GATEWAY_URL:-http://{GATEWAY}:{port}}}", name


def test_demo_gateway_runs_the_service_with_an_http_health_check(compose: dict[str, Any]) -> None:
    gateway = compose["services"][GATEWAY]
    assert gateway["command"] == ["mro-edge", "service", "gateway"]
    assert gateway["profiles"] == ["demo"]
    assert gateway["image"] == compose["services"]["init"]["image"]
    assert gateway["restart"] == "unless-stopped"
    test = gateway["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "urllib.request" in test[3]
    port = gateway["environment"]["MRO_GATEWAY_LISTEN"].rsplit(":", 1)[1]
    assert f"http://127.0.0.1:{port}/health" in test[3]
    assert mounts(gateway)["/data"] == mounts(compose["services"]["sign"])["/data"]
    assert gateway["environment"]["MRO_DATA_DIR"] == "/data"
    # the health check really is a check: it exits non-zero when nothing answers
    probe = subprocess.run([sys.executable, "-c", test[3].replace(port, "9")], capture_output=True, timeout=30)
    assert probe.returncode != 0


def test_demo_registers_the_box_at_the_demo_gateway(compose: dict[str, Any]) -> None:
    register = compose["services"][GATEWAY_REGISTER]
    assert register["profiles"] == ["demo"] and register["restart"] == "no"
    assert register["depends_on"] == {"sign": {"condition": "service_healthy"},
                                      GATEWAY: {"condition": "service_healthy"}}
    script = register["command"][2]
    assert register["command"][:2] == ["sh", "-c"]
    assert "mro-edge gateway register-edge" in script and "/data/uplink/token" in script
    # `$$` in compose.yaml is a literal `$` for the shell (the rendered config keeps it escaped)
    assert script.replace("$$", "$").count('"mro-edge/${MRO_STATION}"') == 1, \
        "the origin is the ledger's: mro-edge/<station>"
    assert mounts(register)["/data"] == mounts(compose["services"]["uplink"])["/data"]


def test_mosquitto_runs_the_config_the_tests_run(compose: dict[str, Any]) -> None:
    broker = compose["services"][BROKER]
    assert broker["image"] == "eclipse-mosquitto:2"
    volumes = mounts(broker)
    assert Path(volumes["/mosquitto/config/mosquitto.conf"]) == MOSQUITTO_CONF
    directives = conf_directives()
    assert directives["allow_anonymous"] == "false"
    for key in ("password_file", "acl_file"):
        assert str(Path(directives[key]).parent) in volumes, f"{key} {directives[key]} is not in a mounted volume"
    assert directives["persistence"] == "true"
    assert directives["persistence_location"].rstrip("/") in volumes
    assert broker["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
    assert "mosquitto_sub" in " ".join(broker["healthcheck"]["test"])


def test_broker_and_app_share_the_file_owner(compose: dict[str, Any]) -> None:
    """Mosquitto must read the 0600 credential files the app writes: same uid in both images."""
    assert compose["services"][BROKER]["user"] == f"{SERVICE_UID}:{SERVICE_UID}"
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    # both stages (build, run) on the one base image, pinned to an exact patch release
    assert [line.split()[1] for line in dockerfile if line.startswith("FROM ")] == ["python:3.11.13-slim-bookworm"] * 2
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users == [f"{SERVICE_UID}:{SERVICE_UID}"]
