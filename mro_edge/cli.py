"""`mro-edge`: one console script for the whole edge box.

Every command honours MRO_DATA_DIR, MRO_STATION and MRO_MQTT_URL (see config/edge.toml). The
commands that talk to a running stack take its endpoints from `$MRO_DATA_DIR/run.json`, which
`mro-edge run` writes (MRO_* variables override it), and never create a data directory or a
service password: they say where they looked. Errors say what was wrong and what to do, and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import Any

from services.registry import BY_NAME, Kind, service_names
from shared.runtime.config import Config, ConfigError, load_config
from shared.runtime.topics import ALL_DEVICE_KINDS, DEVICE_KINDS, Topics

REFUSED_EXIT = 3  # shared.runtime.stage.REFUSED_EXIT: a person has to act; `mro-edge run` does not restart it
# Modules that add their own subcommands: each has `register(subparsers)`; handlers take (config, args).
COMMAND_MODULES: tuple[str, ...] = ("mro_edge.commands_ledger", "mro_edge.commands_schema",
                                     "mro_edge.commands_certs", "mro_edge.commands_backup",
                                     "mro_edge.commands_mcc", "mro_edge.commands_sessions")


# status fields worth a glance in the table (all of them are in --json)
STATUS_DETAIL = ("backlog", "acked_seq", "gateway_head", "breaker", "in_sync", "last_probe_ms", "since",
                 "checkpoint_size", "cosigned_size", "pid", "restarts", "hung", "detail")


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def cmd_service(config: Config, args) -> int:
    from mro_edge import lifeline
    from mro_edge.instance import InstanceBusy, hold_service_lock
    from shared.runtime.logs import configure_logging, get_logger

    configure_logging(args.name, config.station)  # JSON from the first line on; the service may refine it
    lifeline.start(get_logger(component="lifeline"))
    try:
        hold_service_lock(config.data_path, args.name)
    except InstanceBusy as exc:
        get_logger().error("refusing to start", alarm="instance_busy", holder_pid=exc.holder.get("pid"),
                           state_transition="REFUSED")
        print(f"mro-edge {args.name}: {exc}", file=sys.stderr, flush=True)
        return REFUSED_EXIT
    BY_NAME[args.name].run(config)
    return 0


def _tls_args(config: Config) -> list[str]:
    """mosquitto_pub/sub options for mqtts://: the station CA and the client certificate, if any."""
    mqtt = config.mqtt
    if not mqtt.tls:
        return []
    args = ["--cafile", mqtt.ca_file] if mqtt.ca_file else ["--capath", "/etc/ssl/certs"]
    if mqtt.cert_file:
        args += ["--cert", mqtt.cert_file, "--key", mqtt.key_file]
    return [shlex.quote(a) for a in args]


def _sub_line(config: Config, login_hint: str) -> str:
    tls = "".join(f" {a}" for a in _tls_args(config))
    return f"mosquitto_sub -h {config.mqtt.host} -p {config.mqtt.port}{tls} {login_hint} -v"


def _login_hint(config: Config) -> str:
    """How to pass the operator's login on a command line, without printing the password."""
    from mro_edge.endpoints import service_secret_path

    if config.mqtt.username:
        return f"-u {shlex.quote(config.mqtt.username)} -P \"$MRO_MQTT_PASSWORD\""
    from services.broker.credentials import service_user

    return f"-u {service_user('operator')} -P \"$(cat {shlex.quote(str(service_secret_path(config)))})\""


def _where_to_look(config: Config, supervisor, log_file: Path | None, run_file: Path) -> str:
    topics = Topics(config.station)
    sub = _sub_line(config, _login_hint(config))
    names = " ".join(c.name for c in supervisor.children)
    lines = [
        f"mro-edge run: station {config.station}, data in {config.data_path.resolve()}",
        f"  runs     : {names}",
        f"  broker   : {config.mqtt.url}{' (embedded)' if supervisor.with_broker else ''}"
        f"    gateway: {config.link.gateway_url}",
        f"  logs     : {log_file} (JSON lines, rotated by size)"
        if log_file
        else "  logs     : JSON lines on stderr",
        f"  receipts : {sub} -t '{topics.receipt_all}'",
        f"  status   : {sub} -t '{topics.status_all}'",
        f"  DLQ      : {sub} -t '{topics.dlq_all}'",
        f"  alarms   : {sub} -t '{topics.alarm}'",
        "  commands : mro-edge status | mro-edge dlq list "
        "| mro-edge devices add ID --kind KIND --mosquitto-pub",
        f"             (they find this stack through {run_file})",
    ]
    return "\n".join(lines)


def _register_with_own_gateway(config: Config) -> None:
    """`run` starts a reference gateway: register this box's ledger key there once and keep the
    token where the uplink looks for it."""
    from services.gateway.admin import register_edge
    from shared.ledger.keys import SigningKey

    token_path = config.data_path / "uplink" / "token"
    if token_path.exists():
        return
    key = SigningKey.load_or_create(config.data_path / "keys")
    token = register_edge(config.gateway_db_url, config.origin, key.public_pem())
    token_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)


def _check_broker(config: Config, login: tuple[str, str], *, allow_anonymous: bool, embedded: bool) -> list:
    """Login accepted, and no anonymous device records; returns the warnings to alarm."""
    from mro_edge.preflight import BrokerProblem, anonymous_message, check_login, probe_anonymous
    from shared.runtime.logs import get_logger

    hint = "" if embedded else "or run without --no-broker to start the embedded broker"
    try:
        check_login(config, *login, hint=hint)
    except BrokerProblem as exc:
        raise UserError(str(exc)) from None
    anonymous = probe_anonymous(config, login)
    if anonymous.delivered:
        message = anonymous_message(config, anonymous.delivered)
        if not allow_anonymous:
            raise UserError(message)
        detail = (
            f"operator override --allow-anonymous-broker: the broker at {config.mqtt.url} lets anonymous "
            f"clients publish device records ({anonymous.delivered})"
        )
        get_logger(component="run").warning("anonymous broker accepted by override", detail=detail,
                                            state_transition="OVERRIDE_ANONYMOUS_BROKER")
        return [("anonymous_broker", detail)]
    if anonymous.connects:
        get_logger(component="run").warning(
            "broker accepts anonymous connections (they cannot publish device records)",
            broker=config.mqtt.url,
        )
    return []


def _take_data_dir(config: Config, args):
    """The run lock of the data directory, once nothing else runs there and every port is free;
    else UserError saying who is in the way."""
    from mro_edge import instance
    from mro_edge.preflight import check_ports
    from mro_edge.supervisor import run_services

    try:
        lock = instance.run_lock(config.data_path).acquire()
    except instance.InstanceBusy as exc:
        raise UserError(instance.run_busy_message(config.data_path, exc.holder)) from None
    started = run_services(with_broker=not args.no_broker, with_gateway=not args.no_gateway)
    busy = {s.name: holder for s in started
            if (holder := instance.service_lock(config.data_path, s.name).holder())}
    if busy:
        lock.release()
        raise UserError(instance.services_busy_message(config.data_path, busy))
    ports = check_ports(config, with_broker=not args.no_broker, with_gateway=not args.no_gateway,
                        argv=sys.argv[1:] if sys.argv[1:2] == ["run"] else ["run"])
    if ports:
        lock.release()
        raise UserError(ports)
    return lock


def _check_tls_files(config: Config, *, embedded: bool) -> None:
    """mqtts://: the CA (and client certificate) every client loads, and the embedded broker's
    certificate, checked before anything starts, each missing file told with what to do."""
    from services.broker.service import listeners
    from shared.runtime.tls import TlsProblem, client_context

    try:
        client_context(config.mqtt)
        if embedded:
            listeners(config)
    except TlsProblem as exc:
        raise UserError(str(exc)) from None


def _children_env(config: Config) -> dict[str, str]:
    """The environment of every child: the endpoints this run settled on. No password: the
    supervisor names each child's own password file (Supervisor.login_env)."""
    env = dict(os.environ, MRO_DATA_DIR=config.data_dir, MRO_STATION=config.station,
               MRO_MQTT_URL=config.mqtt.url, MRO_LINK_GATEWAY_URL=config.link.gateway_url,
               MRO_GATEWAY_LISTEN=config.gateway.listen)
    if not config.mqtt.username:
        env.pop("MRO_MQTT_PASSWORD", None)
        env.pop("MRO_MQTT_PASSWORD_FILE", None)
    return env


SIMULATED_CONTROLLER = "TQC-01"  # listed at place BAY1 in the shipped edge.toml


def _bridge_controllers(store, controller_ids: list[str]) -> bool:
    """The bridge's broker user may publish for exactly these controllers (and read their
    receipts); True when the ACL changed."""
    from services.broker.credentials import CredentialsError

    try:
        return bool(store.set_bridged("torque", controller_ids))
    except CredentialsError as exc:
        raise UserError(f"[torque.controllers] in the configuration: {exc}") from None


def _simulated_controller(config: Config, env: dict[str, str]) -> tuple[str, list[str]]:
    """`run --simulate`: an Open Protocol controller simulator on a free loopback port, and the
    bridge configured for it (MRO_TORQUE_CONTROLLERS), unless the configuration names controllers."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if not config.torque.controllers:
        env["MRO_TORQUE_CONTROLLERS"] = json.dumps(
            {SIMULATED_CONTROLLER: {"host": "127.0.0.1", "port": port, "zone": "UTC"}})
    return ("torque-sim", ["simulate-controller", "--port", str(port), "--every", "10"])


def cmd_simulate_controller(config: Config, args) -> int:
    from mro_edge import lifeline
    from mro_edge.simulator import openprotocol
    from shared.runtime.logs import configure_logging, get_logger

    configure_logging("torque-sim", config.station)
    lifeline.start(get_logger(component="lifeline"))
    (config.data_path / "simulator").mkdir(parents=True, exist_ok=True, mode=0o700)
    openprotocol.main(["--port", str(args.port), "--every", str(args.every), "--zone", args.zone,
                       "--state", str(config.data_path / "simulator" / "torque-controller.json")])
    return 0


def _ready_message(supervisor, not_up: list, log_file: Path | None) -> str:
    if not_up:
        return (f"mro-edge is running, but not yet up: {', '.join(f'{c.name} ({c.state})' for c in not_up)}"
                f" (see {log_file or 'the log'}). Ctrl-C stops everything.")
    return f"mro-edge is running: {len(supervisor.children)} services up. Ctrl-C stops everything."


def cmd_run(config: Config, args) -> int:
    from mro_edge.commands_ledger import provision_hop_keys
    from mro_edge.endpoints import mark_stopped, write_run_file
    from mro_edge.supervisor import Console, LogSink, Supervisor, SupervisorError, summary_line
    from services.broker.credentials import BrokerCredentials
    from shared.runtime.logs import configure_logging, get_logger
    from shared.runtime.mqtt import service_credentials

    config.data_dir = str(config.data_path.resolve())
    _check_tls_files(config, embedded=not args.no_broker)
    config.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _take_data_dir(config, args)

    console = Console()
    log_file = None if args.log_stderr else config.data_path / "logs" / "mro-edge.log"
    sink = LogSink(log_file, console, max_bytes=config.log_file_max_bytes(), backups=config.supervisor.log_backups)
    configure_logging("run", config.station, stream=sink.stream())
    if not args.no_broker:
        credentials = BrokerCredentials(config.data_path / "broker", config.station)
        credentials.ensure_service_users()
        simulated = [SIMULATED_CONTROLLER] if args.simulate and not config.torque.controllers else []
        _bridge_controllers(credentials, [*config.torque.controllers, *simulated])
    provision_hop_keys(config)  # before any stage starts: a stage without its keys refuses
    login = service_credentials(config, "operator")
    warnings: list = []
    if args.no_broker:
        warnings = _check_broker(config, login, allow_anonymous=args.allow_anonymous_broker, embedded=False)
    if not args.no_gateway:
        _register_with_own_gateway(config)
    simulator = ("simulator", ["simulate", "--rate", str(args.rate), "--duration", "0"])
    children_env = _children_env(config)
    extra = [simulator]
    if args.simulate:
        extra.append(_simulated_controller(config, children_env))
    supervisor = Supervisor(config, with_broker=not args.no_broker, with_gateway=not args.no_gateway,
                            extra=extra if args.simulate else [], env=children_env,
                            console=console, sink=sink, warnings=warnings)
    run_file = write_run_file(config, embedded_broker=not args.no_broker, local_gateway=not args.no_gateway,
                              log_file=str(log_file) if log_file else None)
    console.say(_where_to_look(config, supervisor, log_file, run_file))
    for kind, detail in warnings:
        console.say(f"[alarm] {kind}: {detail}")

    def after_broker() -> None:
        if not args.no_broker:
            found = _check_broker(config, login, allow_anonymous=args.allow_anonymous_broker, embedded=True)
            for kind, detail in found:
                console.say(f"[alarm] {kind}: {detail}")
            supervisor.warnings = warnings + found

    def on_ready(not_up) -> None:
        console.say(_ready_message(supervisor, not_up, log_file))

    try:
        supervisor.supervise(after_broker=after_broker, on_ready=on_ready, summary=summary_line(supervisor))
    except SupervisorError as exc:
        raise UserError(str(exc)) from None
    finally:
        mark_stopped(config)
        get_logger(component="run").info("stopped", state_transition="STOPPED")
        sink.close()
        lock.release()
    console.say("mro-edge stopped.")
    return 0


def _credentials(config: Config):
    from services.broker.credentials import BrokerCredentials

    return BrokerCredentials(config.data_path / "broker", config.station)


def _pub_line(config: Config, device_id: str, kind: str, password: str) -> str:
    topic = Topics(config.station).device_in(kind, device_id)
    return " ".join(["mosquitto_pub", "-h", shlex.quote(config.mqtt.host), "-p", str(config.mqtt.port),
                     *_tls_args(config), "-u", shlex.quote(device_id), "-P", shlex.quote(password), "-q", "1",
                     "-t", shlex.quote(topic)])


def _mosquitto_pid_file(args) -> Path | None:
    return Path(args.mosquitto_pid_file) if args.mosquitto_pid_file else None


def cmd_devices_init(config: Config, args) -> int:
    """Only the services' own user and hop keys: device accounts are the operator's (`devices add`),
    and the simulator makes its fleet's accounts itself when it starts."""
    from mro_edge.commands_ledger import provision_hop_keys

    store = _credentials(config)
    users = store.ensure_service_users()
    if _bridge_controllers(store, list(config.torque.controllers)):
        print("torque controllers in the ACL changed: a running Mosquitto needs SIGHUP "
              "(docker compose kill -s SIGHUP mosquitto)", file=sys.stderr)
    print(f"service users ready: {', '.join(users.values())} (each password in its own file under "
          f"{store.secrets_dir}, never printed); {len(store.devices())} devices; "
          f"{len(config.torque.controllers)} torque controllers; "
          f"password file {store.passwd_path}, ACL {store.acl_path}")
    print(provision_hop_keys(config))
    return 0


def cmd_devices_list(config: Config, args) -> int:
    store = _credentials(config)
    topics = Topics(config.station)
    devices = sorted(store.devices().items())
    if args.json:
        print(json.dumps([{"id": d, "kind": k, "publishes_to": topics.device_in(k, d)} for d, k in devices],
                         indent=2))
        return 0
    for device_id, kind in devices:
        print(f"{device_id:<24}{kind:<18}{topics.device_in(kind, device_id)}")
    print(f"{len(devices)} devices (ACL {store.acl_path})", file=sys.stderr)
    return 0


def cmd_devices_remove(config: Config, args) -> int:
    from services.broker.credentials import reload_mosquitto

    store = _credentials(config)
    if args.id not in store.devices():
        raise UserError(f"no device {args.id!r} in {store.acl_path} (see mro-edge devices list)")
    try:
        store.remove_device(args.id)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    reloaded = reload_mosquitto(_mosquitto_pid_file(args))
    print(f"removed {args.id}: it can no longer log in")
    if not reloaded:
        print("(the embedded broker drops it by itself; a Mosquitto needs SIGHUP: "
              "docker compose kill -s SIGHUP mosquitto)", file=sys.stderr)
    return 0


def _kind_of_profile(name: str) -> str:
    """The topic kind a device of profile `name` publishes on, or what to do instead."""
    from services.devices.profiles.registry import PROFILES, profile_names

    profile = PROFILES.get(name)
    if profile is None:
        raise UserError(f"unknown profile {name[:40]!r}; the profiles are: {profile_names()} "
                        "(mro-edge devices add --help); a device speaking the contract takes --kind "
                        f"{', '.join(DEVICE_KINDS)}")
    if not profile.registered:
        raise UserError(f"profile {name} is for {profile.device_kind}s, which the box's own bridge publishes for: "
                        "they get no broker login; configure them under [torque.controllers.<id>] in edge.toml "
                        "and run mro-edge devices init")
    return profile.device_kind


def _profiles_help() -> str:
    from services.devices.profiles.registry import PROFILES

    return "; ".join(f"{p.name} ({p.device_kind}: {p.what})" for p in PROFILES.values() if p.registered)


def cmd_devices_add(config: Config, args) -> int:
    from services.broker.credentials import reload_mosquitto

    if args.profile is not None:
        args.kind = _kind_of_profile(args.profile)
    if args.kind not in ALL_DEVICE_KINDS:
        raise UserError(f"--kind must be one of {', '.join(ALL_DEVICE_KINDS)}")
    try:
        username, password = _credentials(config).add_device(args.id, args.kind)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    reloaded = reload_mosquitto(_mosquitto_pid_file(args))
    topics = Topics(config.station)
    topic = topics.device_in(args.kind, args.id)
    if args.mosquitto_pub:
        print(_pub_line(config, username, args.kind, password))
        print(f"append -m 'RECORD' (or -s < record.json); its receipts: {_sub_line(config, '')} "
              f"-u {username} -P ... -t '{topics.receipt(args.id)}'", file=sys.stderr)
    elif args.json:
        print(json.dumps({"username": username, "password": password, "publishes_to": topic,
                          "receipts_on": topics.receipt(args.id),
                          "mosquitto_pub": _pub_line(config, username, args.kind, password)}))
    else:
        print(f"username: {username}\npassword: {password}\npublishes to: {topic}\n"
              f"receipts on:  {topics.receipt(args.id)}")
    if not reloaded:
        print("(the embedded broker picks this up by itself; a Mosquitto needs SIGHUP: "
              "docker compose kill -s SIGHUP mosquitto)", file=sys.stderr)
    return 0


def cmd_simulate(config: Config, args) -> int:
    from mro_edge import lifeline
    from mro_edge.simulator.run import simulate
    from shared.runtime.logs import configure_logging, get_logger

    configure_logging("simulator", config.station)
    lifeline.start(get_logger(component="lifeline"))

    duration = args.duration if args.duration > 0 else float("inf")
    report = simulate(config, rate=args.rate, duration_s=duration, bad_share=args.bad_share, seed=args.seed,
                      grace_s=args.grace, out=lambda line: print(line, flush=True))
    return 0 if report.ok else 1


def read_statuses(config: Config, wait_s: float) -> dict[str, dict]:
    """Retained status messages of every service, as the broker holds them now."""
    from shared.runtime.mqtt import MqttLink

    topics = Topics(config.station)
    link = MqttLink(
        config,
        client_id=f"mro-status-{time.monotonic_ns()}",
        subscriptions=[(topics.status_all, 0)],
        persistent=False,
    )
    link.start(wait_s=10)
    statuses: dict[str, dict] = {}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            message = link.inbox.get(timeout=0.1)
        except Exception:
            continue
        try:
            status = json.loads(message.payload)
            statuses[message.topic.rsplit("/", 1)[1]] = status
        except ValueError:
            continue
    link.stop()
    return statuses


def merge_supervisor(statuses: dict[str, dict]) -> dict[str, dict]:
    """Each service's own status, corrected by what the supervisor of `mro-edge run` knows: a hung,
    restarting or refused child says so (its own retained status cannot), the broker and the
    gateway (which publish no status) get a row, and restarts and hangs are counted."""
    rows = {name: dict(st) for name, st in statuses.items() if name != "supervisor"}
    supervisor = statuses.get("supervisor") or {}
    if supervisor.get("state") != "up":
        return rows
    for name, child in (supervisor.get("children") or {}).items():
        if not isinstance(child, dict):
            continue
        row = rows.setdefault(name, {"service": name})
        if child.get("state") in ("hung", "restarting", "refused", "starting") or name not in statuses:
            row["state"] = "up" if child.get("state") == "up" else child.get("state")
            row.setdefault("pid", child.get("pid"))
        for key in ("restarts", "hung"):
            if child.get(key):
                row[key] = child[key]
    return rows


def cmd_status(config: Config, args) -> int:
    from shared.runtime.mqtt import BrokerUnavailable

    try:
        statuses = read_statuses(config, args.wait)
    except BrokerUnavailable as exc:
        raise UserError(str(exc)) from None
    rows = merge_supervisor(statuses)
    if args.service:
        rows = {k: v for k, v in rows.items() if k == args.service}
    if args.check:
        return 0 if args.service and rows.get(args.service, {}).get("state") == "up" else 1
    if args.json:
        if not args.service and "supervisor" in statuses:
            rows["supervisor"] = statuses["supervisor"]
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        print("no service has published a status yet (are they running? is MRO_STATION right?)")
        return 1
    print(f"{'service':<14}{'state':<13}{'queue':>7}{'processed':>11}{'failed':>8}  detail")
    for name, st in sorted(rows.items()):
        detail = "  ".join(f"{key}={st[key]}" for key in STATUS_DETAIL if st.get(key) is not None)
        print(
            f"{name:<14}{st.get('state', '?'):<13}{st.get('queue_depth', ''):>7}{st.get('processed', ''):>11}"
            f"{st.get('failed', ''):>8}  {detail}"
        )
    clock = next((rows[n]["clock"] for n in ("validate", "sign") if isinstance(rows.get(n, {}).get("clock"), dict)),
                 None)
    if clock is not None:
        print(clock_line(clock))
    storage = rows.get("ingest", {}).get("storage")
    if isinstance(storage, dict) and storage.get("budget_bytes"):
        used, budget = storage.get("used_bytes", 0), storage["budget_bytes"]
        print(f"storage: {used / (1 << 20):.0f} MiB of {budget / (1 << 20):.0f} MiB "
              f"({100 * used / budget:.0f} % of [storage] budget_bytes)"
              + (f"; device input REFUSED: {storage['refusing']}" if storage.get("refusing") else ""))
    return 0


def clock_line(clock: dict) -> str:
    """The box's clock as validate (or sign) reports it: synchronised or not, and what the time rules do."""
    synced, source = clock.get("synchronised"), clock.get("source", "?")
    said = {True: "synchronised", False: "NOT synchronised", None: "synchronisation unknown"}.get(synced, "?")
    line = f"clock: {said} ({source})"
    if "require_sync" in clock and synced is not True:
        line += (": records are held in validate until it is ([clock] require_sync)" if clock["require_sync"]
                 else ": time rules judge against it as it is; get NTP working (README, 'Time on the box')")
    return line


def cmd_ledger(config: Config, args) -> int:
    from shared.ledger.entry import export_line
    from shared.ledger.store import iter_entries, open_ledger
    from shared.runtime.store import StoreError

    try:
        store = open_ledger(config)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    count = 0
    with open(args.out, "wb") as out:
        for entry in iter_entries(store):
            out.write(export_line(entry))
            count += 1
    print(f"exported {count} ledger entries to {args.out}", file=sys.stderr)
    return 0


def cmd_dlq(config: Config, args) -> int:
    from shared.runtime.store import Store, from_u64

    entries = []
    for stage in service_names(Kind.STAGE):
        path = config.stage_dir(stage)
        if not (path / "data.mdb").exists():
            continue
        store = Store(path, ("dlq",), readonly=True)
        with store.read() as txn:
            for key, value in txn.cursor(db=store.table("dlq")):
                entry = json.loads(value)
                entry["redrivable"] = entry.pop("record", None) is not None  # the record stays in the DLQ
                entries.append({"dlq_id": from_u64(key), **entry})
        store.close()
    entries.sort(key=lambda e: e.get("received_at", ""))
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for e in entries:
            first = e["errors"][0] if e.get("errors") else {}
            print(f"{e.get('received_at', '')}  {e['stage']:<9} {e['dlq_id']:<6} {e.get('event_id') or '-':<37} "
                  f"{first.get('path', '')} {first.get('rule', '')}{'  (redrivable)' if e['redrivable'] else ''}")
        print(f"{len(entries)} DLQ entries", file=sys.stderr)
    return 0


def cmd_dlq_summary(config: Config, args) -> int:
    """Per stage: the DLQ's bytes against its budget, and the rejections only counted (budget
    reached, rate_limited) per device and rule."""
    import lmdb

    from shared.runtime import dlq
    from shared.runtime.store import Store, StoreError

    budget = config.dlq_budget_bytes()
    stages: list[dict[str, Any]] = []
    for stage in service_names(Kind.STAGE):
        path = config.stage_dir(stage)
        if not (path / "data.mdb").exists():
            continue
        try:
            store = Store(path, (dlq.DLQ, dlq.SUMMARY, dlq.META), readonly=True)
        except (StoreError, lmdb.Error):
            continue  # a store written before the DLQ summary existed: nothing counted yet
        try:
            usage, rows = dlq.usage(store), dlq.summary(store)
        finally:
            store.close()
        stages.append({"stage": stage, "rows": usage.rows, "bytes": usage.bytes, "budget_bytes": budget,
                       "dropped": usage.dropped,
                       "counted": [{"device_id": d, "rule": r, "count": n} for d, r, n in rows]})
    if args.json:
        print(json.dumps(stages, indent=2))
        return 0
    for s in stages:
        print(f"{s['stage']:<9} {s['rows']} reports, {s['bytes']:,} of {s['budget_bytes']:,} bytes; "
              f"{s['dropped']} rejections counted only")
        for c in s["counted"]:
            print(f"  {c['device_id'] or '-':<24} {c['rule']:<20} {c['count']}")
    return 0


def cmd_resume(config: Config, args) -> int:
    from shared.runtime.mqtt import BrokerUnavailable, MqttLink

    link = MqttLink(config, client_id=f"mro-resume-{time.monotonic_ns()}", persistent=False)
    try:
        link.start(wait_s=10)
    except BrokerUnavailable as exc:
        raise UserError(str(exc)) from None
    link.client.publish(
        Topics(config.station).control(args.name), b'{"command":"resume"}', qos=1
    ).wait_for_publish(5)
    link.stop()
    print(f"asked {args.name} to resume; watch `mro-edge status` for its state")
    return 0


def cmd_gateway(config: Config, args) -> int:
    from services.gateway.admin import RegistrationError, register_edge

    try:
        pem = Path(args.pem).read_text()
        token = register_edge(config.gateway_db_url, args.origin, pem)
    except (OSError, RegistrationError) as exc:
        raise UserError(f"cannot register {args.origin}: {exc}") from None
    print(token)
    print(f"registered {args.origin}; give the edge this token (MRO_LINK_TOKEN or "
          "$MRO_DATA_DIR/uplink/token). It is shown only now; any earlier token of this origin "
          "no longer works.", file=sys.stderr)
    return 0


def cmd_gateway_register_auditor(config: Config, args) -> int:
    from services.gateway.admin import RegistrationError, register_auditor

    try:
        token = register_auditor(config.gateway_db_url, args.name)
    except RegistrationError as exc:
        raise UserError(f"cannot register auditor {args.name}: {str(exc).replace('origin', 'name', 1)}") from None
    print(token)
    print(f"auditor {args.name} registered: this read-only token fetches proofs, cosigned checkpoints and "
          "registered keys of any origin (README 'For auditors'). It is shown only now; an earlier token "
          "of this name no longer works.", file=sys.stderr)
    return 0


def cmd_gateway_revoke_auditor(config: Config, args) -> int:
    from services.gateway.admin import RegistrationError, revoke_auditor

    try:
        revoke_auditor(config.gateway_db_url, args.name)
    except RegistrationError as exc:
        raise UserError(f"cannot revoke: {exc}") from None
    print(f"revoked the auditor token of {args.name}; its requests get 401", file=sys.stderr)
    return 0


def cmd_gateway_tokens(config: Config, args) -> int:
    """The valid tokens: origin, token id, creation time; never a token."""
    from services.gateway.admin import list_tokens

    tokens = list_tokens(config.gateway_db_url, args.origin)
    if args.json:
        print(json.dumps([{"origin": t.origin, "token_id": t.token_id, "created_at": t.created_at}
                          for t in tokens], indent=2))
    else:
        for t in tokens:
            print(f"{t.origin:<40} {t.token_id}  {t.created_at}")
        print(f"{len(tokens)} valid tokens", file=sys.stderr)
    return 0


def cmd_gateway_revoke(config: Config, args) -> int:
    from services.gateway.admin import RegistrationError, revoke_token

    try:
        count = revoke_token(config.gateway_db_url, args.origin, args.id or "")
    except RegistrationError as exc:
        raise UserError(f"cannot revoke: {exc}") from None
    print(f"revoked {count} token(s) of {args.origin}; its requests get 401 until it is registered again "
          "(mro-edge gateway register-edge)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mro-edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole stack: embedded broker and every service, supervised")
    run.add_argument(
        "--no-broker", action="store_true", help="use the broker at MRO_MQTT_URL (e.g. Mosquitto)"
    )
    run.add_argument("--no-gateway", action="store_true",
                     help="do not start the reference gateway; push to MRO_LINK_GATEWAY_URL")
    run.add_argument("--simulate", action="store_true", help="also run device simulators")
    run.add_argument("--rate", type=float, default=5.0, help="simulated records per second")
    run.add_argument("--allow-anonymous-broker", action="store_true",
                     help="start even though the broker lets anonymous clients publish device records "
                          "(logged, and alarmed on mro/<station>/alarm)")
    run.add_argument(
        "--log-stderr",
        action="store_true",
        help="JSON log lines on stderr instead of $MRO_DATA_DIR/logs/mro-edge.log (no console summary)",
    )
    run.set_defaults(func=cmd_run)

    service = sub.add_parser("service", help="one service in the foreground (what compose runs)")
    service.add_argument("name", choices=service_names())
    service.set_defaults(func=cmd_service)

    devices = sub.add_parser("devices", help="broker credentials for devices and services")
    dsub = devices.add_subparsers(dest="action", required=True)
    init = dsub.add_parser("init", help="create the service user, password file and ACL")
    init.set_defaults(func=cmd_devices_init)
    add = dsub.add_parser("add", help="create (or rotate) a device's credentials")
    add.add_argument("id")
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", metavar="NAME",
                      help=f"a hangar device speaking its vendor's format, by device profile: {_profiles_help()}")
    what.add_argument("--kind", choices=ALL_DEVICE_KINDS,
                      help="a device speaking the device contract (rfid_reader, barcode_scanner, torque_wrench, "
                           "tablet); a raw kind is the same as its --profile")
    add.add_argument("--json", action="store_true")
    add.add_argument("--mosquitto-pub", action="store_true",
                     help="print a ready mosquitto_pub command for this device (append -m 'RECORD')")
    add.add_argument("--mosquitto-pid-file", help="send SIGHUP to this Mosquitto so it re-reads the files")
    add.set_defaults(func=cmd_devices_add)
    listing = dsub.add_parser("list", help="registered devices, their kind and topic")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_devices_list)
    remove = dsub.add_parser("remove", help="delete a device's login and ACL lines")
    remove.add_argument("id")
    remove.add_argument("--mosquitto-pid-file", help="send SIGHUP to this Mosquitto so it re-reads the files")
    remove.set_defaults(func=cmd_devices_remove)

    simulate = sub.add_parser("simulate", help="simulated devices sending realistic records; checks receipts")
    simulate.add_argument("--rate", type=float, default=20.0, help="records per second")
    simulate.add_argument("--duration", type=float, default=30.0, help="seconds (0: until stopped)")
    simulate.add_argument("--bad-share", type=float, default=0.05, help="share of invalid records, 0..1")
    simulate.add_argument("--seed", type=int)
    simulate.add_argument("--grace", type=float, default=60.0, help="seconds to wait for final receipts")
    simulate.set_defaults(func=cmd_simulate)
    controller = sub.add_parser("simulate-controller",
                                help="a simulated Open Protocol torque controller (what `run --simulate` starts)")
    controller.add_argument("--port", type=int, default=4545)
    controller.add_argument("--every", type=float, default=10.0, help="seconds between tightenings")
    controller.add_argument("--zone", default="UTC", help="IANA zone of the controller's clock")
    controller.set_defaults(func=cmd_simulate_controller)

    status = sub.add_parser("status", help="per service: up/down/frozen, queue depth, counts")
    status.add_argument("--service")
    status.add_argument("--check", action="store_true", help="exit 0 only if --service is up (health check)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--wait", type=float, default=1.0, help="seconds to collect status messages")
    status.set_defaults(func=cmd_status)

    gateway = sub.add_parser("gateway", help="the central reference gateway")
    gsub = gateway.add_subparsers(dest="action", required=True)
    register = gsub.add_parser("register-edge", help="register an edge's ledger key; prints its token")
    register.add_argument("origin", help="the edge's ledger origin, e.g. mro-edge/HGR1")
    register.add_argument("pem", help="file with the edge's public key (mro-edge keys export-public)")
    register.set_defaults(func=cmd_gateway)
    tokens = gsub.add_parser("tokens", help="the valid tokens: origin, token id, created (no secrets)")
    tokens.add_argument("--origin", help="only this origin's")
    tokens.add_argument("--json", action="store_true")
    tokens.set_defaults(func=cmd_gateway_tokens)
    revoke = gsub.add_parser("revoke-token", help="revoke an origin's token (all, or --id); its requests get 401")
    revoke.add_argument("origin", help="the edge's ledger origin, e.g. mro-edge/HGR1")
    revoke.add_argument("--id", help="only the token with this id (as `mro-edge gateway tokens` shows it)")
    revoke.set_defaults(func=cmd_gateway_revoke)

    auditor = gsub.add_parser("register-auditor", help="a read-only auditor token (proofs, checkpoints, keys of "
                                                       "every origin); prints it")
    auditor.add_argument("name", help="who holds it, e.g. hq-quality")
    auditor.set_defaults(func=cmd_gateway_register_auditor)
    unaudit = gsub.add_parser("revoke-auditor", help="end an auditor's token; its requests get 401")
    unaudit.add_argument("name")
    unaudit.set_defaults(func=cmd_gateway_revoke_auditor)

    resume = sub.add_parser("resume", help="retry a frozen service now (after fixing the fault)")
    resume.add_argument("name", choices=service_names(Kind.STAGE))
    resume.set_defaults(func=cmd_resume)

    ledger = sub.add_parser("ledger", help="the signed ledger")
    lsub = ledger.add_subparsers(dest="action", required=True)
    export = lsub.add_parser("export", help="JSON Lines: seq, idempotency_key, entry, hash, signature, kid")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_ledger)
    from mro_edge.commands_ledger import add_ledger_archive

    add_ledger_archive(lsub)

    dlq = sub.add_parser("dlq", help="dead-letter reports")
    qsub = dlq.add_subparsers(dest="action", required=True)
    dlq_list = qsub.add_parser("list", help="every DLQ entry with its error report")
    dlq_list.add_argument("--json", action="store_true")
    dlq_list.set_defaults(func=cmd_dlq)
    dlq_summary = qsub.add_parser("summary", help="DLQ bytes against the budget, and rejections only counted "
                                                  "(budget reached, rate_limited) per device and rule")
    dlq_summary.add_argument("--json", action="store_true")
    dlq_summary.set_defaults(func=cmd_dlq_summary)
    from mro_edge.commands_dlq import add_export, add_redrive

    add_redrive(qsub)
    add_export(qsub)
    for module in COMMAND_MODULES:
        import_module(module).register(sub)
    return parser


# (command, action) of the commands that may create a data directory, or need none
CREATES_STATE = {("run", None), ("service", None), ("devices", "init"), ("keys", "generate"),
                 ("certs", "init"), ("certs", "broker"), ("certs", "device"), ("keys", "hop-init"),
                 ("restore", None)}
NO_DATA_DIR = {("audit", "verify"), ("audit", "consistency"), ("audit", "prove"), ("schema", "check"),
               ("registry", "sign")}
# the commands that work on the gateway's database only (no data directory with MRO_GATEWAY_DB_URL)
GATEWAY_ADMIN = {("gateway", "register-edge"), ("gateway", "tokens"), ("gateway", "revoke-token"),
                 ("gateway", "register-auditor"), ("gateway", "revoke-auditor")}
# the commands that talk to a running stack over MQTT
NEEDS_BROKER = {("status", None), ("resume", None), ("simulate", None), ("registry", "push"),
                ("dlq", "redrive")}


def _prepare_client(config: Config, args) -> None:
    """For commands that work on an existing stack: its data directory (never created here), its
    endpoints from run.json, and a service login that the broker accepts, told at once."""
    from mro_edge.endpoints import NoDataDir, apply_run_file, client_login, require_data_dir
    from mro_edge.preflight import BrokerProblem, check_login

    key = (args.command, getattr(args, "action", None))
    needs_data = key not in NO_DATA_DIR and not (
        key in GATEWAY_ADMIN and config.gateway.db_url
    )
    needs_broker = key in NEEDS_BROKER or (args.command == "schema" and key != ("schema", "check"))
    try:
        if needs_data:
            require_data_dir(config)
        record = apply_run_file(config) if needs_data else None
        if needs_broker:
            client_login(config, record)
    except NoDataDir as exc:
        raise UserError(str(exc)) from None
    if needs_broker:
        try:
            check_login(config, config.mqtt.username, config.mqtt.password)
        except BrokerProblem as exc:
            where = ""
            if exc.unreachable and record and "MRO_MQTT_URL" not in os.environ:
                where = f" (the address mro-edge run recorded in {config.data_path.resolve() / 'run.json'}"
                if record.get("stopped_at"):
                    where += f"; that run stopped at {record['stopped_at']}"
                where += "; MRO_MQTT_URL overrides it)"
            raise UserError(f"{exc}{where}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config()
        if (args.command, getattr(args, "action", None)) not in CREATES_STATE:
            _prepare_client(config, args)
        return args.func(config, args)
    except (UserError, ConfigError) as exc:
        print(f"mro-edge: {exc}", file=sys.stderr)
        return 2
