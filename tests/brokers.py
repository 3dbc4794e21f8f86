"""Real brokers for tests: the embedded broker and Mosquitto, each in its own process.

Both read the same password and ACL files (services.broker.credentials.BrokerCredentials under
`<data_dir>/broker/`). Mosquitto runs the production config/mosquitto/mosquitto.conf with only
the listener ports and the file paths rewritten, so the tests exercise what compose ships.
With a BrokerTls, both also listen for MQTT over TLS (`url` is then mqtts://).
A test can SIGTERM, kill -9 and restart a broker on the same port with the same files.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.broker.credentials import BrokerCredentials, reload_mosquitto
from shared.runtime.hopauth import ensure_hop_keys
from shared.runtime.mqtt import mqtt_connack

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF = REPO / "config" / "mosquitto" / "mosquitto.conf"
PLUGIN_DIR = REPO / "deploy" / "mosquitto" / "plugin"
KINDS = ("embedded", "mosquitto")


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str:
    """Path of `mosquitto`; raises (never skips) when it is not installed."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    if os.environ.get("CI"):
        raise RuntimeError("mosquitto is required in CI: add the Debian package `mosquitto` to the image")
    raise RuntimeError("mosquitto is not installed; install it with `apt-get install mosquitto`")


def mosquitto_plugin() -> Path:
    """deploy/mosquitto/plugin/mro_clientid.so, built with its Makefile into a directory named by
    the source's hash under the temp dir (never into the source tree), once per source version;
    a lock keeps parallel test sessions from building it at the same time."""
    source = PLUGIN_DIR / "mro_clientid.c"
    digest = hashlib.sha256(source.read_bytes() + (PLUGIN_DIR / "Makefile").read_bytes()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / f"mro-edge-mosquitto-plugin-{os.getuid()}" / digest
    built = build / "mro_clientid.so"
    if built.exists():
        return built
    build.mkdir(parents=True, exist_ok=True)
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            done = subprocess.run(["make", "-s", "-C", str(PLUGIN_DIR), f"BUILD_DIR={build}"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building the Mosquitto plugin failed (needs gcc, make and the Debian "
                                   f"packages mosquitto-dev libmosquitto-dev; scripts/ensure-tools installs "
                                   f"them):\n{done.stdout}{done.stderr}")
    return built


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener for a test broker, on loopback beside the plain one. `dir` is a CA directory
    of shared.runtime.pki (ca.pem, broker.pem, broker.key); `cert`/`key` replace the broker's
    certificate; `client_ca` set requires client certificates signed by it."""

    dir: Path
    port: int = field(default_factory=lambda: free_port())
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.cert or self.dir / "broker.pem"

    @property
    def key_file(self) -> Path:
        return self.key or self.dir / "broker.key"


# The TLS listener's lines in mosquitto.conf, rewritten for a BrokerTls or dropped without one.
TLS_DIRECTIVES = ("certfile", "keyfile", "cafile", "require_certificate")


def render_mosquitto_conf(data_dir: Path, port: int, tls: BrokerTls | None = None) -> Path:
    """config/mosquitto/mosquitto.conf with the ports and the container paths rewritten.

    The plain listener moves to 127.0.0.1:`port`; the TLS listener to 127.0.0.1:`tls.port` with
    `tls`'s files, or is left out without `tls` (its certificate files would not exist).
    password_file / acl_file / plugin_opt_clientids point into `<data_dir>/broker/`, the plugin
    at the one `mosquitto_plugin()` built, persistence into
    `<data_dir>/mosquitto/`. When the tests run as root, `user root` is added: Mosquitto
    started as root would otherwise switch to the `mosquitto` account, which cannot read the
    0600 files; in compose the container already runs as the files' owner, so no switch happens.
    """
    broker_dir = data_dir / "broker"
    persistence = data_dir / "mosquitto"
    persistence.mkdir(parents=True, exist_ok=True)
    tls_lines: dict[str, str | None] = dict.fromkeys(TLS_DIRECTIVES)
    if tls is not None:
        tls_lines = {"certfile": f"certfile {tls.cert_file}", "keyfile": f"keyfile {tls.key_file}",
                     "cafile": f"cafile {tls.client_ca or tls.ca_file}",
                     "require_certificate": f"require_certificate {'true' if tls.client_ca else 'false'}"}
    rewrites: dict[str, str | None] = {
        "password_file": None,
        "acl_file": None,
        "plugin_opt_clientids": None,
        "plugin": f"plugin {mosquitto_plugin()}",
        "persistence_location": f"persistence_location {persistence}/",
    }
    listeners = [f"listener {port} 127.0.0.1", f"listener {tls.port} 127.0.0.1" if tls else ""]
    seen: list[str] = []
    lines = []
    for line in MOSQUITTO_CONF.read_text().splitlines():
        key, _, value = line.partition(" ")
        if line.startswith("#") or not key:
            lines.append(line)
            continue
        if key == "listener":
            if len(listeners) == sum(k == "listener" for k in seen):
                raise AssertionError(f"{MOSQUITTO_CONF}: more than two listeners; tests/brokers.py expects "
                                     "the plain one, then the TLS one")
            line = listeners[sum(k == "listener" for k in seen)]
        elif key in TLS_DIRECTIVES:
            line = tls_lines[key] or ""
        elif key in rewrites:
            if key in seen:
                raise AssertionError(f"{MOSQUITTO_CONF}: {key} appears twice; the test rewrite expects one")
            line = rewrites[key] or f"{key} {broker_dir / Path(value.strip()).name}"
        seen.append(key)
        if line:
            lines.append(line)
    missing = (set(rewrites) | set(TLS_DIRECTIVES)) - set(seen)
    if missing or seen.count("listener") != 2:
        raise AssertionError(f"{MOSQUITTO_CONF} lacks {sorted(missing) or 'its two listeners'}; "
                             "tests/brokers.py rewrites them")
    if os.geteuid() == 0:
        lines.append("user root")
    conf = data_dir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


class BrokerProc:
    """One real broker process (`kind` "embedded" or "mosquitto") on a fixed port and data dir."""

    def __init__(self, kind: str, data_dir: Path, station: str = "HGR1", port: int | None = None,
                 tls: BrokerTls | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"broker kind {kind!r} must be one of {KINDS}")
        self.kind = kind
        self.data_dir = Path(data_dir)
        self.station = station
        self.port = port or free_port()  # the plain listener (with `tls`: beside it, on loopback)
        self.tls = tls
        self.url = f"mqtts://127.0.0.1:{tls.port}" if tls else f"mqtt://127.0.0.1:{self.port}"
        self.credentials = BrokerCredentials(self.data_dir / "broker", station)
        self.credentials.ensure_service_users()
        # the operator's login: reads status, alarms, DLQ and receipts; sends commands
        self.service_user = self.credentials.service_login("operator")
        ensure_hop_keys(self.data_dir)  # as `mro-edge run` / `devices init` do before any stage starts
        self.log_path = self.data_dir / f"{kind}.log"
        self.pid_file = self.data_dir / f"{kind}.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if self.kind == "mosquitto":
            return [mosquitto_binary(), "-c", str(render_mosquitto_conf(self.data_dir, self.port, self.tls))], env
        env.update(MRO_MQTT_URL=self.url, MRO_DATA_DIR=str(self.data_dir), MRO_STATION=self.station)
        if self.tls:
            env.update(MRO_BROKER_TLS_CERT_FILE=str(self.tls.cert_file), MRO_BROKER_TLS_KEY_FILE=str(self.tls.key_file),
                       MRO_BROKER_PLAIN_LISTEN=f"127.0.0.1:{self.port}")
            if self.tls.client_ca:
                env.update(MRO_BROKER_TLS_CLIENT_CA_FILE=str(self.tls.client_ca))
        return [sys.executable, "-m", "services.broker"], env

    @property
    def client_env(self) -> dict[str, str]:
        """What a client of this broker sets: its URL and, with TLS, the CA to verify it by."""
        env = {"MRO_MQTT_URL": self.url}
        if self.tls:
            env["MRO_MQTT_CA_FILE"] = str(self.tls.ca_file)
        return env

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.kind} broker on port {self.port} is already running")
        command, env = self._command()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.pid_file.write_text(f"{self._proc.pid}\n")
        self.wait_ready()

    def login(self, service: str) -> tuple[str, str]:
        """One service's own broker login (user, password)."""
        return self.credentials.service_login(service)

    def client_id(self, client: str) -> str:
        """The client id the service connection `client` uses (mro-<station>-<client>-<tag>)."""
        from services.broker.credentials import CLIENT_OWNERS, service_client_id

        return service_client_id(self.station, client, self.login(CLIENT_OWNERS[client])[1])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def wait_ready(self, timeout: float = 10) -> None:
        """Until the broker accepts the operator's login (TCP connect and CONNACK 0)."""
        deadline = time.monotonic() + timeout
        last: Exception | str = "no attempt"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} broker exited early:\n{self.log_tail()}")
            try:
                code = mqtt_connack(self.port, *self.service_user)
                if code == 0:
                    return
                last = f"CONNACK return code {code}"
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{self.kind} broker on port {self.port} not ready after {timeout}s ({last}):\n"
                           f"{self.log_tail()}")

    def reload(self) -> None:
        """Make the broker pick up changed password/ACL files (the embedded broker notices by itself)."""
        if self.kind == "mosquitto" and not reload_mosquitto(self.pid_file):
            raise RuntimeError(f"could not SIGHUP mosquitto (pid file {self.pid_file})")

    def stop(self) -> None:
        """SIGTERM and wait (Mosquitto saves its database on the way out)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no final save."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Start again on the same port with the same files (after stop or kill, or stop first)."""
        if self.running:
            self.stop()
        self.start()

    def _end(self, signum: int) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signum)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                raise RuntimeError(f"{self.kind} broker ignored signal {signum}:\n"
                                   f"{self.log_tail()}") from None
        self._proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __repr__(self) -> str:
        return f"BrokerProc({self.kind!r}, port={self.port}, data_dir={str(self.data_dir)!r})"


def start_broker(kind: str, data_dir: Path, station: str = "HGR1", tls: BrokerTls | None = None) -> BrokerProc:
    """A started broker of `kind` with every service's user, on a free port, files in `data_dir`;
    with `tls`, its TLS listener too (and `url` is that listener's mqtts:// URL)."""
    broker = BrokerProc(kind, data_dir, station, tls=tls)
    broker.start()
    return broker
