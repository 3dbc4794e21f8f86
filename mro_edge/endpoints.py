"""Where the running stack is: `mro-edge run` writes `$MRO_DATA_DIR/run.json`, the other commands
read it, so `mro-edge status` finds a broker on another port without MRO_MQTT_URL repeated.

Precedence for the client commands: MRO_* environment variables, then run.json, then the
config file. run.json holds addresses and where the service login is kept, never a secret.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from services.broker.credentials import service_user
from shared.runtime.clock import utc_now
from shared.runtime.config import Config
from shared.runtime.files import write_atomic

RUN_FILE = "run.json"
# run.json key -> (environment variable that overrides it, setter)
_FIELDS = {
    "mqtt_url": ("MRO_MQTT_URL", lambda c, v: setattr(c.mqtt, "url", v)),
    # mqtts://: the files a client needs to verify the broker (and to present, if it wants one)
    "mqtt_ca_file": ("MRO_MQTT_CA_FILE", lambda c, v: setattr(c.mqtt, "ca_file", v)),
    "mqtt_cert_file": ("MRO_MQTT_CERT_FILE", lambda c, v: setattr(c.mqtt, "cert_file", v)),
    "mqtt_key_file": ("MRO_MQTT_KEY_FILE", lambda c, v: setattr(c.mqtt, "key_file", v)),
    "gateway_url": ("MRO_LINK_GATEWAY_URL", lambda c, v: setattr(c.link, "gateway_url", v)),
    "station": ("MRO_STATION", lambda c, v: setattr(c, "station", v)),
}


class NoDataDir(Exception):
    """The data directory does not exist; the message says where we looked."""


def run_file(config: Config) -> Path:
    return config.data_path / RUN_FILE


def write_run_file(config: Config, **extra) -> Path:
    record = {
        "pid": os.getpid(),
        "started_at": utc_now(),
        "station": config.station,
        "data_dir": str(config.data_path.resolve()),
        "mqtt_url": config.mqtt.url,
        **{f"mqtt_{name}": str(Path(path).resolve()) for name in ("ca_file", "cert_file", "key_file")
           if (path := getattr(config.mqtt, name))},
        "gateway_url": config.link.gateway_url,
        "mqtt_username": config.mqtt.username or service_user("operator"),
        "service_secret": None if config.mqtt.username else str(service_secret_path(config)),
        **extra,
    }
    path = run_file(config)
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def mark_stopped(config: Config) -> None:
    record = read_run_file(config)
    if record is not None and record.get("pid") == os.getpid():
        record["stopped_at"] = utc_now()
        write_atomic(run_file(config), (json.dumps(record, indent=2) + "\n").encode())


def read_run_file(config: Config) -> dict | None:
    try:
        record = json.loads(run_file(config).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def apply_run_file(config: Config, env: Mapping[str, str] | None = None) -> dict | None:
    """Take the running stack's endpoints into `config` where no MRO_* variable says otherwise."""
    environ = os.environ if env is None else env
    record = read_run_file(config)
    if record is None:
        return None
    for key, (variable, setter) in _FIELDS.items():
        if variable not in environ and record.get(key):
            setter(config, record[key])
    return record


def service_secret_path(config: Config, service: str = "operator") -> Path:
    """The file holding one service's broker password (BrokerCredentials.secret_path)."""
    return config.data_path.resolve() / "secrets" / service / "password"


def require_data_dir(config: Config, env: Mapping[str, str] | None = None) -> None:
    environ = os.environ if env is None else env
    path = config.data_path
    if path.is_dir():
        return
    if "MRO_DATA_DIR" in environ:
        source = "MRO_DATA_DIR"
    else:
        source = f"data_dir in {environ.get('MRO_CONFIG') or 'config/edge.toml'}"
    raise NoDataDir(
        f"no data directory at {path.resolve()} ({source} = {config.data_dir!r}, relative to {Path.cwd()}); "
        "nothing was created. Run this from where `mro-edge run` runs, "
        "or set MRO_DATA_DIR to its data directory"
    )


def client_login(config: Config, record: dict | None) -> None:
    """The operator's login for a client command, without ever creating one: MRO_MQTT_USERNAME and
    MRO_MQTT_PASSWORD(_FILE), else the file `mro-edge run` / `devices init` keeps. Sets `config.mqtt`."""
    if config.mqtt.username:
        if config.mqtt.password_file:
            try:
                config.mqtt.password = Path(config.mqtt.password_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError):
                raise NoDataDir(f"cannot read the password file {config.mqtt.password_file} "
                                "(MRO_MQTT_PASSWORD_FILE)") from None
        return
    secret = service_secret_path(config)
    try:
        password = secret.read_text().strip()
    except FileNotFoundError:
        password = ""
    if password:
        config.mqtt.username, config.mqtt.password = service_user("operator"), password
        return
    if record and record.get("mqtt_username") and not record.get("service_secret"):
        raise NoDataDir(f"the stack in {config.data_path.resolve()} logs in to its broker as "
                        f"{record['mqtt_username']!r} (MRO_MQTT_USERNAME): set MRO_MQTT_USERNAME and "
                        "MRO_MQTT_PASSWORD for this command too")
    raise NoDataDir(
        f"no service login in {secret} (has `mro-edge run` or `mro-edge devices init` run with this "
        "data directory?): set MRO_MQTT_USERNAME and MRO_MQTT_PASSWORD, or MRO_DATA_DIR"
    )
