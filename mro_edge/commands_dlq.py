"""`mro-edge dlq redrive`: ask the running validate service to judge rejected records again.

The DLQ rows live in validate's own store, so the command only sends the selection on
`Topics.redrive` (an operator command, like `mro-edge schema ...`) and prints the answer: how many
rows were selected, accepted into the ledger, and still rejected with which rules.

`mro-edge dlq export --out FILE`: every stage's DLQ rows, whole, to a JSON-lines file, then a mark
per stage (`shared.runtime.retention`) so the stage's retention may prune them after `dlq_days`.
"""

from __future__ import annotations

import json
import sys

from mro_edge.commands_schema import ANSWER_TIMEOUT_S, _ask, _user_error


def add_redrive(dlq_subparsers) -> None:
    redrive = dlq_subparsers.add_parser(
        "redrive", help="judge rejected records again once the cause is fixed (a registry, a calibration)")
    redrive.add_argument("--rule", help="rows with an error of this rule (e.g. tool_unknown)")
    redrive.add_argument("--device", help="rows of records from this device id")
    redrive.add_argument("--since", help="records received at or after this RFC 3339 UTC time")
    redrive.add_argument("--id", type=int, help="the one row with this DLQ id (mro-edge dlq list)")
    redrive.add_argument("--all", action="store_true", help="every redrivable row (no filter)")
    redrive.add_argument("--limit", type=int, default=None, help="rows per command (default 100, at most 1000)")
    redrive.add_argument("--by", default=None, help="operator name for the ledger (default: the OS user)")
    redrive.add_argument("--json", action="store_true", help="print the service's answer as JSON")
    redrive.add_argument("--timeout", type=float, default=ANSWER_TIMEOUT_S, help="seconds to wait for the answer")
    redrive.set_defaults(func=cmd_dlq_redrive)


def cmd_dlq_redrive(config, args) -> int:
    from shared.runtime.clock import parse_utc
    from shared.runtime.topics import Topics

    selection: dict = {name: value for name in ("rule", "device", "since", "id", "limit")
                       if (value := getattr(args, name)) is not None}
    if args.all:
        selection["all"] = True
    if not selection.keys() - {"limit"}:
        raise _user_error("say which rows to redrive: --rule R, --device D, --since T, --id N, or --all")
    if args.since is not None:
        try:
            parse_utc(args.since)
        except ValueError:
            raise _user_error(f"--since {args.since!r} is not an RFC 3339 UTC time, e.g. 2026-12-06T04:00:00Z"
                              ) from None
    command: dict = {"command": "redrive", "selection": selection}
    if args.by is not None:
        if not args.by.strip():
            raise _user_error("--by needs a name")
        command["operator"] = args.by.strip()[:64]
    reply = _ask(config, command, lambda topics: topics.redrive, Topics.redrive_reply, args.timeout,
                 check="mro-edge dlq list")
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0 if reply.get("ok") else 1
    if not reply.get("ok"):
        print(f"refused: {reply.get('message', '')}", file=sys.stderr)
        return 1
    print(("(this command was already carried out; its first answer:) " if reply.get("repeated") else "")
          + str(reply.get("message", "")))
    for item in reply.get("items") or []:
        outcome = "accepted" if item["result"] == "accepted" else "rejected: " + ", ".join(item.get("rules") or [])
        print(f"  dlq {item['dlq_id']:<6} {item['event_id']:<37} {item['device_id']:<20} {outcome}")
    if reply.get("ledger_event_id"):
        print(f"ledger entry (dlq_redrive) event_id {reply['ledger_event_id']}")
    return 0


def add_export(dlq_subparsers) -> None:
    export = dlq_subparsers.add_parser(
        "export", help="write every DLQ row (whole, with its record) to a JSON-lines file and mark them "
                       "exported, so retention may prune them after [retention] dlq_days")
    export.add_argument("--out", required=True, help="the file to write (must not exist yet)")
    export.add_argument("--stage", default=None, help="only this stage's DLQ (default: every stage)")
    export.set_defaults(func=cmd_dlq_export)


def cmd_dlq_export(config, args) -> int:
    """One JSON line per DLQ row (`{"dlq_id", **row}`, the row names its stage; the record kept whole); the file is
    written and synced first, then each stage's mark (`retention.DLQ_EXPORTED_FILE`) says up to
    which row id it holds, so a row is never pruned before it is safely in the file."""
    from pathlib import Path

    import lmdb

    from services.registry import Kind, service_names
    from shared.runtime import dlq, retention
    from shared.runtime.clock import utc_now
    from shared.runtime.files import write_atomic, write_new
    from shared.runtime.messages import json_encode
    from shared.runtime.store import Store, StoreError

    stages = service_names(Kind.STAGE)
    if args.stage is not None and args.stage not in stages:
        raise _user_error(f"--stage {args.stage!r} is not a pipeline stage; one of: {', '.join(stages)}")
    out = Path(args.out)
    if out.exists():
        raise _user_error(f"{out} exists: give a new file name (an export never overwrites one)")
    lines: list[bytes] = []
    marks: dict[str, int] = {}
    for stage in [args.stage] if args.stage else stages:
        path = config.stage_dir(stage)
        if not (path / "data.mdb").exists():
            continue
        try:
            store = Store(path, (dlq.DLQ,), readonly=True)
        except (StoreError, lmdb.Error):
            continue  # a store without a DLQ table: nothing to export
        try:
            rows = dlq.rows(store)
        finally:
            store.close()
        for row_id, raw in rows:  # a row is a JSON object naming its stage: the id goes in front
            lines.append(b'{"dlq_id":' + str(row_id).encode() + (b"," + raw[1:] if raw != b"{}" else b"}") + b"\n")
        if rows:
            marks[stage] = rows[-1][0]
    try:
        write_new(out, b"".join(lines))
    except FileExistsError:
        raise _user_error(f"{out} exists: give a new file name (an export never overwrites one)") from None
    except OSError as exc:
        raise _user_error(f"cannot write {out}: {exc.strerror}; check the directory exists and has room") from None
    at = utc_now()
    for stage, through in marks.items():
        write_atomic(config.stage_dir(stage) / retention.DLQ_EXPORTED_FILE,
                     json_encode(retention.ExportedMark(through, at)))
    print(f"exported {len(lines)} DLQ rows to {out}"
          + (f"; marked exported: {', '.join(f'{s} up to id {n}' for s, n in marks.items())}" if marks else ""))
    return 0
