"""One config loader: `config/edge.toml` (or $MRO_CONFIG), then `MRO_<SECTION>_<KEY>` overrides."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from shared.runtime.topics import STATION_PATTERN

# The shipped edge.toml is package data of `mro_edge_config` (pyproject.toml installs the
# repository's config/ directory under that name, with the example registries beside it): the
# working tree's file in an editable install, the copy in site-packages after `pip install .`,
# whatever the current directory.
DEFAULT_CONFIG = Path(str(resources.files("mro_edge_config").joinpath("edge.toml")))


class MqttConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: str = ""
    # a file holding the password (first line), e.g. a container's own secret; wins over `password`
    password_file: str = ""
    keepalive_s: int = 30
    # mqtts:// only: the CA that signed the broker's certificate (empty: the system's trust
    # store), and this client's certificate and key for brokers that require one (mutual TLS)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def host(self) -> str:
        return _split_url(self.url)[0]

    @property
    def port(self) -> int:
        return _split_url(self.url)[1]

    @property
    def tls(self) -> bool:
        """mqtts://: TLS with the broker's certificate and host name verified."""
        return self.url.partition("://")[0] == "mqtts"


class BrokerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The embedded broker's listeners (Mosquitto has its own mosquitto.conf)."""

    # where it listens; empty: mqtt.url's host and port (TLS when that is mqtts://)
    listen: str = ""
    # mqtts:// only: the broker's certificate chain and key (`mro-edge certs init` writes both)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # non-empty: every client must also present a certificate signed by this CA (passwords
    # are still required)
    tls_client_ca_file: str = ""
    # mqtts:// only: a plain listener beside TLS, loopback addresses only; empty: none
    plain_listen: str = ""


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True):
    max_message_bytes: int = 65536
    max_depth: int = 16
    clock_skew_s: int = 300
    max_backdate_days: int = 30
    max_raw_in_report: int = 4096
    device_rate_per_s: float = 50.0
    device_burst: int = 2000
    read_window_s: float = 5.0
    max_unassigned_reads: int = 10000


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
    dlq_budget_kb: int = 65536

    def map_max(self, store: str) -> int:
        """The cap (MiB) of one store class: the ledger (sign's store), the broker's intake
        spool, or any other stage's store."""
        return {"sign": self.ledger_map_max_mb, "spool": self.spool_map_max_mb}.get(store, self.map_max_mb)


GIB = 1 << 30
STORAGE_CLASSES = ("ledger", "intake", "dlq", "logs")


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One byte budget for the data directory, split by class (`shared.runtime.budget`)."""

    # 24 GiB: a 32 GB card keeps room for the OS, a backup copy in progress and the filesystem's own
    budget_bytes: int = 24 * GIB
    # shares of the budget per class; what is left (keys, broker files, the local gateway) is unshared
    ledger_share: float = 0.55
    intake_share: float = 0.25
    dlq_share: float = 0.05
    logs_share: float = 0.05
    # alarms when the data directory's use crosses these percentages of the budget (once per crossing)
    warn_percent: float = 80.0
    alarm_percent: float = 90.0
    # free filesystem space below which new device input is refused as if the budget were reached
    reserve_mb: int = 256
    # how often the data directory is measured
    check_interval_s: float = 5.0

    def share(self, storage_class: str) -> float:
        return {"ledger": self.ledger_share, "intake": self.intake_share, "dlq": self.dlq_share,
                "logs": self.logs_share}[storage_class]

    def class_budget(self, storage_class: str) -> int:
        """Bytes the class may take."""
        return int(self.budget_bytes * self.share(storage_class))


class LinkConfig(msgspec.Struct, forbid_unknown_fields=True):
    # empty: the local reference gateway at `gateway.listen` (resolved by load_config)
    gateway_url: str = ""
    token: str = ""
    probe_interval_s: float = 5.0
    slow_probe_ms: int = 2000
    isolate_after: int = 3
    state_refresh_s: float = 60.0
    degraded_alarm_s: float = 60.0
    # TLS to the gateway: the CA that signed its certificate (empty: the system's CAs), and this
    # edge's client certificate and key when the gateway asks for one (mTLS)
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    # the bearer token may travel over plain http:// to a host other than loopback only when the
    # operator says so here (a lab without TLS); never the default
    allow_token_over_plain_http: bool = False


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
    # HTTPS: certificate chain and key (PEM); both empty: plain HTTP. client_ca: require a client
    # certificate signed by this CA (mTLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # requests handled at once (more: 503), connections held at once (more: 503 from uvicorn)
    max_concurrent_requests: int = 64
    max_connections: int = 256
    # seconds: to send a request's headers, to send its body, a keep-alive connection may idle
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True):
    """What the stages prune from their own stores once the gateway holds it (shared.runtime.retention)."""

    # the dedupe window: a fate (`seen`) older than this whose record the gateway acknowledged
    # and cosigned is pruned; a re-send after that is judged as new (README, "Retention")
    seen_days: float = 30.0
    # DLQ rows exported (`mro-edge dlq export`) and received longer ago than this are pruned
    dlq_days: float = 30.0
    # seconds between pruning rounds, and rows one pruning write transaction looks at
    interval_s: float = 60.0
    batch: int = 500


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


class MccConfig(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8780"
    metrics_public: bool = True
    session_hours: float = 12.0


class ClockConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Time on the box (README, "Time on the box"; `shared.runtime.clock`)."""

    # true: time-window rules (occurred_in_future, occurred_too_old) judge only against a clock
    # the kernel says is synchronised; records arriving while it is not are held until it is.
    # false (default): they judge against the clock as it is, and a time-window rejection stays
    # open to a re-send or a redrive once the clock is right.
    require_sync: bool = False
    # the wall clock moving by more than this against elapsed time is a step: alarmed, and a
    # `clock_step` ledger entry
    step_threshold_s: float = 2.0
class ControllerSettings(msgspec.Struct, forbid_unknown_fields=True):
    """One Open Protocol torque controller the bridge connects to (`[torque.controllers.<id>]`)."""

    host: str
    zone: str  # IANA zone of the controller's clock: its timestamps carry none
    port: int = 4545
    result_revision: int | None = None  # highest MID 0061 revision to ask for (None: 7, stepping down)
    calibration_interval_days: int = 365  # a tool's own last calibration (MID 0041) is good this long
    tool_poll_s: float = 3600.0  # how often MID 0040 asks for the tool's data again


class TorqueConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The Open Protocol bridge (`services.torque.bridge`)."""

    # how long a result may wait for ingest's receipt before the link is dropped unacknowledged
    receipt_timeout_s: float = 10.0
    keepalive_s: float = 10.0
    controllers: dict[str, ControllerSettings] = msgspec.field(default_factory=dict)


class PlaceConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A place on the hangar floor (a bay, a station) and the device ids that belong to it."""

    readers: list[str] = msgspec.field(default_factory=list)
    scanners: list[str] = msgspec.field(default_factory=list)
    controllers: list[str] = msgspec.field(default_factory=list)


class Config(msgspec.Struct, forbid_unknown_fields=True):
    station: str = "HGR1"
    data_dir: str = "./var"
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    stage: StageConfig = msgspec.field(default_factory=StageConfig)
    link: LinkConfig = msgspec.field(default_factory=LinkConfig)
    uplink: UplinkConfig = msgspec.field(default_factory=UplinkConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    compliance: ComplianceConfig = msgspec.field(default_factory=ComplianceConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    mcc: MccConfig = msgspec.field(default_factory=MccConfig)
    clock: ClockConfig = msgspec.field(default_factory=ClockConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    places: dict[str, PlaceConfig] = msgspec.field(default_factory=dict)
    torque: TorqueConfig = msgspec.field(default_factory=TorqueConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.data_path / stage

    def store_cap_mb(self, store: str) -> int:
        """The cap (MiB) a store's map may grow to: its `[stage] *map_max_mb` key, never more than
        its class's share of the storage budget (`shared.runtime.budget.STORE_CLASS`)."""
        from shared.runtime.budget import store_class

        share_mb = self.storage.class_budget(store_class(store)) >> 20
        return max(1, min(self.stage.map_max(store), share_mb))

    def log_file_max_bytes(self) -> int:
        """Size at which `logs/mro-edge.log` rotates: `[supervisor] log_max_mb`, never more than
        keeps the current file and its `log_backups` old ones within the logs class's share."""
        share = self.storage.class_budget("logs") // (self.supervisor.log_backups + 1)
        return max(1 << 16, min(int(self.supervisor.log_max_mb * (1 << 20)), share))

    def dlq_budget_bytes(self, stages: int = 3) -> int:
        """Bytes one stage's DLQ keeps: `[stage] dlq_budget_kb`, never more than its part of the
        DLQ class's share (split between the `stages` pipeline stages that keep one)."""
        return min(self.stage.dlq_budget_kb * 1024, self.storage.class_budget("dlq") // stages)

    @property
    def gateway_db_url(self) -> str:
        """The reference gateway's database; empty setting: SQLite under the data directory."""
        if self.gateway.db_url:
            return self.gateway.db_url
        path = self.data_path.resolve() / "gateway"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)  # it holds record bodies and the cosigner key: the gateway's user only
        return f"sqlite:///{path / 'gateway.db'}"

    @property
    def origin(self) -> str:
        """The ledger's origin line (C2SP checkpoint origin); one ledger per station."""
        return f"mro-edge/{self.station}"


class ConfigError(Exception):
    """A setting is missing, misspelt or of the wrong type; the message names it."""


def _split_url(url: str) -> tuple[str, int]:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("mqtt", "tcp", "mqtts"):
        raise ConfigError(f"MRO_MQTT_URL {url!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"MRO_MQTT_URL {url!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)")
    return host.strip("[]"), int(port)


def split_listen(listen: str, setting: str) -> tuple[str, int]:
    """HOST:PORT of a listener setting; the message names the setting."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{setting} {listen!r} must look like HOST:PORT (e.g. 0.0.0.0:8883)")
    return host.strip("[]"), int(port)


def _check_tls(config: Config) -> None:
    """TLS settings that cannot work are refused at load, each with what to do about it."""
    mqtt, broker = config.mqtt, config.broker
    if bool(mqtt.cert_file) != bool(mqtt.key_file):
        raise ConfigError("MRO_MQTT_CERT_FILE and MRO_MQTT_KEY_FILE (mqtt.cert_file, mqtt.key_file) go "
                          "together: set both for a client certificate, or neither")
    if bool(broker.tls_cert_file) != bool(broker.tls_key_file):
        raise ConfigError("MRO_BROKER_TLS_CERT_FILE and MRO_BROKER_TLS_KEY_FILE go together: set both "
                          "(`mro-edge certs init` writes broker.pem and broker.key), or neither")
    if broker.listen:
        split_listen(broker.listen, "MRO_BROKER_LISTEN (broker.listen)")
    if broker.plain_listen:
        host, _ = split_listen(broker.plain_listen, "MRO_BROKER_PLAIN_LISTEN (broker.plain_listen)")
        if not _is_loopback(host):
            raise ConfigError(f"MRO_BROKER_PLAIN_LISTEN {broker.plain_listen!r}: the plain listener beside TLS "
                              "takes loopback addresses only (e.g. 127.0.0.1:1883), so no password crosses "
                              "the LAN in clear")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _apply_env(raw: dict[str, Any], env: dict[str, str]) -> None:
    """Overlay MRO_<KEY> / MRO_<SECTION>_<KEY>; values are strings converted by msgspec (strict=False)."""
    sections = {"mqtt": MqttConfig, "broker": BrokerConfig, "limits": LimitsConfig, "stage": StageConfig,
                "link": LinkConfig, "uplink": UplinkConfig, "gateway": GatewayConfig, "compliance": ComplianceConfig,
                "ledger": LedgerConfig, "supervisor": SupervisorConfig, "mcc": MccConfig,
                "retention": RetentionConfig, "clock": ClockConfig,
                "torque": TorqueConfig, "storage": StorageConfig}
    for key in ("station", "data_dir"):
        if (value := env.get(f"MRO_{key.upper()}")) is not None:
            raw[key] = value
    for section, struct in sections.items():
        for key in struct.__struct_fields__:
            if (value := env.get(f"MRO_{section.upper()}_{key.upper()}")) is not None:
                raw.setdefault(section, {})[key] = value
    if (controllers := env.get("MRO_TORQUE_CONTROLLERS")) is not None:
        # a table, not a scalar: JSON {"<id>": {"host": ..., "zone": ...}} (what `run --simulate` sets)
        try:
            raw.setdefault("torque", {})["controllers"] = json.loads(controllers)
        except ValueError:
            raise ConfigError('MRO_TORQUE_CONTROLLERS must be JSON like {"TQC-01": {"host": "10.0.0.5", '
                              '"zone": "Europe/Berlin"}}') from None


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
    if re.search(STATION_PATTERN, config.station) is None:
        raise ConfigError(f"MRO_STATION (station) {config.station!r} is not a station id: 1-32 of A-Z a-z 0-9 _ -, "
                          "starting with a letter or digit (it is part of every MQTT topic)")
    _check_tls(config)
    check_storage(config.storage)
    if (config.mqtt.password or config.mqtt.password_file) and not config.mqtt.username:
        which = ("MRO_MQTT_PASSWORD (mqtt.password)" if config.mqtt.password
                 else "MRO_MQTT_PASSWORD_FILE (mqtt.password_file)")
        raise ConfigError(f"{which} is set but MRO_MQTT_USERNAME (mqtt.username) is not: set both, or "
                          "neither, and each service logs in with its own password file in the data directory")
    if not config.link.gateway_url:
        config.link.gateway_url = local_gateway_url(config.gateway.listen, tls=bool(config.gateway.tls_cert))
    check_link(config.link)
    check_gateway_tls(config.gateway)
    return config


def check_storage(storage: StorageConfig) -> None:
    """A budget that cannot be kept is refused at load."""
    shares = [storage.share(name) for name in STORAGE_CLASSES]
    if storage.budget_bytes <= 0 or any(share < 0 for share in shares) or sum(shares) > 1.0 + 1e-9:
        raise ConfigError(f"[storage] budget_bytes {storage.budget_bytes} must be positive and the shares "
                          f"(ledger, intake, dlq, logs: {shares}) at least 0 and at most 1 together")
    if not 0 < storage.warn_percent <= storage.alarm_percent < 100:
        raise ConfigError(f"[storage] warn_percent {storage.warn_percent} and alarm_percent "
                          f"{storage.alarm_percent} must satisfy 0 < warn <= alarm < 100")


def local_gateway_url(listen: str, *, tls: bool = False) -> str:
    """The URL of a gateway listening on `listen` (host:port); a wildcard host is reached on loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{'https' if tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) never leaves this machine."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _readable(setting: str, path: str) -> None:
    if path and not Path(path).is_file():
        raise ConfigError(f"{setting} {path!r} is not a file; give the PEM file's path, or leave it empty")


def check_link(link: LinkConfig) -> None:
    """The link to the gateway is HTTPS, or plain HTTP on loopback, or explicitly allowed plain HTTP;
    the TLS files it names exist. The uplink sends its bearer token on every request, so a plain
    http:// URL to another host would put the token on the wire in clear."""
    parts = urlsplit(link.gateway_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"link.gateway_url (MRO_LINK_GATEWAY_URL) {link.gateway_url!r} must look like "
                          "https://HOST:PORT")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not link.allow_token_over_plain_http:
        raise ConfigError(
            f"link.gateway_url {link.gateway_url!r} is plain HTTP to {parts.hostname}, which is not this machine: "
            "the uplink's bearer token would cross the network unencrypted. Use https:// (and link.ca_file / "
            "MRO_LINK_CA_FILE for the gateway's CA), or, on a closed test network only, set "
            "link.allow_token_over_plain_http = true (MRO_LINK_ALLOW_TOKEN_OVER_PLAIN_HTTP=1)")
    if bool(link.client_cert) != bool(link.client_key):
        raise ConfigError("link.client_cert and link.client_key (MRO_LINK_CLIENT_CERT, MRO_LINK_CLIENT_KEY) "
                          "go together: set both for mTLS, or neither")
    for setting, path in (("link.ca_file", link.ca_file), ("link.client_cert", link.client_cert),
                          ("link.client_key", link.client_key)):
        _readable(setting, path)


def check_gateway_tls(gateway: GatewayConfig) -> None:
    """The reference gateway's certificate and key go together; a client CA needs them."""
    if bool(gateway.tls_cert) != bool(gateway.tls_key):
        raise ConfigError("gateway.tls_cert and gateway.tls_key (MRO_GATEWAY_TLS_CERT, MRO_GATEWAY_TLS_KEY) "
                          "go together: set both to serve HTTPS, or neither")
    if gateway.tls_client_ca and not gateway.tls_cert:
        raise ConfigError("gateway.tls_client_ca (mTLS) needs gateway.tls_cert and gateway.tls_key: "
                          "client certificates are only asked for over HTTPS")
    for setting, path in (("gateway.tls_cert", gateway.tls_cert), ("gateway.tls_key", gateway.tls_key),
                          ("gateway.tls_client_ca", gateway.tls_client_ca)):
        _readable(setting, path)
