"""MCC operator logins (services/mcc/users.py) and sessions (services/mcc/web.py)."""

from __future__ import annotations

import pytest

from services.mcc import users
from services.mcc.web import MAX_SESSIONS, Sessions


def test_a_user_is_kept_as_a_pbkdf2_hash_in_a_0600_file(tmp_path) -> None:
    path = users.users_path(tmp_path)
    made = users.add_user(path, "alice")
    assert len(made) >= 20 and made not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith(f"alice:$7${users.OPERATOR_ITERATIONS}$")
    assert users.check(path, "alice", made)
    assert not users.check(path, "alice", made + "x") and not users.check(path, "bob", made)
    users.add_user(path, "alice", "a new password of mine")  # a reset replaces the hash
    assert users.check(path, "alice", "a new password of mine") and not users.check(path, "alice", made)


@pytest.mark.parametrize(("name", "password", "says"), [
    ("bad name", None, "operator name"), ("x" * 65, None, "operator name"), ("alice", "short", "at least 12"),
])
def test_bad_names_and_short_passwords_are_refused(tmp_path, name, password, says) -> None:
    with pytest.raises(users.UserError, match=says):
        users.add_user(users.users_path(tmp_path), name, password)


def test_sessions_expire_and_stay_bounded() -> None:
    sessions = Sessions(hours=1)
    tokens = [sessions.open(f"op{i}") for i in range(MAX_SESSIONS + 5)]
    assert sessions.user(tokens[0]) is None and sessions.user(tokens[-1]) == f"op{MAX_SESSIONS + 4}"
    sessions.close(tokens[-1])
    assert sessions.user(tokens[-1]) is None and sessions.user(None) is None
    expired = Sessions(hours=-1)
    assert expired.user(expired.open("op")) is None
