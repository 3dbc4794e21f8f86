"""`mro-edge session open|close|list` and `mro-edge reads list|assign|raw`: work sessions at places
on the hangar floor, the raw reads no session took, and the bytes a device sent for a record.

Ingest owns the sessions and the unassigned reads (`services.ingest.sessions`): these commands
never open its store, they send a command on `mro/<station>/pipeline/sessions` with the
service credentials and wait for ingest's reply, as `mro-edge schema` does with validate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
from pathlib import Path

from mro_edge.commands_schema import ANSWER_TIMEOUT_S, _ask, _user_error


def register(subparsers) -> None:
    session = subparsers.add_parser("session", help="work sessions: what turns a raw device read into a record")
    session.set_defaults(command_group="session")
    ssub = session.add_subparsers(dest="action", required=True)
    opening = ssub.add_parser("open", help="open a work session at a place ([places.<id>] in edge.toml)")
    opening.add_argument("--place", required=True, help="the place id (a bay or station)")
    opening.add_argument("--work-order", required=True, help="work order id")
    opening.add_argument("--registration", required=True, help="aircraft registration, e.g. N327HA")
    opening.add_argument("--aircraft-serial", required=True, help="aircraft serial number (MSN)")
    opening.add_argument("--aircraft-type", help="aircraft type, e.g. A320-214")
    opening.add_argument("--ata", required=True, help="ATA chapter, e.g. 32 or 32-41")
    opening.add_argument("--cert-no", required=True, help="the technician's certificate number")
    opening.add_argument("--cert-kind", required=True, help="the technician's certificate kind, e.g. FAA-AP")
    opening.add_argument("--action", dest="action_kind", required=True, choices=("receive", "install", "remove"),
                         help="what a part read means: receive into stores, install, remove")
    opening.add_argument("--position", help="aircraft position (install/remove), e.g. 'LH MLG'")
    opening.add_argument("--removal-reason", choices=("SCHEDULED", "UNSCHEDULED", "ROBBERY", "MODIFICATION"),
                         help="required with --action remove")
    opening.add_argument("--condition", help="part condition recorded (default SERVICEABLE; "
                                             "UNSERVICEABLE for remove)")
    _common(opening)
    closing = ssub.add_parser("close", help="close the work session open at a place")
    closing.add_argument("--place", required=True)
    _common(closing)
    _common(ssub.add_parser("list", help="open work sessions, and how many reads are unassigned"))

    reads = subparsers.add_parser("reads", help="raw device reads no work session took (never dropped)")
    reads.set_defaults(command_group="reads")
    rsub = reads.add_subparsers(dest="action", required=True)
    _common(rsub.add_parser("list", help="unassigned reads: id, device, place, part, why"))
    assign = rsub.add_parser("assign", help="make an unassigned read a record of an open session")
    assign.add_argument("read_id")
    assign.add_argument("--place", help="the place whose open session takes it (default: the read's own)")
    _common(assign)
    raw = rsub.add_parser("raw", help="the bytes a device sent, by the SHA-256 a ledger entry's notes name "
                                      "(`raw sha256 <hex>`, or a torque record's `telegram SHA-256 <hex>`)")
    raw.add_argument("sha256", help="64 hexadecimal digits")
    raw.add_argument("--out", required=True, help="file to write the bytes to (`-`: standard output)")
    _common(raw)


def _common(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print ingest's answer as JSON")
    parser.add_argument("--timeout", type=float, default=ANSWER_TIMEOUT_S, help="seconds to wait for the answer")
    parser.set_defaults(func=cmd_sessions)


def command_of(args) -> dict:
    """The command document a CLI invocation sends to ingest."""
    if args.command_group == "reads":
        if args.action == "list":
            return {"command": "reads_list"}
        if args.action == "raw":
            return {"command": "reads_raw", "sha256": args.sha256.lower()}
        command = {"command": "reads_assign", "read_id": args.read_id}
        if args.place:
            command["place"] = args.place
        return command
    if args.action == "open":
        aircraft = {"registration": args.registration, "serial_number": args.aircraft_serial}
        if args.aircraft_type:
            aircraft["type"] = args.aircraft_type
        command = {"command": "open", "place": args.place, "work_order_id": args.work_order, "aircraft": aircraft,
                   "ata": args.ata, "technician": {"cert_no": args.cert_no, "cert_kind": args.cert_kind},
                   "part_action": args.action_kind}
        for key, value in (("position", args.position), ("removal_reason", args.removal_reason),
                           ("condition", args.condition)):
            if value:
                command[key] = value
        return command
    if args.action == "close":
        return {"command": "close", "place": args.place}
    return {"command": "list"}


def cmd_sessions(config, args) -> int:
    from shared.runtime.topics import Topics

    command = command_of(args)
    if command["command"] == "open" and command["part_action"] == "remove" and "removal_reason" not in command:
        raise _user_error("--action remove needs --removal-reason (SCHEDULED, UNSCHEDULED, ROBBERY, MODIFICATION)")
    if command["command"] == "reads_raw" and not re.fullmatch(r"[0-9a-f]{64}", command["sha256"]):
        raise _user_error("SHA256 must be 64 hexadecimal digits, as a ledger entry's notes name it "
                          "(e.g. 'raw sha256 <hex> (zebra_iot_connector event)')")
    reply = _ask(config, command, lambda topics: topics.sessions, Topics.sessions_reply, args.timeout,
                 service="ingest", check="mro-edge session list")
    if command["command"] == "reads_raw" and reply.get("ok"):
        return _write_raw(reply, command["sha256"], args.out, args.json)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        _print(command["command"], reply)
    return 0 if reply.get("ok") else 1


def _write_raw(reply: dict, digest: str, out: str, as_json: bool) -> int:
    """Write the payload ingest sent back, after checking it hashes to what was asked for."""
    payload = base64.b64decode(reply.get("base64", ""))
    if hashlib.sha256(payload).hexdigest() != digest:
        raise _user_error(f"ingest answered {len(payload)} bytes whose SHA-256 is not {digest}: nothing written; "
                          "report this (the raw_payloads table may be damaged)")
    if out == "-":
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
    else:
        Path(out).write_bytes(payload)
    summary = {"ok": True, "sha256": digest, "bytes": len(payload), "out": out}
    print(json.dumps(summary) if as_json else f"wrote {len(payload)} bytes to {out}: sha256 {digest} "
          "(check with sha256sum)", file=sys.stderr if out == "-" else sys.stdout)
    return 0


def _print(command: str, reply: dict) -> None:
    if not reply.get("ok"):
        print(f"refused: {reply.get('message', '')}", file=sys.stderr)
        return
    if command == "list":
        sessions = reply.get("sessions", [])
        for s in sessions:
            print(f"{s['place']:<12} {s['session_id']}  WO {s['work_order_id']}  {s['aircraft']['registration']}  "
                  f"ATA {s['ata']}  {s['part_action']}  by {s['technician']['cert_no']}  since {s['at']}")
        print(f"{len(sessions)} open session(s); {reply.get('unassigned', 0)} unassigned read(s) "
              "(mro-edge reads list)")
    elif command == "reads_list":
        for r in reply.get("reads", []):
            part = f"{r['cage']}/{r['part_number']}/{r['serial']}" if r.get("cage") else "-"
            flag = "" if r["assignable"] else "  (cannot be assigned)"
            print(f"{r['read_id']}  {r['device_kind']}/{r['device_id']}  place {r['place'] or '-'}  "
                  f"{part}  {r['reason']}  {r['received_at']}{flag}")
        print(f"{reply.get('total', 0)} unassigned read(s)")
    else:
        print(reply.get("message", ""))
