"""compose.yaml stays honest without a Docker engine.

`docker-compose config` (Debian's docker-compose, installed here if missing) must accept the
file with the operator's .env (deploy/env.example) and with the demo's (deploy/demo.env), and
the rendered services must match what the project ships: the commands the CLI provides, the
Mosquitto config the broker tests run, the site template the validate stage reads, and the
paths those expect. The scripts and health checks compose runs are run here for real: the
Mosquitto launcher and its health check under busybox (the eclipse-mosquitto image is Alpine),
and the app health check against a real `mro-edge service` with tini as PID 1 of its own PID
namespace, as `init: true` gives it in a container. A kill from a health check can never
reach beyond that namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from services.broker.credentials import SERVICE_NAMES, BrokerCredentials
from services.registry import SERVICES, Kind
from shared.compliance.registry import RegistrySource, read_file_entries
from shared.compliance.settings import compliance_settings
from shared.runtime.config import load_config
from shared.runtime.mqtt import mqtt_connack
from tests.brokers import MOSQUITTO_CONF, REPO, free_port, mosquitto_binary, render_mosquitto_conf

# The box's services of the registry (services/registry.py), one container each; compose runs
# Mosquitto in place of the embedded broker.
BOX = tuple(s.name for s in SERVICES if s.on_box and s.kind is not Kind.BROKER)
LINK = ("uplink", "heartbeat")
# The one list of compose services besides mosquitto, with their exact commands.
COMMANDS = {
    "init": ["mro-edge", "devices", "init"],
    **{name: ["mro-edge", "service", name] for name in BOX},
    "simulator": ["mro-edge", "simulate", "--duration", "0", "--rate", "5"],
}
ONE_SHOT = {"init"}
# The one-shot that makes the broker's TLS certificate on first boot (README, "TLS"): it needs
# no site and no broker login, only the tls volume Mosquitto mounts.
CERTS = "certs"
CERTS_DIR = "/data/tls"
BROKER = "mosquitto"
# The demo profile's stand-in for the central data lake: not an edge service.
GATEWAY = "gateway"
GATEWAY_REGISTER = "gateway-register"
CENTRAL = {GATEWAY, GATEWAY_REGISTER}
DEMO_ONLY = {"simulator"} | CENTRAL
SERVICE_UID = "1883"
# the containers that write the broker's password file and ACL (Mosquitto reads them)
CREDENTIAL_WRITERS = {"init", "simulator"}

DEPLOY = REPO / "deploy"
ENV_EXAMPLE = DEPLOY / "env.example"
DEMO_ENV = DEPLOY / "demo.env"
SITE_TEMPLATE = DEPLOY / "site-template"
MOSQUITTO_RUN = DEPLOY / "mosquitto" / "run.sh"
MOSQUITTO_HEALTH = DEPLOY / "mosquitto" / "healthcheck.sh"
# What the eclipse-mosquitto image's busybox provides and the scripts call.
BUSYBOX_APPLETS = ("sh", "touch", "date", "sleep", "cat", "wc", "rm")


def need_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        pytest.fail(f"{name} is missing: scripts/ensure-tools installs it (Debian packages "
                    "busybox, tini, util-linux)")
    return found


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


def render(env_file: Path, *, profile: str | None = None, extra: str = "",
           tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` of compose.yaml with `env_file` (plus `extra` lines) as its .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRO_", "COMPOSE_", "DOCKER_"))}
    if extra:
        assert tmp is not None
        combined = tmp / "compose.env"
        combined.write_text(env_file.read_text() + "\n" + extra + "\n")
        env_file = combined
    command = [docker_compose(), "-f", str(REPO / "compose.yaml"), "--env-file", str(env_file)]
    if profile:
        command += ["--profile", profile]
    return subprocess.run(command + ["config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def rendered(env_file: Path, **kwargs) -> dict[str, Any]:
    result = render(env_file, **kwargs)
    assert result.returncode == 0, (
        f"docker-compose config rejected compose.yaml with {env_file}:\n{result.stderr}"
    )
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The demo: every service."""
    return rendered(DEMO_ENV, profile="demo")


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    """What an operator gets from deploy/env.example (docker-compose 1.x renders every
    service whatever the profile; `profiles` says which ones `up` starts)."""
    return rendered(ENV_EXAMPLE)


def env_file_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def default_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services `docker compose up` starts without a profile."""
    return {name: s for name, s in config["services"].items() if not s.get("profiles")}


def long_running(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in config["services"].items() if s["restart"] != "no"}


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


def shell_of(check: dict[str, Any]) -> str:
    """The shell text of a CMD-SHELL health check, `$$` (compose's escape) back to `$`."""
    assert check["test"][0] == "CMD-SHELL" and len(check["test"]) == 2, check["test"]
    return check["test"][1].replace("$$", "$")


# ---- the services and what they run ------------------------------------------------------------

def test_compose_runs_every_box_service_of_the_registry_and_nothing_else(compose: dict[str, Any]) -> None:
    """Each registry service on the box has its container (the broker's is Mosquitto), and every
    `mro-edge service NAME` in compose names a registry service; off-box ones only in the demo."""
    by_name = {s.name: s for s in SERVICES}
    served = {
        command[2]: name
        for name, service in compose["services"].items()
        if (command := service.get("command") or [])[:2] == ["mro-edge", "service"] and len(command) == 3
    }
    assert set(served) <= set(by_name), f"compose runs services the registry does not know: {served}"
    assert set(BOX) <= set(served), f"registry services without a container: {set(BOX) - set(served)}"
    for name, container in served.items():
        demo_only = compose["services"][container].get("profiles") == ["demo"]
        assert demo_only == (not by_name[name].on_box), f"{name}: on the box iff outside the demo profile"
    brokers = {s.name for s in SERVICES if s.kind is Kind.BROKER}
    assert brokers and not brokers & set(served), "compose runs Mosquitto, not the embedded broker"
    assert BROKER in compose["services"]

def test_services_are_exactly_the_known_ones(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(COMMANDS) | {BROKER, CERTS} | CENTRAL
    certs = compose["services"][CERTS]
    assert certs["command"][:6] == ["mro-edge", "certs", "init", "--if-missing", "--out", CERTS_DIR]
    assert certs["image"] == compose["services"]["init"]["image"] and certs["restart"] == "no"
    for name, expected in COMMANDS.items():
        service = compose["services"][name]
        assert service["command"] == expected, name
        assert service["image"] == compose["services"]["init"]["image"], "one image for every app service"
        assert service["restart"] == ("no" if name in ONE_SHOT else "unless-stopped"), name
    for name, service in compose["services"].items():
        assert (service.get("profiles") == ["demo"]) == (name in DEMO_ONLY), name


def test_production_starts_no_simulator_and_no_simulator_accounts(
    production: dict[str, Any], tmp_path: Path
) -> None:
    """Without --profile demo: no simulator, no demo gateway, nothing depending on them, and
    the `init` command writes only the services' own login (run here for real)."""
    services = default_services(production)
    assert set(services) == {"init", CERTS, BROKER, *BOX}
    for name, service in services.items():
        assert not set(service.get("depends_on") or {}) & DEMO_ONLY, f"{name} needs a demo-only service"
        assert "simulat" not in " ".join(map(str, service.get("command") or [])), name
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    env.update(services["init"]["environment"], MRO_DATA_DIR=str(tmp_path / "data"))
    for key in ("MRO_CONFIG", "MRO_COMPLIANCE_REGISTRIES_DIR"):
        env[key] = env[key].replace("/site", str(SITE_TEMPLATE))
    result = subprocess.run([sys.executable, "-m", "mro_edge", *services["init"]["command"][1:]],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    broker_dir = tmp_path / "data" / "broker"
    assert not (broker_dir / "simulator-devices.json").exists()
    assert BrokerCredentials(broker_dir, env["MRO_STATION"]).devices() == {}
    for name in SERVICE_NAMES:
        assert (tmp_path / "data" / "secrets" / name / "password").stat().st_mode & 0o077 == 0, name


def test_app_services_read_the_operator_site_never_the_image_registries(production: dict[str, Any]) -> None:
    listener_port = conf_directives()["listener"].split()[0]
    site = (REPO / env_file_values(ENV_EXAMPLE)["MRO_SITE_DIR"]).resolve()
    for name in COMMANDS:
        service = production["services"][name]
        env = service["environment"]
        assert env["MRO_MQTT_URL"] == f"mqtt://{BROKER}:{listener_port}", name
        assert env["MRO_DATA_DIR"] == "/data", name
        assert env["MRO_STATION"] == env_file_values(ENV_EXAMPLE)["MRO_STATION"], name
        assert env["MRO_CONFIG"] == "/site/edge.toml", name
        assert env["MRO_COMPLIANCE_REGISTRIES_DIR"] == "/site/registries", name
        volumes = mounts(service)
        assert Path(volumes["/site"]) == site, name
        assert any(v.endswith("/site:ro") for v in service["volumes"]), (
            f"{name} must mount the site read-only"
        )
        if name in CREDENTIAL_WRITERS:  # they write the password file and ACL Mosquitto reads
            assert volumes["/data/broker"] == mounts(production["services"][BROKER])["/mosquitto/auth"], name
        else:
            assert "/data/broker" not in volumes, name
        assert not any("registries" in source for source in volumes.values()), name
        if name not in ONE_SHOT:
            assert service["depends_on"] == {
                "init": {"condition": "service_completed_successfully"},
                BROKER: {"condition": "service_healthy"},
            }, name


def test_each_stage_holds_only_its_own_hop_key(production: dict[str, Any]) -> None:
    """init makes every stage's hop key (shared/runtime/hopauth.py); a stage's container mounts
    its own private-key volume and no other (the public keys are in the shared data volume)."""
    from shared.runtime.hopauth import CHAIN, HOPKEYS_DIR

    def hop_keys(name: str) -> set[str]:
        return {target.rsplit("/", 1)[1] for target in mounts(production["services"][name])
                if target.startswith(f"/data/{HOPKEYS_DIR}/")}

    assert hop_keys("init") == set(CHAIN)
    for name in production["services"]:
        assert hop_keys(name) == ({name} if name in CHAIN else set()) or name == "init", name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert all(f"/data/{HOPKEYS_DIR}/{stage}" in dockerfile for stage in CHAIN), "volumes start owned by 1883"
def test_each_container_gets_only_its_own_broker_secret(compose: dict[str, Any]) -> None:
    """Every box service mounts its own secret volume (read-only) and nothing of the others',
    and is told its user and password file, never a password; init holds them all, Mosquitto
    only the health check's."""
    services = compose["services"]
    for name in BOX:
        service = services[name]
        secrets = {t: src for t, src in mounts(service).items() if t.startswith("/data/secrets")}
        assert secrets == {f"/data/secrets/{name}": f"secret-{name}"}, (name, secrets)
        assert f"secret-{name}:/data/secrets/{name}:ro" in service["volumes"], name
        env = service["environment"]
        assert env["MRO_MQTT_USERNAME"] == f"mro-{name}", name
        assert env["MRO_MQTT_PASSWORD_FILE"] == f"/data/secrets/{name}/password", name
        assert "MRO_MQTT_PASSWORD" not in env, name
    init = {t: src for t, src in mounts(services["init"]).items() if t.startswith("/data/secrets")}
    assert init == {f"/data/secrets/{n}": f"secret-{n}" for n in SERVICE_NAMES}
    broker = mounts(services[BROKER])
    assert broker["/mosquitto/health"] == "secret-health"
    assert not [src for src in broker.values() if src.startswith("secret-") and src != "secret-health"]
    simulator = {t: src for t, src in mounts(services["simulator"]).items() if t.startswith("/data/secrets")}
    assert simulator == {"/data/secrets/operator": "secret-operator"}


def test_the_site_template_is_what_the_validate_stage_loads() -> None:
    """deploy/site-template, mounted at /site: edge.toml loads, the registries the compose
    environment forces are its registries/ (empty until the operator fills them), never the
    image's example registries."""
    env = {"MRO_CONFIG": str(SITE_TEMPLATE / "edge.toml"),
           "MRO_COMPLIANCE_REGISTRIES_DIR": str(SITE_TEMPLATE / "registries")}
    tomllib.loads((SITE_TEMPLATE / "edge.toml").read_text())
    settings = compliance_settings(load_config(env=env))
    assert settings.registries_dir == SITE_TEMPLATE / "registries"
    entries = read_file_entries(settings.registries_dir)
    assert set(entries) == {"technicians", "aircraft", "tools", "life_limited_parts"}
    assert all(not found for found in entries.values()), "the site template ships no registry entries"
    assert {p.name for p in (SITE_TEMPLATE / "registries").iterdir()} == \
        {f"{name}.toml" for name in entries}, "one template file per registry"
    RegistrySource(settings.registries_dir).load(None)


def test_the_demo_site_is_the_shipped_example(compose: dict[str, Any]) -> None:
    """deploy/demo.env makes config/ the site: its edge.toml and the example registries the
    simulator's records (and the README's sample) refer to."""
    for name in COMMANDS:
        assert Path(mounts(compose["services"][name])["/site"]) == REPO / "config", name
    assert (REPO / "config" / "edge.toml").is_file() and (
        REPO / "config" / "registries" / "technicians.toml"
    ).is_file()


def test_compose_refuses_to_render_without_station_or_gateway(tmp_path: Path) -> None:
    for key in ("MRO_STATION", "MRO_LINK_GATEWAY_URL"):
        values = env_file_values(ENV_EXAMPLE)
        del values[key]
        partial = tmp_path / f"without-{key}.env"
        partial.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        result = render(partial)
        assert result.returncode != 0 and key in result.stderr, (key, result.stderr)


def test_link_services_get_gateway_url_and_token_from_the_env(tmp_path: Path) -> None:
    config = rendered(ENV_EXAMPLE, tmp=tmp_path,
                      extra="MRO_LINK_GATEWAY_URL=https://lake.example.org:8443\nMRO_LINK_TOKEN=tok-from-env")
    for name in LINK:
        env = config["services"][name]["environment"]
        assert env["MRO_LINK_GATEWAY_URL"] == "https://lake.example.org:8443", name
        assert env["MRO_LINK_TOKEN"] == "tok-from-env", name
    # an empty token leaves the services to the token file in the data volume
    assert rendered(ENV_EXAMPLE)["services"]["uplink"]["environment"]["MRO_LINK_TOKEN"] == ""
    for name in set(COMMANDS) - set(LINK):
        assert "MRO_LINK_TOKEN" not in config["services"][name]["environment"], f"{name} needs no token"


def test_demo_link_points_at_the_demo_gateway(compose: dict[str, Any]) -> None:
    urls = {compose["services"][name]["environment"]["MRO_LINK_GATEWAY_URL"] for name in LINK}
    gateway = compose["services"][GATEWAY]
    host, port = gateway["environment"]["MRO_GATEWAY_LISTEN"].rsplit(":", 1)
    assert urls == {f"http://{GATEWAY}:{port}"}
    assert host == "0.0.0.0", "the demo gateway must listen beyond its own container"
    assert gateway["ports"] == [f"127.0.0.1:{port}:{port}/tcp"], "published on the box's loopback only"


def test_demo_gateway_runs_the_service(compose: dict[str, Any]) -> None:
    gateway = compose["services"][GATEWAY]
    assert gateway["command"] == ["mro-edge", "service", "gateway"]
    assert gateway["image"] == compose["services"]["init"]["image"]
    assert gateway["restart"] == "unless-stopped"
    assert mounts(gateway)["/data"] == mounts(compose["services"]["sign"])["/data"]
    assert gateway["environment"]["MRO_DATA_DIR"] == "/data"
    assert not gateway.get("depends_on")


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


# ---- images, logs, ports -------------------------------------------------------------------------

def test_images_are_pinned_to_exact_versions(compose: dict[str, Any]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for name, service in compose["services"].items():
        image = service["image"]
        if name == BROKER:
            assert image == f"mro-edge-mosquitto:{version}", f"{name}: the image of this very version"
        else:
            assert image == f"mro-edge:{version}", f"{name}: the image of this very version"
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    # both stages (build, run) on the one base image, pinned to an exact patch release
    assert [line.split()[1] for line in dockerfile if line.startswith("FROM ")] == [
        "python:3.11.13-slim-bookworm"
    ] * 2
    assert "-c constraints.txt" in "\n".join(dockerfile), "the Dockerfile installs the locked versions"


def test_the_broker_image_is_eclipse_mosquitto_with_the_client_id_plugin(compose: dict[str, Any]) -> None:
    """deploy/mosquitto/Dockerfile: an exact eclipse-mosquitto 2.0.x tag plus the plugin built by
    its Makefile in an Alpine stage, copied to where mosquitto.conf loads it. (The image build
    itself is not run here: no Docker Engine.)"""
    build = compose["services"][BROKER]["build"]
    assert Path(build["context"]) == MOSQUITTO_RUN.parent
    dockerfile = (MOSQUITTO_RUN.parent / "Dockerfile").read_text().splitlines()
    bases = [line.split()[1:] for line in dockerfile if line.startswith("FROM ")]
    assert bases[0][1:] == ["AS", "build"] and re.fullmatch(r"alpine:3\.\d+", bases[0][0]), bases
    assert len(bases) == 2 and re.fullmatch(r"eclipse-mosquitto:2\.0\.\d+", bases[1][0]), "pin an exact 2.0.x tag"
    assert "RUN make -C /src BUILD_DIR=/out" in dockerfile
    directives = conf_directives()
    assert f"COPY --from=build /out/mro_clientid.so {directives['plugin']}" in dockerfile
    assert str(Path(directives["plugin_opt_clientids"]).parent) == "/mosquitto/auth", "written beside passwd and acl"


def test_every_container_rotates_its_logs(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        logging = service.get("logging")
        assert logging and logging["driver"] == "json-file", f"{name} has no rotated log driver"
        assert re.fullmatch(r"\d+[km]", logging["options"]["max-size"]), name
        assert int(logging["options"]["max-file"]) >= 2, name
    raw = (REPO / "compose.yaml").read_text()
    assert raw.count("logging: *logging") + raw.count("<<: *app") >= len(compose["services"]), \
        "one logging anchor for every service"


def test_mosquitto_publishes_only_its_tls_port_where_the_operator_says(
    production: dict[str, Any], compose: dict[str, Any], tmp_path: Path
) -> None:
    """Only 8883 (TLS) leaves the compose network, on loopback until the operator names the LAN
    address; plain 1883 is never published, in production or in the demo."""
    tls_port, plain_port = tls_and_plain_ports()
    assert production["services"][BROKER]["ports"] == [f"127.0.0.1:{tls_port}:{tls_port}/tcp"], "loopback"
    config = rendered(ENV_EXAMPLE, tmp=tmp_path, extra="MRO_MQTT_BIND=10.20.30.40\nMRO_MQTTS_PORT=18883")
    assert config["services"][BROKER]["ports"] == [f"10.20.30.40:18883:{tls_port}/tcp"]
    for rendition in (production, compose, config):
        for name, service in rendition["services"].items():
            published = [str(port).rsplit(":", 1)[-1] for port in service.get("ports", [])]
            assert f"{plain_port}/tcp" not in published, f"{name} publishes plain MQTT ({plain_port})"
    for name, service in production["services"].items():
        for port in service.get("ports", []):
            assert not str(port).startswith(("0.0.0.0", "::")) and str(port).count(":") >= 2, (name, port)


def tls_and_plain_ports() -> tuple[str, str]:
    """mosquitto.conf's TLS listener (the one with a certfile after it) and its plain one."""
    listeners: list[tuple[str, bool]] = []
    for line in MOSQUITTO_CONF.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "listener":
            listeners.append((value.split()[0], False))
        elif key == "certfile":
            listeners[-1] = (listeners[-1][0], True)
    (tls,) = [port for port, secure in listeners if secure]
    (plain,) = [port for port, secure in listeners if not secure]
    return tls, plain


def test_the_certs_service_makes_what_mosquitto_serves(production: dict[str, Any], tmp_path: Path) -> None:
    """The `certs` one-shot, run here for real into the directory Mosquitto mounts: a CA and a
    broker certificate for MRO_MQTT_HOSTNAME and MRO_MQTT_BIND that `openssl verify` accepts, at
    the paths mosquitto.conf names; a second boot keeps them."""
    certs, broker = production["services"][CERTS], production["services"][BROKER]
    assert mounts(certs)[CERTS_DIR] == mounts(broker)["/mosquitto/certs"], "one tls volume for both"
    assert any(str(v).endswith("/mosquitto/certs:ro") for v in broker["volumes"]), "the broker only reads it"
    directives = conf_directives()
    for key in ("certfile", "keyfile", "cafile"):
        assert str(Path(directives[key]).parent) == "/mosquitto/certs", key
    out = tmp_path / "tls"
    command = [a.replace(CERTS_DIR, str(out)) for a in certs["command"][1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    env.update(MRO_DATA_DIR=str(tmp_path / "data"), MRO_STATION="HGR1")
    for _boot in range(2):
        result = subprocess.run([sys.executable, "-m", "mro_edge", *command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        if _boot == 0:
            first = {name: (out / name).read_bytes() for name in ("ca.pem", "broker.pem", "broker.key")}
    assert {name: (out / name).read_bytes() for name in first} == first, "a second boot replaced the certificates"
    files = {key: out / Path(directives[key]).name for key in ("certfile", "keyfile", "cafile")}
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(files["cafile"]), str(files["certfile"])],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(files["certfile"]), "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in names and "IP Address:127.0.0.1" in names, names
    assert files["keyfile"].stat().st_mode & 0o077 == 0


def test_mosquitto_runs_the_config_the_tests_run(compose: dict[str, Any]) -> None:
    broker = compose["services"][BROKER]
    volumes = mounts(broker)
    assert Path(volumes["/mosquitto/config/mosquitto.conf"]) == MOSQUITTO_CONF
    assert Path(volumes["/mro"]) == MOSQUITTO_RUN.parent
    assert broker["command"] == ["/bin/sh", f"/mro/{MOSQUITTO_RUN.name}"]
    assert broker["healthcheck"]["test"] == ["CMD", "/bin/sh", f"/mro/{MOSQUITTO_HEALTH.name}"]
    directives = conf_directives()
    assert directives["allow_anonymous"] == "false"
    for key in ("password_file", "acl_file"):
        assert str(Path(directives[key]).parent) in volumes, (
            f"{key} {directives[key]} is not in a mounted volume"
        )
        assert str(Path(directives[key]).parent) == "/mosquitto/auth", (
            "deploy/mosquitto/*.sh watch /mosquitto/auth"
        )
    assert directives["persistence"] == "true"
    assert directives["persistence_location"].rstrip("/") in volumes
    assert directives["listener"].split()[0] == "1883", "deploy/mosquitto/healthcheck.sh probes 1883"
    assert broker["depends_on"] == {"init": {"condition": "service_completed_successfully"},
                                    CERTS: {"condition": "service_completed_successfully"}}


def test_broker_and_app_share_the_file_owner(compose: dict[str, Any]) -> None:
    """Mosquitto must read the 0600 credential files the app writes: same uid in both images."""
    assert compose["services"][BROKER]["user"] == f"{SERVICE_UID}:{SERVICE_UID}"
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users == [f"{SERVICE_UID}:{SERVICE_UID}"]


# ---- health checks: cheap, and a failing one restarts the container ------------------------------

def test_health_checks_are_cheap_and_under_an_init(compose: dict[str, Any]) -> None:
    app_checks = set()
    for name, service in long_running(compose).items():
        assert service["init"] is True, f"{name}: the service must not be PID 1 (a health check kills it)"
        assert service["restart"] == "unless-stopped", name
        check = service["healthcheck"]
        if name == BROKER:
            continue
        text = shell_of(check)
        assert not re.search(r"\b(python|mro-edge)\b", text), f"{name}: no Python process per check"
        app_checks.add(text)
        env = service["environment"]
        assert env["MRO_SUPERVISOR_PID"] == "1" and env["MRO_WATCHDOG_FILE"].startswith("/tmp/"), name
        assert "/tmp" in service["tmpfs"], f"{name}: the watchdog file's once-a-second mtime goes to a tmpfs"
        assert int(env["MRO_WATCHDOG_STALE_S"]) >= 30, (
            f"{name}: not stricter than mro-edge run's hung_after_s"
        )
    assert len(app_checks) == 1, "one health check for every app service"
    assert "tmpfs" in compose["services"][BROKER] and "/tmp" in compose["services"][BROKER]["tmpfs"]


def _in_container(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`command` under tini as PID 1 of a new PID (and mount, for /proc) namespace: the process
    layout `init: true` gives a container."""
    unshare = need_tool("unshare")
    tini = need_tool("tini")
    with open(log, "ab") as out:
        return subprocess.Popen([unshare, "--pid", "--fork", "--mount-proc", tini, "--", *command],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def _container_init(outer: subprocess.Popen[bytes], timeout: float = 10) -> psutil.Process:
    """The namespace's PID 1 (tini), seen from here, once it runs its child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(outer.pid).children():
            if child.name() == "tini" and child.children():
                return child
        time.sleep(0.05)
    raise AssertionError("tini did not start its child in the new PID namespace")


def _exec(
    init: psutil.Process, command: list[str], env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`docker exec`: run `command` inside the namespace of `init`, never outside it."""
    nsenter = need_tool("nsenter")
    inside = subprocess.run([nsenter, "-t", str(init.pid), "-p", "-m", "--", "readlink", "/proc/self/ns/pid"],
                            capture_output=True, text=True, timeout=10)
    assert inside.returncode == 0 and inside.stdout.strip() != os.readlink("/proc/self/ns/pid"), \
        f"not inside the test's PID namespace: {inside}"
    return subprocess.run([nsenter, "-t", str(init.pid), "-p", "-m", "--", *command],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _end(outer: subprocess.Popen[bytes]) -> None:
    if outer.poll() is None:
        for proc in psutil.Process(outer.pid).children(recursive=True):
            proc.kill()
        outer.kill()
        outer.wait(10)


def test_app_health_check_passes_then_kills_a_hung_service(compose: dict[str, Any], tmp_path: Path) -> None:
    """A real service (`mro-edge service broker`) pings its watchdog: the compose health check
    passes. SIGSTOP it: the check fails, kills it, and the container's init exits (docker then
    restarts the container under `restart: unless-stopped`)."""
    service = compose["services"]["ingest"]
    stale_s = 3  # compose says 60; the same check with a shorter limit, to keep the test short
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    env.update(
        {
            k: v
            for k, v in service["environment"].items()
            if k.startswith("MRO_WATCHDOG") or k == "MRO_SUPERVISOR_PID"
        },
        MRO_WATCHDOG_FILE=str(tmp_path / "mro-watchdog"),
        MRO_WATCHDOG_STALE_S=str(stale_s),
        MRO_DATA_DIR=str(tmp_path / "data"),
        MRO_MQTT_URL=f"mqtt://127.0.0.1:{free_port()}",
        MRO_STATION="HGR1",
    )
    check = ["sh", "-c", shell_of(service["healthcheck"])]
    outer = _in_container(
        [sys.executable, "-m", "mro_edge", "service", "broker"], env, tmp_path / "service.log"
    )
    try:
        init = _container_init(outer)
        deadline = time.monotonic() + 30
        while not (tmp_path / "mro-watchdog").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        healthy = _exec(init, check, env)
        assert healthy.returncode == 0, (healthy, (tmp_path / "service.log").read_text()[-2000:])
        time.sleep(stale_s + 1)
        again = _exec(init, check, env)
        assert again.returncode == 0, "a running service keeps its watchdog fresh"
        (child,) = init.children()
        child.send_signal(signal.SIGSTOP)
        time.sleep(stale_s + 1.5)
        hung = _exec(init, check, env)
        # 1, or killed itself when PID 1 exits first (the kernel ends the whole namespace)
        assert hung.returncode in (1, -signal.SIGKILL) and "killing the service" in hung.stdout, hung
        assert outer.wait(10) == 128 + signal.SIGKILL, "tini ends with its killed child: the container exits"
    finally:
        _end(outer)


def _busybox_path(tmp_path: Path) -> str:
    """A PATH where the shell tools are busybox applets, as in the eclipse-mosquitto image."""
    busybox = need_tool("busybox")
    bin_dir = tmp_path / "busybox-bin"
    bin_dir.mkdir()
    for applet in BUSYBOX_APPLETS:
        (bin_dir / applet).symlink_to(busybox)
    for tool in ("mosquitto", "mosquitto_sub"):
        (bin_dir / tool).symlink_to(mosquitto_binary() if tool == "mosquitto" else need_tool(tool))
    return str(bin_dir)


def _until(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise AssertionError(f"not within {timeout} s: {what}\n{tail}")


def test_mosquitto_follows_device_changes_and_its_health_check_restarts_it(tmp_path: Path) -> None:
    """deploy/mosquitto/run.sh and healthcheck.sh under busybox, tini as PID 1, the shipped
    mosquitto.conf: a device added or removed takes effect without a SIGHUP by hand, a SIGHUP
    to the container is passed on, and a broker that stops answering is killed by the third
    failed check, which ends the container."""
    port = free_port()
    credentials = BrokerCredentials(tmp_path / "broker", "HGR1")
    credentials.ensure_service_users()
    service = credentials.service_login("health")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    env.update(PATH=_busybox_path(tmp_path), MOSQUITTO_CONF=str(render_mosquitto_conf(tmp_path, port)),
               MRO_AUTH_DIR=str(tmp_path / "broker"), MOSQUITTO_PORT=str(port), TMPDIR=str(tmp_path),
               MRO_HEALTH_SECRET=str(credentials.secret_path("health")))
    log = tmp_path / "mosquitto.log"
    outer = _in_container(["sh", str(MOSQUITTO_RUN)], env, log)
    health = ["sh", str(MOSQUITTO_HEALTH)]
    try:
        init = _container_init(outer)

        def code(user: str, password: str) -> int | None:
            try:
                return mqtt_connack(port, user, password)
            except OSError:
                return None

        _until(lambda: code(*service) == 0, 10, "mosquitto up", log)
        assert _exec(init, health, env).returncode == 0
        device = credentials.add_device("TQW-01", "torque_wrench")
        _until(lambda: code(*device) == 0, 5, "a device added after the start logs in")
        credentials.remove_device("TQW-01")
        _until(lambda: code(*device) not in (0, None), 5, "a removed device is refused")
        other = credentials.add_device("TQW-02", "torque_wrench")
        _until(lambda: code(*other) == 0, 5, "a second change is seen too")

        (shell,) = init.children()
        (broker,) = [p for p in shell.children() if p.name() == "mosquitto"]
        reloads = log.read_text().count("Reloading config")
        init.send_signal(signal.SIGHUP)  # docker compose kill -s SIGHUP mosquitto
        _until(
            lambda: log.read_text().count("Reloading config") > reloads, 5, "SIGHUP passed on to mosquitto"
        )
        assert broker.is_running() and code(*service) == 0

        broker.send_signal(signal.SIGSTOP)  # alive, but answers nothing
        for attempt in (1, 2):
            result = _exec(init, health, env)
            assert result.returncode == 1 and outer.poll() is None, (attempt, result)
        result = _exec(init, health, env)
        # 1, or killed itself when PID 1 exits first (the kernel ends the whole namespace)
        assert result.returncode in (1, -signal.SIGKILL) and "killing it" in result.stdout, result
        assert outer.wait(10) == 128 + signal.SIGKILL, "the container exits, so docker restarts it"
    finally:
        _end(outer)


def test_mosquitto_launcher_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`docker compose stop`: SIGTERM to the container reaches Mosquitto, which saves and exits 0."""
    port = free_port()
    credentials = BrokerCredentials(tmp_path / "broker", "HGR1")
    credentials.ensure_service_users()
    service = credentials.service_login("health")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    env.update(PATH=_busybox_path(tmp_path), MOSQUITTO_CONF=str(render_mosquitto_conf(tmp_path, port)),
               MRO_AUTH_DIR=str(tmp_path / "broker"), TMPDIR=str(tmp_path))
    log = tmp_path / "mosquitto.log"
    outer = _in_container(["sh", str(MOSQUITTO_RUN)], env, log)
    try:
        init = _container_init(outer)

        def up() -> bool:
            try:
                return mqtt_connack(port, *service) == 0
            except OSError:
                return False

        _until(up, 10, "mosquitto up", log)
        init.send_signal(signal.SIGTERM)
        assert outer.wait(15) == 0, log.read_text()[-2000:]
        assert (tmp_path / "mosquitto" / "mosquitto.db").exists(), "persistence saved on the way out"
    finally:
        _end(outer)


# ---- the README's compose instructions name what ships -------------------------------------------

def test_readme_compose_instructions_name_what_ships(production: dict[str, Any]) -> None:
    from tests import readme

    first_boot = readme.section("First boot of an edge box")
    text = first_boot + readme.block_with("Switching to Mosquitto", "docker compose")
    for path in set(re.findall(r"\b((?:deploy|config)/[\w./-]*\w)", text)):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    services = default_services(production)
    named = re.findall(r"docker compose (?:exec|kill -s SIGHUP|run --rm) ([a-z-]+)", text)
    for listed in re.findall(r"docker compose up -d ([a-z -]+?)(?:`|\s*#|$)", text, flags=re.M):
        named += listed.split()
    assert "uplink" in named and "init" in named
    for service in named:
        assert service in services, f"README runs `{service}`, not a production service"
    settings = env_file_values(ENV_EXAMPLE)
    for variable in set(re.findall(r"`(MRO_[A-Z_]+)", first_boot)) - {"MRO_COMPLIANCE_REGISTRIES_DIR"}:
        assert variable in settings, f"README tells to set {variable}, which deploy/env.example lacks"
    assert "docker compose kill -s SIGHUP mosquitto" in text
    assert "--env-file deploy/demo.env --profile demo" in text
