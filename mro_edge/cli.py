"""`mro-edge`: one console script for the whole edge box.

Every command honours MRO_DATA_DIR, MRO_STATION and MRO_MQTT_URL (see config/edge.toml).
Errors say what was wrong and what to do, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import import_module
from pathlib import Path

from shared.config import Config, ConfigError, load_config
from shared.topics import DEVICE_KINDS

STAGE_CLASSES = {
    "ingest": "services.ingest.stage:Ingest",
    "validate": "services.validate.stage:Validate",
    "sign": "services.sign.stage:Sign",
    "uplink": "services.uplink.stage:Uplink",
}
SERVICES = ("broker", "gateway", "heartbeat") + tuple(STAGE_CLASSES)
# Modules that add their own subcommands: each has `register(subparsers)`; handlers take (config, args).
COMMAND_MODULES: tuple[str, ...] = ("mro_edge.commands_ledger", "mro_edge.commands_schema")


# status fields worth a glance in the table (all of them are in --json)
STATUS_DETAIL = ("backlog", "acked_seq", "gateway_head", "breaker", "in_sync", "last_probe_ms", "since",
                 "checkpoint_size", "cosigned_size")


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)


def cmd_service(config: Config, args) -> int:
    if args.name == "broker":
        from services.broker.service import run_broker

        run_broker(config)
        return 0
    if args.name == "heartbeat":
        from services.heartbeat.service import run_heartbeat

        run_heartbeat(config)
        return 0
    if args.name == "gateway":
        from services.gateway.server import run_gateway

        run_gateway(config)
        return 0
    from shared.stage import run_stage

    run_stage(_load(STAGE_CLASSES[args.name])(), config)
    return 0


def _where_to_look(config: Config) -> str:
    from shared.mqtt import service_credentials

    user, password = service_credentials(config)
    host, port, st = config.mqtt.host, config.mqtt.port, config.station
    sub = f"mosquitto_sub -h {host} -p {port} -u {user} -P '{password}' -v"
    return "\n".join([
        f"mro-edge is running for station {st} (broker {config.mqtt.url}, data in {config.data_path.resolve()}).",
        f"  receipts : {sub} -t 'mro/{st}/receipt/#'",
        f"  status   : {sub} -t 'mro/{st}/status/#'",
        f"  DLQ      : {sub} -t 'mro/{st}/dlq/#'",
        f"  link     : {sub} -t 'mro/{st}/status/connectivity'   gateway: {config.link.gateway_url}/health",
        "  services : mro-edge status      ledger: mro-edge ledger export --out ledger.jsonl",
        "Ctrl-C stops everything.",
    ])


def _register_with_own_gateway(config: Config) -> None:
    """`run` starts a reference gateway: register this box's ledger key there once and keep the
    token where the uplink looks for it."""
    from services.gateway.admin import register_edge
    from shared.crypto import SigningKey

    token_path = config.data_path / "uplink" / "token"
    if token_path.exists():
        return
    key = SigningKey.load_or_create(config.data_path / "keys")
    token = register_edge(config.gateway_db_url, config.origin, key.public_pem())
    token_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)


def cmd_run(config: Config, args) -> int:
    from mro_edge.supervisor import PortTaken, Supervisor, check_port_free
    from services.gateway.server import split_listen
    from shared.credentials import BrokerCredentials

    if not args.no_broker:
        BrokerCredentials(config.data_path / "broker", config.station).ensure_service_user()
    if not args.no_gateway:
        try:
            check_port_free(*split_listen(config.gateway.listen))
        except PortTaken:
            raise UserError(f"the reference gateway's address {config.gateway.listen} is taken: set "
                            "MRO_GATEWAY_LISTEN and MRO_LINK_GATEWAY_URL to a free port, or --no-gateway "
                            "to use the gateway at MRO_LINK_GATEWAY_URL") from None
        _register_with_own_gateway(config)
    extra = []
    if args.simulate:
        extra.append(("simulator", ["simulate", "--rate", str(args.rate), "--duration", "0"]))
    supervisor = Supervisor(config, with_broker=not args.no_broker, with_gateway=not args.no_gateway,
                            extra=extra)
    try:
        supervisor.supervise(on_started=lambda: print(_where_to_look(config), file=sys.stderr, flush=True))
    except PortTaken as exc:
        raise UserError(str(exc)) from None
    return 0


def _credentials(config: Config):
    from shared.credentials import BrokerCredentials

    return BrokerCredentials(config.data_path / "broker", config.station)


def cmd_devices(config: Config, args) -> int:
    from shared.credentials import reload_mosquitto

    store = _credentials(config)
    if args.action == "init":
        from services.simulator.run import provision_fleet

        user, _ = store.ensure_service_user()
        fleet = provision_fleet(config)
        print(f"service user {user} and {len(fleet)} simulator devices ready; "
              f"password file {store.passwd_path}, ACL {store.acl_path}")
        return 0
    if args.kind not in DEVICE_KINDS:
        raise UserError(f"--kind must be one of {', '.join(DEVICE_KINDS)}")
    try:
        username, password = store.add_device(args.id, args.kind)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    reloaded = reload_mosquitto(Path(args.mosquitto_pid_file) if args.mosquitto_pid_file else None)
    if args.json:
        print(json.dumps({"username": username, "password": password}))
    else:
        topics = f"mro/{config.station}/in/{args.kind}/{args.id}"
        print(f"username: {username}\npassword: {password}\npublishes to: {topics}\n"
              f"receipts on:  mro/{config.station}/receipt/{args.id}")
        if not reloaded:
            print("(the embedded broker picks this up by itself; a Mosquitto on another host needs SIGHUP)",
                  file=sys.stderr)
    return 0


def cmd_simulate(config: Config, args) -> int:
    from services.simulator.run import simulate

    duration = args.duration if args.duration > 0 else float("inf")
    report = simulate(config, rate=args.rate, duration_s=duration, bad_share=args.bad_share, seed=args.seed,
                      grace_s=args.grace, out=lambda line: print(line, flush=True))
    return 0 if report.ok else 1


def read_statuses(config: Config, wait_s: float) -> dict[str, dict]:
    """Retained status messages of every service, as the broker holds them now."""
    from shared.mqtt import MqttLink
    from shared.topics import Topics

    topics = Topics(config.station)
    link = MqttLink(config, client_id=f"mro-status-{time.monotonic_ns()}", subscriptions=[(topics.status_all, 0)],
                    persistent=False)
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


def cmd_status(config: Config, args) -> int:
    from shared.mqtt import BrokerUnavailable

    try:
        statuses = read_statuses(config, args.wait)
    except BrokerUnavailable as exc:
        raise UserError(str(exc)) from None
    if args.service:
        statuses = {k: v for k, v in statuses.items() if k == args.service}
    if args.check:
        return 0 if args.service and statuses.get(args.service, {}).get("state") == "up" else 1
    if args.json:
        print(json.dumps(statuses, indent=2, sort_keys=True))
        return 0
    if not statuses:
        print("no service has published a status yet (are they running? is MRO_STATION right?)")
        return 1
    print(f"{'service':<14}{'state':<13}{'queue':>7}{'processed':>11}{'failed':>8}  detail")
    for name, st in sorted(statuses.items()):
        detail = "  ".join(f"{key}={st[key]}" for key in STATUS_DETAIL if st.get(key) is not None)
        print(f"{name:<14}{st.get('state', '?'):<13}{st.get('queue_depth', ''):>7}{st.get('processed', ''):>11}"
              f"{st.get('failed', ''):>8}  {detail}")
    return 0


def cmd_ledger(config: Config, args) -> int:
    from shared.ledger import export_line
    from shared.ledger_store import iter_entries, open_ledger
    from shared.store import StoreError

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
    from shared.store import Store

    entries = []
    for stage in STAGE_CLASSES:
        path = config.stage_dir(stage)
        if not (path / "data.mdb").exists():
            continue
        store = Store(path, ("dlq",), readonly=True)
        with store.read() as txn:
            for _, value in txn.cursor(db=store.table("dlq")):
                entries.append(json.loads(value))
        store.close()
    entries.sort(key=lambda e: e.get("received_at", ""))
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for e in entries:
            first = e["errors"][0] if e.get("errors") else {}
            print(f"{e.get('received_at', '')}  {e['stage']:<9} {e.get('event_id') or '-':<37} "
                  f"{first.get('path', '')} {first.get('rule', '')}")
        print(f"{len(entries)} DLQ entries", file=sys.stderr)
    return 0


def cmd_resume(config: Config, args) -> int:
    from shared.mqtt import BrokerUnavailable, MqttLink
    from shared.topics import Topics

    link = MqttLink(config, client_id=f"mro-resume-{time.monotonic_ns()}", persistent=False)
    try:
        link.start(wait_s=10)
    except BrokerUnavailable as exc:
        raise UserError(str(exc)) from None
    link.client.publish(Topics(config.station).control(args.name), b'{"command":"resume"}', qos=1).wait_for_publish(5)
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
          "$MRO_DATA_DIR/uplink/token)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mro-edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole stack: embedded broker and every service, supervised")
    run.add_argument("--no-broker", action="store_true", help="use the broker at MRO_MQTT_URL (e.g. Mosquitto)")
    run.add_argument("--no-gateway", action="store_true",
                     help="do not start the reference gateway; push to MRO_LINK_GATEWAY_URL")
    run.add_argument("--simulate", action="store_true", help="also run device simulators")
    run.add_argument("--rate", type=float, default=5.0, help="simulated records per second")
    run.set_defaults(func=cmd_run)

    service = sub.add_parser("service", help="one service in the foreground (what compose runs)")
    service.add_argument("name", choices=SERVICES)
    service.set_defaults(func=cmd_service)

    devices = sub.add_parser("devices", help="broker credentials for devices and services")
    dsub = devices.add_subparsers(dest="action", required=True)
    dsub.add_parser("init", help="create the service user, password file and ACL").set_defaults(func=cmd_devices)
    add = dsub.add_parser("add", help="create (or rotate) a device's credentials")
    add.add_argument("id")
    add.add_argument("--kind", required=True, choices=DEVICE_KINDS)
    add.add_argument("--json", action="store_true")
    add.add_argument("--mosquitto-pid-file", help="send SIGHUP to this Mosquitto so it re-reads the files")
    add.set_defaults(func=cmd_devices)

    simulate = sub.add_parser("simulate", help="simulated devices sending realistic records; checks receipts")
    simulate.add_argument("--rate", type=float, default=20.0, help="records per second")
    simulate.add_argument("--duration", type=float, default=30.0, help="seconds (0: until stopped)")
    simulate.add_argument("--bad-share", type=float, default=0.05, help="share of invalid records, 0..1")
    simulate.add_argument("--seed", type=int)
    simulate.add_argument("--grace", type=float, default=60.0, help="seconds to wait for final receipts")
    simulate.set_defaults(func=cmd_simulate)

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

    resume = sub.add_parser("resume", help="retry a frozen service now (after fixing the fault)")
    resume.add_argument("name", choices=tuple(STAGE_CLASSES))
    resume.set_defaults(func=cmd_resume)

    ledger = sub.add_parser("ledger", help="the signed ledger")
    lsub = ledger.add_subparsers(dest="action", required=True)
    export = lsub.add_parser("export", help="JSON Lines: seq, idempotency_key, entry, hash, signature, kid")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_ledger)

    dlq = sub.add_parser("dlq", help="dead-letter reports")
    qsub = dlq.add_subparsers(dest="action", required=True)
    dlq_list = qsub.add_parser("list", help="every DLQ entry with its error report")
    dlq_list.add_argument("--json", action="store_true")
    dlq_list.set_defaults(func=cmd_dlq)
    for module in COMMAND_MODULES:
        import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(load_config(), args)
    except (UserError, ConfigError) as exc:
        print(f"mro-edge: {exc}", file=sys.stderr)
        return 2
