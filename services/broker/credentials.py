"""Broker credentials: one Mosquitto password file and one Mosquitto ACL file for both brokers.

Mosquitto reads the two files natively (`password_file`, `acl_file`, re-read on SIGHUP); the
embedded broker reads the very same files through this module. So there is one source of
truth and access control cannot drift between the brokers.

Nobody is anonymous. The ACL this module writes:

    pattern read mro/<station>/receipt/%u        # every user reads only its own receipts
    user mro-services
    topic readwrite mro/#                        # the pipeline services
    user <device_id>
    topic write mro/<station>/in/<kind>/<device_id>

A device can publish to exactly one topic, fixed to its registered kind and to its own id, so
it cannot pose as another device or another kind. The files are generated: hand edits to the
ACL are overwritten on the next change; extra users added to the password file with
`mosquitto_passwd` are kept.

Semantics follow Mosquitto 2.0 (src/security_default.c): a publish needs `write` and a delivery
needs `read` on a matching line (user lines first, then patterns with %u/%c substituted; `deny`
lines win); SUBSCRIBE itself is never refused by the ACL file, a message only reaches a
subscriber whose read access covers its topic.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.runtime.files import write_atomic
from shared.runtime.topics import ALL_DEVICE_KINDS

SERVICE_USER = "mro-services"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Mosquitto 2 "$7$" hashes: PBKDF2-HMAC-SHA512, base64 salt and key. 101 rounds is what
# mosquitto_passwd writes; every password here is 256 random bits (secrets.token_urlsafe(32)),
# so key stretching would add nothing but CPU on each CONNECT.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12

READ = 1
WRITE = 2
DENY = 0
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}


class CredentialsError(ValueError):
    """A device id, kind, station or credentials file is invalid; the message says which."""


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 `$7$` password hash (what `mosquitto_passwd` writes)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches a `$7$` hash; any other or malformed hash never matches."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(key, expected)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching as `mosquitto_topic_matches_sub` does it (`a/#` also matches `a`)."""
    levels = topic_filter.split("/")
    parts = topic.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            return index == len(levels) - 1
        if index >= len(parts) or (level != "+" and level != parts[index]):
            return False
    return len(levels) == len(parts)


def valid_filter(topic_filter: str) -> bool:
    """A well-formed subscription filter: `+` and `#` fill whole levels, `#` only last."""
    if not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


@dataclass(frozen=True)
class AclRule:
    access: int
    topic: str


@dataclass
class Acl:
    """A parsed Mosquitto ACL file, evaluated the way Mosquitto 2.0 evaluates it."""

    users: dict[str | None, list[AclRule]] = field(default_factory=dict)
    patterns: list[AclRule] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, source: str = "acl") -> Acl:
        acl = cls()
        user: str | None = None
        device_line = re.compile(r"^mro/[^/]+/in/([^/]+)/([^/]+)$")
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user":
                if not rest:
                    raise CredentialsError(f"{source}:{number}: `user` without a name")
                user = rest
                continue
            if keyword not in ("topic", "pattern") or not rest:
                raise CredentialsError(f"{source}:{number}: cannot parse {line!r}")
            rule = _parse_rule(rest, f"{source}:{number}")
            if keyword == "pattern":
                acl.patterns.append(rule)
                continue
            acl.users.setdefault(user, []).append(rule)
            match = device_line.match(rule.topic)
            if user is not None and rule.access == WRITE and match and match.group(2) == user:
                acl.devices[user] = match.group(1)
        return acl

    def allows(self, username: str | None, client_id: str | None, topic: str, access: int) -> bool:
        """Mosquitto's `acl_check_default` for one publish (WRITE) or delivery (READ)."""
        own = self.users.get(username, [])
        if not own and not self.patterns:
            return False
        for rules, expand in ((own, False), (self.patterns, True)):
            if expand and any(c in value for value in (username or "", client_id or "") for c in "+#"):
                return False
            ordered = [r for r in rules if r.access == DENY] + [r for r in rules if r.access != DENY]
            for rule in ordered:
                pattern = _expanded(rule.topic, username, client_id) if expand else rule.topic
                if pattern is None or (topic.startswith("$") and not pattern.startswith("$")):
                    continue
                if topic_matches(pattern, topic):
                    if rule.access == DENY:
                        return False
                    if rule.access & access:
                        return True
        return False


def _parse_rule(rest: str, where: str) -> AclRule:
    """`[read|write|readwrite|deny] <topic>` after `topic` or `pattern`; no access word means readwrite."""
    access_word, _, topic = rest.partition(" ")
    if topic.strip():
        if access_word not in _ACCESS:
            raise CredentialsError(f"{where}: unknown access {access_word!r}")
        access, topic = _ACCESS[access_word], topic.strip()
    else:
        access, topic = READ | WRITE, access_word
    if not valid_filter(topic):
        raise CredentialsError(f"{where}: invalid ACL topic {topic!r}")
    return AclRule(access, topic)


def _expanded(pattern: str, username: str | None, client_id: str | None) -> str | None:
    """A `pattern` rule's topic with %u and %c filled in; None when it names one the client lacks."""
    if ("%u" in pattern and username is None) or ("%c" in pattern and client_id is None):
        return None
    return pattern.replace("%u", username or "").replace("%c", client_id or "")


_FileSig = tuple[int, int, int] | None
_UNKNOWN_USER_HASH = hash_password(secrets.token_urlsafe(32))


class BrokerCredentials:
    """The broker's users and ACL under `$MRO_DATA_DIR/broker/` (0700; files 0600).

    Writers hold an exclusive lock on `broker_dir/.lock` and replace each file atomically
    (temp file, fsync, rename, fsync of the directory), so a broker reloading at any moment
    reads either the old or the new file, never half of one. Readers re-read a file whenever
    its inode, size or mtime changed, so the embedded broker follows `devices add` without a
    restart, like Mosquitto does on SIGHUP.
    """

    def __init__(self, broker_dir: Path, station: str) -> None:
        if not ID_RE.match(station):
            raise CredentialsError(f"station {station!r} must match {ID_RE.pattern}")
        self.broker_dir = Path(broker_dir)
        self.station = station
        self.broker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.broker_dir, 0o700)
        self.passwd_path = self.broker_dir / "passwd"
        self.acl_path = self.broker_dir / "acl"
        self.secret_path = self.broker_dir / "service.secret"
        self._lock_path = self.broker_dir / ".lock"
        self._passwd: tuple[_FileSig, dict[str, str]] = (None, {})
        self._acl: tuple[_FileSig, Acl] = (None, Acl())

    # ---- administration -------------------------------------------------------------

    def ensure_service_user(self) -> tuple[str, str]:
        """(user, password) of the services; made once, kept in `service.secret` (0600)."""
        with self._locked():
            password = self._read_secret()
            if password is None:
                password = secrets.token_urlsafe(32)
                self._write_atomic(self.secret_path, password + "\n")
            users = dict(self._load_passwd())
            if not verify_password(password, users.get(SERVICE_USER, "")):
                users[SERVICE_USER] = hash_password(password)
            self._write_acl(self._load_acl().devices)
            self._write_passwd(users)
        return SERVICE_USER, password

    def add_device(self, device_id: str, kind: str) -> tuple[str, str]:
        """Register (or re-register: the old password stops working) a device; returns its login."""
        self._check_device_id(device_id)
        if kind not in ALL_DEVICE_KINDS:
            raise CredentialsError(f"device kind {kind!r} must be one of {', '.join(ALL_DEVICE_KINDS)}")
        password = secrets.token_urlsafe(32)
        with self._locked():
            devices = dict(self._load_acl().devices)
            devices[device_id] = kind
            # ACL before password: the device can never log in without its rule in place.
            self._write_acl(devices)
            users = dict(self._load_passwd())
            users[device_id] = hash_password(password)
            self._write_passwd(users)
        return device_id, password

    def remove_device(self, device_id: str) -> None:
        """Forget a device: its login and its ACL lines (unknown ids are ignored)."""
        self._check_device_id(device_id)
        with self._locked():
            users = dict(self._load_passwd())
            if users.pop(device_id, None) is not None:
                self._write_passwd(users)
            devices = dict(self._load_acl().devices)
            if devices.pop(device_id, None) is not None:
                self._write_acl(devices)

    def devices(self) -> dict[str, str]:
        """Registered devices: id -> kind."""
        return dict(self._load_acl().devices)

    # ---- decisions (used by the embedded broker) -------------------------------------

    def check(self, username: str, password: str) -> bool:
        """True if the password file has `username` and `password` matches its hash."""
        stored = self._load_passwd().get(username)
        if stored is None:
            verify_password(password, _UNKNOWN_USER_HASH)  # same work as for a known user
            return False
        return verify_password(password, stored)

    def may_publish(self, username: str, topic: str, client_id: str | None = None) -> bool:
        if not topic or any(c in topic for c in "+#\0"):
            return False
        return self._load_acl().allows(username, client_id, topic, WRITE)

    def may_receive(self, username: str, topic: str, client_id: str | None = None) -> bool:
        """May a message on `topic` be delivered to this user (Mosquitto's READ check)."""
        return self._load_acl().allows(username, client_id, topic, READ)

    def may_subscribe(self, username: str, topic_filter: str, client_id: str | None = None) -> bool:
        """Mosquitto 2.0 accepts every well-formed SUBSCRIBE of a known user; reading is
        enforced per delivered message by `may_receive`, so a filter wider than the user's
        rights simply delivers only what the user may read."""
        return valid_filter(topic_filter) and username in self._load_passwd()

    def file_state(self) -> tuple[_FileSig, _FileSig]:
        """Identity of the files on disk now; changes whenever either file is replaced."""
        return _signature(self.passwd_path), _signature(self.acl_path)

    # ---- internals ------------------------------------------------------------------

    def _check_device_id(self, device_id: str) -> None:
        if not ID_RE.match(device_id):
            raise CredentialsError(f"device id {device_id!r} must match {ID_RE.pattern}")
        if device_id == SERVICE_USER:
            raise CredentialsError(f"device id {device_id!r} is reserved for the services")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_secret(self) -> str | None:
        try:
            value = self.secret_path.read_text().strip()
        except FileNotFoundError:
            return None
        return value or None

    def _load_passwd(self) -> dict[str, str]:
        sig, users = self._passwd
        if sig is None or sig != _signature(self.passwd_path):
            loaded = _read_with_signature(self.passwd_path)
            users = _parse_passwd(loaded[1]) if loaded else {}
            self._passwd = (loaded[0] if loaded else None, users)
        return users

    def _load_acl(self) -> Acl:
        sig, acl = self._acl
        if sig is None or sig != _signature(self.acl_path):
            loaded = _read_with_signature(self.acl_path)
            acl = Acl.parse(loaded[1], str(self.acl_path)) if loaded else Acl()
            self._acl = (loaded[0] if loaded else None, acl)
        return acl

    def _write_passwd(self, users: dict[str, str]) -> None:
        self._write_atomic(self.passwd_path, "".join(f"{u}:{h}\n" for u, h in users.items()))

    def _write_acl(self, devices: dict[str, str]) -> None:
        root = f"mro/{self.station}"
        lines = [
            "# Generated by mro-edge (services/broker/credentials.py); changes are overwritten.",
            "# Read by Mosquitto (acl_file) and by the embedded broker alike.",
            "",
            "# Every user reads its own receipts only.",
            f"pattern read {root}/receipt/%u",
            "",
            "# The pipeline services.",
            f"user {SERVICE_USER}",
            "topic readwrite mro/#",
        ]
        for device_id in sorted(devices):
            lines += ["", f"user {device_id}", f"topic write {root}/in/{devices[device_id]}/{device_id}"]
        self._write_atomic(self.acl_path, "\n".join(lines) + "\n")

    def _write_atomic(self, path: Path, text: str) -> None:
        """Replace `path` with `text` (0600) unless it already holds exactly that."""
        with contextlib.suppress(FileNotFoundError):
            if path.read_text(encoding="utf-8") == text:
                return
        write_atomic(path, text.encode())


def _parse_passwd(text: str) -> dict[str, str]:
    """`user:hash` lines as Mosquitto splits them (first and second `:`-separated field)."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        username, _, rest = line.strip().partition(":")
        if username and not username.startswith("#"):
            users[username] = rest.split(":", 1)[0]
    return users


def _signature(path: Path) -> _FileSig:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_with_signature(path: Path) -> tuple[_FileSig, str] | None:
    """The file's text and the identity of exactly the file that was read."""
    try:
        with open(path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            return (st.st_ino, st.st_size, st.st_mtime_ns), f.read()
    except FileNotFoundError:
        return None


def reload_mosquitto(pid_file: Path | None) -> bool:
    """SIGHUP the Mosquitto named by `pid_file` so it re-reads password and ACL files
    (and drops connected clients whose password no longer matches). False if there is no
    such process; in compose use `docker compose kill -s SIGHUP mosquitto` instead."""
    if pid_file is None:
        return False
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False
    return True
