"""Broker credentials: one Mosquitto password file and one Mosquitto ACL file for both brokers.

Mosquitto reads the two files natively (`password_file`, `acl_file`, re-read on SIGHUP); the
embedded broker reads the very same files through this module. So there is one source of
truth and access control cannot drift between the brokers.

Nobody is anonymous, and nobody is a superuser. The ACL this module writes:

    pattern read mro/<station>/receipt/%u        # every user reads only its own receipts
    user mro-ingest                              # one user per service (SERVICE_ACL) ...
    topic read mro/<station>/in/+/+
    topic write mro/<station>/pipeline/validate  # ... with exactly the topics its code uses
    ...
    user <device_id>
    topic write mro/<station>/in/<kind>/<device_id>

A device can publish to exactly one topic, fixed to its registered kind and to its own id, so
it cannot pose as another device or another kind. Each service can publish only what its code
publishes: only validate may feed `pipeline/sign`, only the stages that settle a record may
send device receipts and outcomes, only the operator may send control, schema and registry
commands. Service passwords are 256 random bits, one file per service (0600) at
`$MRO_DATA_DIR/secrets/<service>/password`, never printed; each process reads only its own.

Client ids: ids starting with `mro-` belong to the services, each service's own ids
(`mro-<station>-<client>`, and the tagged `mro-<station>-<client>-<tag>` it connects with) to
its own user alone. This module writes that binding as a third file, `clientids`, beside the
password file and the ACL; the embedded broker checks it (`owns_client_id`) and Mosquitto 2.0,
which would let any authenticated user take over any client id, loads the mro_clientid plugin
(deploy/mosquitto/plugin/) that refuses the CONNECT before any session is touched. The tag,
derived from the service's own password (`service_client_id`), stays as a second line of
defence for a Mosquitto run without the plugin. The files are generated: hand edits to the
ACL and `clientids` are overwritten on the next change; extra users added to the password file
with `mosquitto_passwd` are kept.

Semantics follow Mosquitto 2.0 (src/security_default.c): a publish needs `write` and a delivery
needs `read` on a matching line (user lines first, then patterns with %u/%c substituted; `deny`
lines win); SUBSCRIBE itself is never refused by the ACL file, a message only reaches a
subscriber whose read access covers its topic.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import re
import secrets
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.registry import SERVICES
from shared.runtime.files import write_atomic
from shared.runtime.topics import ALL_DEVICE_KINDS

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always matched whole (fullmatch)
RESERVED_PREFIX = "mro-"  # user names and client ids of the box's own services
LEGACY_SERVICE_USER = "mro-services"  # the superuser every service shared before; removed on init

# Mosquitto 2 "$7$" hashes: PBKDF2-HMAC-SHA512, base64 salt and key. mosquitto_passwd 2.0 writes
# 101 rounds, fine for our 256-bit random passwords but weak for a human-chosen one; Mosquitto
# verifies whatever count the hash names. Cost is paid on every CONNECT, with a right or wrong
# password, on Mosquitto's one thread: 50,000 rounds are ~40 ms here (2 cores, unloaded; 100,000
# were ~80 ms, and a connect flood with a known user name would buy that much broker time per
# attempt). The embedded broker remembers successful checks (`check`).
PBKDF2_ITERATIONS = 50_000
SALT_BYTES = 12
_VERIFIED_MAX = 4096  # remembered successful checks (embedded broker)

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
    bridged: dict[str, list[str]] = field(default_factory=dict)  # bridging service -> device ids

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
            elif (user is not None and rule.access == WRITE and match
                  and BRIDGING.get(user.removeprefix(RESERVED_PREFIX)) == match.group(1)):
                acl.bridged.setdefault(user.removeprefix(RESERVED_PREFIX), []).append(match.group(2))
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


@functools.cache
def _unknown_user_hash() -> str:
    """A hash no password matches, made on first use (its rounds are not paid at import)."""
    return hash_password(secrets.token_urlsafe(32))


# Every client of the box that is not a device, and what its code publishes and reads
# (shared/runtime/stage.py, delivery.py, the stages, heartbeat, the supervisor, the CLI).
# Topics are relative to mro/<station>/. A stage reads its input, its stage receipts and its
# control topic; writes its downstream input, receipts to its upstream, its DLQ, status, alarms.
SERVICE_ACL: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (read, write)
    "ingest": (("in/+/+", "pipeline/receipt/ingest", "pipeline/control/ingest", "pipeline/outcome",
                "pipeline/sessions", "pipeline/retention"),
               ("pipeline/validate", "receipt/+", "dlq/ingest", "pipeline/sessions/reply/+", "status/ingest",
                "alarm")),
    "validate": (("pipeline/validate", "pipeline/receipt/validate", "pipeline/control/validate",
                  "pipeline/control/validate/redrive", "pipeline/schema", "pipeline/registry",
                  "pipeline/outcome", "pipeline/retention"),
                 ("pipeline/sign", "pipeline/receipt/ingest", "pipeline/outcome", "receipt/+", "dlq/validate",
                  "pipeline/schema/reply/+", "pipeline/registry/reply/+", "pipeline/control/validate/redrive/reply/+",
                  "status/validate", "alarm")),
    "sign": (("pipeline/sign", "pipeline/receipt/sign", "pipeline/control/sign", "pipeline/retention"),
             ("pipeline/uplink", "pipeline/receipt/validate", "pipeline/outcome", "receipt/+", "dlq/sign",
              "status/sign", "alarm")),
    "uplink": (("pipeline/uplink", "pipeline/receipt/uplink", "pipeline/control/uplink", "status/connectivity"),
               ("pipeline/receipt/sign", "pipeline/retention", "dlq/uplink", "status/uplink", "alarm")),
    "heartbeat": (("status/uplink", "status/connectivity"), ("status/connectivity", "status/heartbeat", "alarm")),
    # the Open Protocol bridge: publishes for the torque controllers (a kind no device may be
    # registered as) and reads the receipts that say their results are durable, each only for
    # the controllers it is configured for (BRIDGING, `set_bridged`)
    "torque": ((), ("status/torque",)),
    # `mro-edge run`'s monitor: every status and alarm; its own status and that of a hung child
    "supervisor": (("status/+", "alarm"),
                   ("status/supervisor", "status/broker", "status/gateway", "status/ingest", "status/validate",
                    "status/sign", "status/uplink", "status/heartbeat", "status/torque", "status/simulator",
                    "alarm")),
    # the operator's commands (status, resume, schema, registry push, the banner's watch lines,
    # the anonymous-broker probe of `mro-edge run`)
    "operator": (("status/+", "alarm", "dlq/+", "receipt/+", "in/+/+", "pipeline/schema/reply/+",
                  "pipeline/registry/reply/+", "pipeline/control/validate/redrive/reply/+",
                  "pipeline/sessions/reply/+"),
                 ("pipeline/control/+", "pipeline/control/validate/redrive", "pipeline/schema", "pipeline/registry",
                  "pipeline/sessions")),
    # the MCC status page and /metrics (services/mcc): it only reads
    "mcc": (("status/+", "dlq/+", "alarm", "receipt/+"), ()),
    # Mosquitto's container health check: it logs in and subscribes, it may read and write nothing
    "health": ((), ()),
}
SERVICE_NAMES = tuple(SERVICE_ACL)
# Services that publish for devices which do not speak MQTT, and the kind they publish as. Their
# ACL names each configured device id (`BrokerCredentials.set_bridged`), never a wildcard:
#   topic write mro/<station>/in/<kind>/<id>     topic read mro/<station>/receipt/<id>
BRIDGING = {"torque": "torque_controller"}
# client ids (as mro-<station>-<client>-<tag>) and the service that owns each: the registry's
# `mqtt_clients`, and the supervisor's monitor
CLIENT_OWNERS = {client: service.name for service in SERVICES for client in service.mqtt_clients}
CLIENT_OWNERS["supervisor"] = "supervisor"
if _unlisted := set(CLIENT_OWNERS.values()) - set(SERVICE_ACL):
    raise RuntimeError(f"services {sorted(_unlisted)} connect to the broker but have no SERVICE_ACL entry")


def service_user(service: str) -> str:
    """The broker user of one of the box's services (SERVICE_ACL)."""
    if service not in SERVICE_ACL:
        raise CredentialsError(f"unknown service {service!r}: one of {', '.join(SERVICE_NAMES)}")
    return RESERVED_PREFIX + service


SERVICE_USERS = frozenset(service_user(name) for name in SERVICE_NAMES)


def client_id_owners(station: str) -> dict[str, str]:
    """`mro-<station>-<client>` -> the service user that alone may connect with it or with any
    id starting with it and a '-' (the tagged ids): what the `clientids` file says."""
    return {f"{RESERVED_PREFIX}{station}-{client}": service_user(owner) for client, owner in CLIENT_OWNERS.items()}


@dataclass(frozen=True)
class ClientIdOwners:
    """A parsed `clientids` file: the service users, and each service client id's owner.

    Lines are `service <user>` and `client <client id> <user>`; `#` starts a comment. The C
    plugin (deploy/mosquitto/plugin/mro_clientid.c) reads the same format the same way."""

    services: frozenset[str] = frozenset()
    owners: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str, source: str = "clientids") -> ClientIdOwners:
        services: set[str] = set()
        owners: list[tuple[str, str]] = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "service" and len(words) == 2:
                services.add(words[1])
            elif words[0] == "client" and len(words) == 3:
                owners.append((words[1], words[2]))
            else:
                raise CredentialsError(f"{source}:{number}: expected `service <user>` or "
                                       f"`client <client id> <user>`, got {line.strip()!r}")
        return cls(frozenset(services), tuple(owners))

    def allows(self, username: str | None, client_id: str) -> bool:
        """Ids outside `mro-` are anyone's; a reserved id needs a service user, and the owner
        of the longest `client` line it equals or extends with '-', if there is one."""
        if not client_id.startswith(RESERVED_PREFIX):
            return True
        if username is None or username not in self.services:
            return False
        matches = [(len(cid), owner) for cid, owner in self.owners
                   if client_id == cid or client_id.startswith(cid + "-")]
        return not matches or max(matches, key=lambda m: m[0])[1] == username  # first longest, as in C


def service_client_id(station: str, client: str, password: str) -> str:
    """`mro-<station>-<client>-<tag>`: the tag is derived from the service's own password, so the
    id is stable across restarts (the persistent session survives) and unguessable, a second line
    of defence behind the binding of the id to its user (`clientids`)."""
    tag = hmac.new(password.encode(), f"mro-edge client id {station}/{client}".encode(),
                   hashlib.sha256).hexdigest()[:16]
    return f"{RESERVED_PREFIX}{station}-{client}-{tag}"


def _check_id(what: str, value: str) -> None:
    """`value` matches ID_RE whole: `$` would also accept a trailing newline, which splits a line
    of the password file or the ACL."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise CredentialsError(f"{what} {value!r} is not valid: use 1 to 64 letters, digits, '_', '.' or '-', "
                               "starting with a letter or digit")


class BrokerCredentials:
    """The broker's users and ACL under `$MRO_DATA_DIR/broker/` (0700; files 0600), and the
    services' passwords, one file each, under `secrets_dir` (default `$MRO_DATA_DIR/secrets/`).

    Writers hold an exclusive lock on `broker_dir/.lock` and replace each file atomically
    (temp file, fsync, rename, fsync of the directory), so a broker reloading at any moment
    reads either the old or the new file, never half of one. Readers re-read a file whenever
    its inode, size or mtime changed, so the embedded broker follows `devices add` without a
    restart, like Mosquitto does on SIGHUP.
    """

    def __init__(self, broker_dir: Path, station: str, secrets_dir: Path | None = None) -> None:
        _check_id("station", station)
        self.broker_dir = Path(broker_dir)
        self.station = station
        self.broker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.broker_dir, 0o700)
        self.secrets_dir = Path(secrets_dir) if secrets_dir is not None else self.broker_dir.parent / "secrets"
        self.passwd_path = self.broker_dir / "passwd"
        self.acl_path = self.broker_dir / "acl"
        self.clientids_path = self.broker_dir / "clientids"
        self._lock_path = self.broker_dir / ".lock"
        self._passwd: tuple[_FileSig, dict[str, str]] = (None, {})
        self._acl: tuple[_FileSig, Acl] = (None, Acl())
        self._clientids: tuple[_FileSig, ClientIdOwners] = (None, ClientIdOwners())
        self._verified: dict[bytes, None] = {}

    # ---- administration -------------------------------------------------------------

    def secret_path(self, service: str) -> Path:
        """Where `service`'s password is kept (0600, in a 0700 directory of its own, so compose can
        mount each service's directory into its container alone): the one file it reads."""
        service_user(service)
        return self.secrets_dir / service / "password"

    def ensure_service_users(self) -> dict[str, str]:
        """Every service's user (SERVICE_ACL), its password file and the ACL; made once, kept.
        Returns service -> user name; the passwords stay in their files."""
        with self._locked():
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.secrets_dir, 0o700)
            users = dict(self._load_passwd())
            # the one shared superuser of earlier versions: its login and its secret go
            users.pop(LEGACY_SERVICE_USER, None)
            with contextlib.suppress(FileNotFoundError):
                (self.broker_dir / "service.secret").unlink()
            for service in SERVICE_NAMES:
                password = self._read_secret(service)
                if password is None:
                    self.secret_path(service).parent.mkdir(mode=0o700, exist_ok=True)
                    password = secrets.token_urlsafe(32)
                    self._write_atomic(self.secret_path(service), password + "\n")
                user = service_user(service)
                if not verify_password(password, users.get(user, "")):
                    users[user] = hash_password(password)
            self._write_acl(self._load_acl().devices)
            self._write_clientids()
            self._write_passwd(users)
        return {service: service_user(service) for service in SERVICE_NAMES}

    def set_bridged(self, service: str, device_ids: Iterable[str]) -> bool:
        """The device ids a bridging service (BRIDGING) publishes for: exactly these get its ACL
        lines; True when the ACL changed (Mosquitto then needs SIGHUP)."""
        if service not in BRIDGING:
            raise CredentialsError(f"{service!r} publishes for no devices: one of {', '.join(BRIDGING)}")
        wanted = sorted(set(device_ids))
        for device_id in wanted:
            self._check_device_id(device_id)
        with self._locked():
            acl = self._load_acl()
            if sorted(acl.bridged.get(service, [])) == wanted:
                return False
            self._write_acl(acl.devices, {**acl.bridged, service: wanted})
        return True

    def service_login(self, service: str) -> tuple[str, str]:
        """(user, password) of one service, making every service user first if need be."""
        password = self._read_secret(service)
        if password is None or service_user(service) not in self._load_passwd():
            self.ensure_service_users()
            password = self._read_secret(service)
        if password is None:
            raise CredentialsError(f"no password in {self.secret_path(service)}")
        return service_user(service), password

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
        """True if the password file has `username` and `password` matches its hash.

        A successful check is remembered (keyed by a hash of user, password and stored hash, so
        a changed password or file never matches a stale entry): a reconnecting client costs one
        SHA-256 instead of PBKDF2_ITERATIONS rounds. Failures are never remembered."""
        stored = self._load_passwd().get(username)
        if stored is None:
            verify_password(password, _unknown_user_hash())  # same work as for a known user
            return False
        key = hashlib.sha256("\0".join((username, password, stored)).encode()).digest()
        if key in self._verified:
            return True
        if not verify_password(password, stored):
            return False
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.pop(next(iter(self._verified)))
        self._verified[key] = None
        return True

    def owns_client_id(self, username: str, client_id: str) -> bool:
        """May `username` use `client_id`? As the `clientids` file says (ClientIdOwners.allows):
        ids starting with `mro-` belong to the services, a service's own ids to its user alone.
        Without a readable, well-formed file every `mro-` id is refused, as the Mosquitto plugin does."""
        return self._load_clientids().allows(username, client_id)

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
        _check_id("device id", device_id)
        if device_id.startswith(RESERVED_PREFIX):
            raise CredentialsError(f"device id {device_id!r} is not valid: ids starting with "
                                   f"{RESERVED_PREFIX!r} are reserved for the box's services")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_secret(self, service: str) -> str | None:
        try:
            value = self.secret_path(service).read_text().strip()
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

    def _load_clientids(self) -> ClientIdOwners:
        sig, owners = self._clientids
        if sig is None or sig != _signature(self.clientids_path):
            loaded = _read_with_signature(self.clientids_path)
            owners = ClientIdOwners()  # missing or malformed: every `mro-` id refused, as the plugin does
            if loaded:
                with contextlib.suppress(CredentialsError):
                    owners = ClientIdOwners.parse(loaded[1], str(self.clientids_path))
            self._clientids = (loaded[0] if loaded else None, owners)
        return owners

    def _write_clientids(self) -> None:
        lines = [
            "# Generated by mro-edge (services/broker/credentials.py); changes are overwritten.",
            "# Read by the embedded broker and by Mosquitto's mro_clientid plugin alike: client ids",
            f"# starting with {RESERVED_PREFIX} are for these service users only, and each client line's",
            "# id (and that id followed by '-' and a tag) for its owner alone.",
        ]
        lines += [f"service {user}" for user in sorted(SERVICE_USERS)]
        lines += [f"client {cid} {owner}" for cid, owner in client_id_owners(self.station).items()]
        self._write_atomic(self.clientids_path, "\n".join(lines) + "\n")

    def _write_passwd(self, users: dict[str, str]) -> None:
        self._write_atomic(self.passwd_path, "".join(f"{u}:{h}\n" for u, h in users.items()))

    def _write_acl(self, devices: dict[str, str], bridged: dict[str, list[str]] | None = None) -> None:
        """`bridged`: the device ids of each bridging service (None: those the ACL names now)."""
        bridged = self._load_acl().bridged if bridged is None else bridged
        root = f"mro/{self.station}"
        lines = [
            "# Generated by mro-edge (services/broker/credentials.py); changes are overwritten.",
            "# Read by Mosquitto (acl_file) and by the embedded broker alike.",
            "",
            "# Every user reads its own receipts only.",
            f"pattern read {root}/receipt/%u",
        ]
        for service, (reads, writes) in SERVICE_ACL.items():
            lines += ["", f"user {service_user(service)}"]
            lines += [f"topic read {root}/{topic}" for topic in reads]
            lines += [f"topic write {root}/{topic}" for topic in writes]
            for device_id in sorted(bridged.get(service, [])) if service in BRIDGING else ():
                _check_id("device id", device_id)
                lines += [f"topic write {root}/in/{BRIDGING[service]}/{device_id}",
                          f"topic read {root}/receipt/{device_id}"]
        for device_id in sorted(devices):
            _check_id("device id", device_id)
            _check_id("device kind", devices[device_id])
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
