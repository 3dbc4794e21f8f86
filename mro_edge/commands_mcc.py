"""`mro-edge mcc user add NAME`: an operator login for the MCC status page (services/mcc)."""

from __future__ import annotations

import sys

from services.mcc.users import UserError, add_user, users_path
from shared.runtime.config import Config


def cmd_mcc_user_add(config: Config, args) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    path = users_path(config.data_path)
    try:
        made = add_user(path, args.name, password)
    except UserError as exc:
        print(f"mro-edge mcc user add: {exc}", file=sys.stderr)
        return 2
    if password is None:
        print(made)  # shown once, here only: the file keeps a PBKDF2 hash
        print(f"operator {args.name} added ({path}); the password above is not shown again", file=sys.stderr)
    else:
        print(f"operator {args.name} added ({path})", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    mcc = subparsers.add_parser("mcc", help="maintenance control's status page")
    msub = mcc.add_subparsers(dest="action", required=True)
    user = msub.add_parser("user", help="operator logins of the status page")
    usub = user.add_subparsers(dest="user_action", required=True)
    add = usub.add_parser("add", help="add an operator (or set a new password); prints a new password once")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password (12 characters or more) from the first line of stdin instead")
    add.set_defaults(func=cmd_mcc_user_add)
