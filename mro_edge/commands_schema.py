"""`mro-edge schema ...` (contract versions, schema-drift breaker) and `mro-edge registry ...`
(authority-signed registry updates).

Both talk to the running validate service over its services-only control topics
(`services.validate.commands`) with the service credentials, and wait for its answer.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

ANSWER_TIMEOUT_S = 60.0


def register(subparsers) -> None:
    schema = subparsers.add_parser("schema", help="contract versions: stage, dry-run, activate, rollback")
    ssub = schema.add_subparsers(dest="action", required=True)

    check = ssub.add_parser("check", help="check a version file locally, without the services")
    check.add_argument("file", help="version delta file (TOML or JSON), see shared/compliance/versions.py")
    check.set_defaults(func=cmd_schema_check)

    stage = ssub.add_parser("stage", help="stage a new contract version and dry-run it at once")
    stage.add_argument("file", help="version delta file (TOML or JSON), see shared/compliance/versions.py")
    _common(stage, sample=True)

    dry = ssub.add_parser("dry-run", help="replay the last N accepted records through the staged version")
    _common(dry, sample=True)

    activate = ssub.add_parser("activate", help="activate the staged version (refused above the tolerance)")
    activate.add_argument("--override", action="store_true",
                          help="activate even above the tolerance (needs --reason; recorded in the ledger)")
    activate.add_argument("--reason", default="", help="why; goes into the ledger entry")
    _common(activate, sample=True)

    rollback = ssub.add_parser("rollback", help="withdraw the staged version, or return to the previous one")
    rollback.add_argument("--reason", default="", help="why; goes into the ledger entry")
    _common(rollback)

    status = ssub.add_parser("status", help="active and staged versions, breaker, held records")
    _common(status)

    registry = subparsers.add_parser("registry", help="authority-signed registry updates")
    rsub = registry.add_subparsers(dest="action", required=True)
    sign = rsub.add_parser("sign", help="(authority, offline) sign an update file with the authority key")
    sign.add_argument("file", help='JSON file holding the update: {"serial": N, "technicians": {...}, ...}')
    sign.add_argument(
        "--key", required=True, help="the authority's Ed25519 private key (PKCS#8 PEM, mode 0600)"
    )
    sign.set_defaults(func=cmd_registry_sign)
    push = rsub.add_parser("push", help="send a signed update to the validate service")
    push.add_argument("file", help="signed update (output of `mro-edge registry sign`)")
    push.add_argument("--timeout", type=float, default=ANSWER_TIMEOUT_S)
    push.set_defaults(func=cmd_registry_push)


def _common(parser, *, sample: bool = False) -> None:
    if sample:
        parser.add_argument("--sample", type=int, default=None,
                            help="records to replay (default [compliance] dry_run_sample)")
    parser.add_argument("--json", action="store_true", help="print the service's answer as JSON")
    parser.add_argument(
        "--timeout", type=float, default=ANSWER_TIMEOUT_S, help="seconds to wait for the answer"
    )
    parser.set_defaults(func=cmd_schema)


def _user_error(message: str):
    from mro_edge.cli import UserError

    return UserError(message)


def _definition(path: str) -> dict:
    from shared.compliance.versions import DefinitionError, compile_version, read_definition

    try:
        definition = read_definition(Path(path))
        compile_version(definition)
    except DefinitionError as exc:
        raise _user_error(str(exc)) from None
    return definition


def cmd_schema_check(config, args) -> int:
    from shared.compliance.versions import compile_version

    version = compile_version(_definition(args.file))
    rules = sum(len(checks) for checks in version.checks.values())
    print(f"{version.version}: {version.title}\n{rules} check(s) over {', '.join(sorted(version.checks))}; "
          f"sha256 {version.sha256}")
    return 0


def cmd_schema(config, args) -> int:
    command: dict = {"command": args.action}
    if args.action == "stage":
        command["definition"] = _definition(args.file)
    if getattr(args, "sample", None) is not None:
        if args.sample <= 0:
            raise _user_error("--sample must be a positive number of records")
        command["sample"] = args.sample
    if args.action == "activate":
        if args.override and not args.reason.strip():
            raise _user_error(
                "--override needs --reason TEXT: why the drift is acceptable (it goes into the ledger)"
            )
        command["override"] = bool(args.override)
    if args.action in ("activate", "rollback") and args.reason.strip():
        command["reason"] = args.reason.strip()
    from shared.runtime.topics import Topics

    reply = _ask(config, command, lambda topics: topics.schema, Topics.schema_reply, args.timeout)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        _print_reply(reply)
    return 0 if reply.get("ok") else 1


def _ask(config, command: dict, topic_of, reply_topic_of, timeout: float,
         check: str = "mro-edge schema status", *, service: str = "validate") -> dict:
    """Send an operator command to a running service on its control topic and wait for its reply."""
    from services.validate.commands import operator_name
    from shared.runtime.clock import utc_now
    from shared.runtime.mqtt import BrokerUnavailable, MqttLink
    from shared.runtime.topics import Topics

    topics = Topics(config.station)
    command_id = uuid.uuid4().hex
    command.update(id=command_id, sent_at=utc_now())
    command.setdefault("operator", operator_name())
    reply_topic = reply_topic_of(topics, command_id)
    link = MqttLink(config, client_id=f"mro-cli-{command_id[:16]}", subscriptions=[(reply_topic, 1)],
                    persistent=False)
    try:
        link.start(wait_s=10)
    except BrokerUnavailable as exc:
        raise _user_error(str(exc)) from None
    try:
        link.client.publish(topic_of(topics), json.dumps(command).encode(), qos=1).wait_for_publish(10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = link.inbox.get(timeout=0.2)
            except Exception:
                continue
            link.ack(message)
            if message.topic == reply_topic:
                return json.loads(message.payload)
    finally:
        link.stop()
    raise _user_error(f"no answer from the {service} service within {timeout:.0f} s: is it running "
                      "(mro-edge status)? If it comes back within 5 minutes it still carries the command "
                      f"out; check with `{check}`")


def _print_reply(reply: dict) -> None:
    out = sys.stdout if reply.get("ok") else sys.stderr
    print(("" if reply.get("ok") else "refused: ") + str(reply.get("message", "")), file=out)
    dry = (reply.get("dry_run") or {}).get("report") or (reply.get("state") or {}).get("dry_run")
    if dry and dry.get("by_rule"):
        print("  would fail, by rule:")
        for rule, count in sorted(dry["by_rule"].items(), key=lambda kv: -kv[1]):
            print(f"    {rule:<22}{count:>8}")
        print("  by field:")
        for path, count in sorted(dry["by_field"].items(), key=lambda kv: -kv[1]):
            print(f"    {path:<36}{count:>8}")
    state = reply.get("state") or {}
    if state:
        staged = f", staged {state['staged']}" if state.get("staged") else ""
        since = f" since {state.get('breaker_since')}" if state.get("breaker") == "open" else ""
        print(
            f"contract {state.get('active')}{staged}; breaker {state.get('breaker')}{since}; "
            f"{state.get('held', 0)} record(s) held; tolerance {state.get('tolerance_ppm', 0) / 10_000:.2f} %"
        )
    if reply.get("ledger_event_id"):
        print(f"ledger entry (schema_change) event_id {reply['ledger_event_id']}")


def cmd_registry_sign(config, args) -> int:
    from shared.compliance.updates import UpdateRefused, check_changes, sign_update
    from shared.ledger.canonical import CanonicalError
    from shared.ledger.keys import KeyFileError, SigningKey

    try:
        update = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        raise _user_error(f"cannot read the update {args.file}: {exc}") from None
    if not isinstance(update, dict) or type(update.get("serial")) is not int:
        raise _user_error(
            'the update must be a JSON object with an integer "serial" (greater than the last one)'
        )
    try:
        check_changes(update)
        key = SigningKey.load(Path(args.key))
        message = sign_update(update, key)
    except (UpdateRefused, KeyFileError, CanonicalError) as exc:
        raise _user_error(str(exc)) from None
    print(json.dumps(message, indent=2))
    print(f"signed with authority key {key.kid}", file=sys.stderr)
    return 0


def cmd_registry_push(config, args) -> int:
    from shared.runtime.topics import Topics

    try:
        message = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        raise _user_error(f"cannot read the signed update {args.file}: {exc}") from None
    if not isinstance(message, dict) or "update" not in message or "signature" not in message:
        raise _user_error("not a signed update: run `mro-edge registry sign` first")
    reply = _ask(config, message, lambda topics: topics.registry, Topics.registry_reply, args.timeout)
    print(("applied: " if reply.get("ok") else "refused: ") + str(reply.get("message", "")),
          file=sys.stdout if reply.get("ok") else sys.stderr)
    return 0 if reply.get("ok") else 1
