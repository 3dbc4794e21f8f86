"""MCC operator accounts: `$MRO_DATA_DIR/mcc/users`, one `name:$7$...` line each (mode 0600).

Kept like the broker's password file (the same PBKDF2-HMAC-SHA512 `$7$` hash,
`services.broker.credentials`), but with many more rounds: an operator may choose the
password, so it needs key stretching that a random 256-bit device password does not.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from services.broker.credentials import hash_password, verify_password
from shared.runtime.files import write_atomic

OPERATOR_ITERATIONS = 210_000  # OWASP's figure for PBKDF2-HMAC-SHA512
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MIN_PASSWORD = 12


class UserError(ValueError):
    """A bad name or password, or an unreadable users file; the message says which."""


def users_path(data_dir: Path) -> Path:
    return data_dir / "mcc" / "users"


def load(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    users: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, stored = line.strip().partition(":")
        if sep and NAME_RE.match(name):
            users[name] = stored
    return users


def add_user(path: Path, name: str, password: str | None = None) -> str:
    """Add (or reset) `name`; returns the password (made here when none is given)."""
    if not NAME_RE.match(name):
        raise UserError(f"operator name {name[:64]!r} must be 1-64 of A-Z a-z 0-9 _ . - (starting with a letter "
                        "or digit)")
    if password is None:
        password = secrets.token_urlsafe(18)
    elif len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")
    users = load(path)
    users[name] = hash_password(password, iterations=OPERATOR_ITERATIONS)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, "".join(f"{n}:{h}\n" for n, h in sorted(users.items())).encode(), mode=0o600)
    return password


def check(path: Path, name: str, password: str) -> bool:
    stored = load(path).get(name)
    if stored is None:
        verify_password(password, hash_password("", iterations=OPERATOR_ITERATIONS))  # same time either way
        return False
    return verify_password(password, stored)
