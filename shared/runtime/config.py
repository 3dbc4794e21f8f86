"""One config loader: `config/edge.toml` (or $MRO_CONFIG), then `MRO_<SECTION>_<KEY>` overrides."""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

# The shipped edge.toml is package data of `mro_edge_config` (pyproject.toml installs the
# repository's config/ directory under that name, with the example registries beside it): the
# working tree's file in an editable install, the copy in site-packages after `pip install .`,
# whatever the current directory.
DEFAULT_CONFIG = Path(str(resources.files("mro_edge_config").joinpath("edge.toml")))


class MqttConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: str = ""
    keepalive_s: int = 30

    @property
    def host(self) -> str:
        return _split_url(self.url)[0]

    @property
    def port(self) -> int:
        return _split_url(self.url)[1]


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True):
    max_message_bytes: int = 65536
    max_depth: int = 16
    clock_skew_s: int = 300
    max_backdate_days: int = 30
    max_raw_in_report: int = 65536


class StageConfig(msgspec.Struct, forbid_unknown_fields=True):
    batch_max: int = 1000
    batch_wait_ms: int = 2
    outbox_batch: int = 250
    redeliver_after_s: float = 15.0
    max_in_flight: int = 2000
    status_interval_s: float = 2.0
    map_size_mb: int = 64
    map_max_mb: int = 4096
    ledger_map_max_mb: int = 65536
    spool_map_max_mb: int = 4096

    def map_max(self, store: str) -> int:
        """The cap (MiB) of one store class: the ledger (sign's store), the broker's intake
        spool, or any other stage's store."""
        return {"sign": self.ledger_map_max_mb, "spool": self.spool_map_max_mb}.get(store, self.map_max_mb)


class LinkConfig(msgspec.Struct, forbid_unknown_fields=True):
    # empty: the local reference gateway at `gateway.listen` (resolved by load_config)
    gateway_url: str = ""
    token: str = ""
    probe_interval_s: float = 5.0
    slow_probe_ms: int = 2000
    isolate_after: int = 3
    state_refresh_s: float = 60.0
    degraded_alarm_s: float = 60.0


class UplinkConfig(msgspec.Struct, forbid_unknown_fields=True):
    batch: int = 2000
    request_timeout_s: float = 10.0
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    retry_attempts: int = 3


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True):
    db_url: str = ""
    listen: str = "127.0.0.1:8443"
    duplicate_window_days: int = 30
    key_dir: str = ""
    cosigner_name: str = "mro-gateway"


class SupervisorConfig(msgspec.Struct, forbid_unknown_fields=True):
    hung_after_s: float = 30.0
    console_interval_s: float = 5.0
    log_max_mb: float = 20.0
    log_backups: int = 5


class LedgerConfig(msgspec.Struct, forbid_unknown_fields=True):
    checkpoint_interval_s: float = 300.0
    checkpoint_min_interval_s: float = 5.0


class ComplianceConfig(msgspec.Struct, forbid_unknown_fields=True):
    registries_dir: str = ""
    authority_public_key: str = ""
    schema_tolerance: float = 0.02
    dry_run_sample: int = 10000
    registry_check_s: float = 1.0


class Config(msgspec.Struct, forbid_unknown_fields=True):
    station: str = "HGR1"
    data_dir: str = "./var"
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    stage: StageConfig = msgspec.field(default_factory=StageConfig)
    link: LinkConfig = msgspec.field(default_factory=LinkConfig)
    uplink: UplinkConfig = msgspec.field(default_factory=UplinkConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    compliance: ComplianceConfig = msgspec.field(default_factory=ComplianceConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.data_path / stage

    @property
    def gateway_db_url(self) -> str:
        """The reference gateway's database; empty setting: SQLite under the data directory."""
        if self.gateway.db_url:
            return self.gateway.db_url
        path = self.data_path.resolve() / "gateway"
        path.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path / 'gateway.db'}"

    @property
    def origin(self) -> str:
        """The ledger's origin line (C2SP checkpoint origin); one ledger per station."""
        return f"mro-edge/{self.station}"


class ConfigError(Exception):
    """A setting is missing, misspelt or of the wrong type; the message names it."""


def _split_url(url: str) -> tuple[str, int]:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("mqtt", "tcp"):
        raise ConfigError(f"MRO_MQTT_URL {url!r} must look like mqtt://HOST:PORT")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"MRO_MQTT_URL {url!r} must look like mqtt://HOST:PORT")
    return host, int(port)


def _apply_env(raw: dict[str, Any], env: dict[str, str]) -> None:
    """Overlay MRO_<KEY> / MRO_<SECTION>_<KEY>; values are strings converted by msgspec (strict=False)."""
    sections = {"mqtt": MqttConfig, "limits": LimitsConfig, "stage": StageConfig, "link": LinkConfig,
                "uplink": UplinkConfig, "gateway": GatewayConfig, "compliance": ComplianceConfig,
                "ledger": LedgerConfig, "supervisor": SupervisorConfig}
    for key in ("station", "data_dir"):
        if (value := env.get(f"MRO_{key.upper()}")) is not None:
            raw[key] = value
    for section, struct in sections.items():
        for key in struct.__struct_fields__:
            if (value := env.get(f"MRO_{section.upper()}_{key.upper()}")) is not None:
                raw.setdefault(section, {})[key] = value


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    path = Path(path or env.get("MRO_CONFIG") or DEFAULT_CONFIG)
    raw: dict[str, Any] = {}
    if path.exists():
        with path.open("rb") as f:
            raw = tomllib.load(f)
    elif "MRO_CONFIG" in env:
        raise ConfigError(f"config file {path} (MRO_CONFIG) does not exist")
    _apply_env(raw, env)
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}; see the comments in config/edge.toml") from None
    _split_url(config.mqtt.url)
    if config.mqtt.password and not config.mqtt.username:
        raise ConfigError("MRO_MQTT_PASSWORD (mqtt.password) is set but MRO_MQTT_USERNAME (mqtt.username) "
                          "is not: set both, or neither to use the service login in "
                          "$MRO_DATA_DIR/broker/service.secret")
    if not config.link.gateway_url:
        config.link.gateway_url = local_gateway_url(config.gateway.listen)
    return config


def local_gateway_url(listen: str) -> str:
    """The URL of a gateway listening on `listen` (host:port); a wildcard host is reached on loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
