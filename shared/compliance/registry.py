"""Registries the compliance rules judge against: technicians, aircraft, tools, life-limited parts.

Source of truth on disk is a directory (`config/registries/` by default) holding one file per
registry, TOML or JSON, each an array of tables under a singular key:

    technicians.toml          [[technician]]         keyed by cert_no
    aircraft.toml             [[aircraft]]           keyed by registration
    tools.toml                [[tool]]               keyed by serial_number
    life_limited_parts.toml   [[life_limited_part]]  keyed by part_number

On top of the files sits an *overlay*: the changes carried by authority-signed registry
updates (`shared.compliance.updates`), kept in the validate stage's LMDB. The effective
registry is "files, then overlay": an entry in the overlay replaces the file's entry with the
same key, or removes it (null).

`RegistrySource` re-reads the files when their mtime or size changes, looking at most once a
second, so an edited registry takes effect without a restart; a file that no longer parses is
refused and the previous registry stays in force (the caller alarms).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

import msgspec

from shared.contract.types import ATA_CHAPTERS, Action, CertKind

Privilege = Literal["maintain", "certify", "inspect", "rii"]
PRIVILEGES: tuple[str, ...] = get_args(Privilege)
ANY: Final = "*"

KINDS: dict[str, tuple[str, str]] = {
    # registry name -> (key in the file, key field of an entry)
    "technicians": ("technician", "cert_no"),
    "aircraft": ("aircraft", "registration"),
    "tools": ("tool", "serial_number"),
    "life_limited_parts": ("life_limited_part", "part_number"),
}
_SUFFIXES = (".toml", ".json")


class RegistryError(Exception):
    """A registry file or update is malformed; the message names the file and the entry."""


class _Entry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A registry entry: closed and immutable. Subclasses restate `frozen` (msgspec inherits it,
    type checkers only see it where it is written) and `kw_only` (which does not inherit)."""


class Certificate(_Entry, frozen=True, kw_only=True):
    """One certificate or licence category held: FAA mechanic certificates have no expiry
    (leave `expires` out); an IA expires on 31 March of odd years; a Part-66 licence after 5 years."""

    kind: CertKind
    issued: date
    expires: date | None = None

    def valid_on(self, day: date) -> bool:
        return self.issued <= day and (self.expires is None or day <= self.expires)


class Authorisation(_Entry, frozen=True, kw_only=True):
    """The repair station's authorisation of one person (company authorisation / certifying
    staff scope): which ATA chapters, which privileges, which maintenance actions, when."""

    chapters: list[str]
    privileges: list[Privilege]
    actions: list[Action | Literal["*"]] = msgspec.field(default_factory=lambda: [ANY])
    valid_from: date | None = None
    valid_until: date | None = None

    def valid_on(self, day: date) -> bool:
        return (self.valid_from is None or self.valid_from <= day) and (
            self.valid_until is None or day <= self.valid_until)

    def covers(self, chapter: str) -> bool:
        return ANY in self.chapters or chapter in self.chapters


class TechnicianEntry(_Entry, frozen=True, kw_only=True):
    cert_no: Annotated[str, msgspec.Meta(pattern=r"^[A-Z0-9][A-Z0-9-]{3,19}\Z")]
    name: str = ""
    status: Literal["active", "suspended"] = "active"
    status_since: date | None = None
    public_key: str | None = None  # Ed25519 raw public key, base64 (32 bytes)
    certificates: list[Certificate] = msgspec.field(default_factory=list)
    authorisations: list[Authorisation] = msgspec.field(default_factory=list)


class AircraftEntry(_Entry, frozen=True, kw_only=True):
    registration: str
    serial_number: str
    type: str
    registration_expires: date | None = None
    airworthiness_review_expires: date | None = None


class ToolEntry(_Entry, frozen=True, kw_only=True):
    serial_number: str
    description: str = ""
    calibrated_on: date | None = None
    calibration_due: date


class LifeLimitedPart(_Entry, frozen=True, kw_only=True):
    part_number: str
    description: str = ""
    limit_cycles: int | None = None
    limit_hours: int | None = None


ENTRY_TYPES: dict[str, type[_Entry]] = {
    "technicians": TechnicianEntry,
    "aircraft": AircraftEntry,
    "tools": ToolEntry,
    "life_limited_parts": LifeLimitedPart,
}


@dataclass(frozen=True, slots=True)
class Technician:
    """A technician entry compiled for fast judging."""

    entry: TechnicianEntry
    public_key: bytes | None
    certificates: dict[str, tuple[Certificate, ...]]

    @property
    def cert_no(self) -> str:
        return self.entry.cert_no

    def suspended_on(self, day: date) -> bool:
        if self.entry.status != "suspended":
            return False
        return self.entry.status_since is None or day >= self.entry.status_since

    def authorisations_on(self, day: date, chapter: str) -> list[Authorisation]:
        return [a for a in self.entry.authorisations if a.valid_on(day) and a.covers(chapter)]


@dataclass(frozen=True)
class Registry:
    technicians: dict[str, Technician] = field(default_factory=dict)
    aircraft: dict[str, AircraftEntry] = field(default_factory=dict)
    tools: dict[str, ToolEntry] = field(default_factory=dict)
    life_limited_parts: dict[str, LifeLimitedPart] = field(default_factory=dict)
    digest: str = ""

    @classmethod
    def build(cls, entries: dict[str, dict[str, dict]]) -> Registry:
        """From plain entries per registry name ({name: {key: entry dict}}); RegistryError if one is bad."""
        typed: dict[str, dict[str, Any]] = {}
        for name, (_, key_field) in KINDS.items():
            typed[name] = {}
            for key, raw in entries.get(name, {}).items():
                entry = convert_entry(name, raw, f"{name} {key!r}")
                if getattr(entry, key_field) != key:
                    raise RegistryError(f"{name} {key!r}: its {key_field} is {getattr(entry, key_field)!r}")
                typed[name][key] = entry
        technicians = {key: _compile_technician(entry) for key, entry in typed["technicians"].items()}
        digest = hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()
        return cls(technicians, typed["aircraft"], typed["tools"], typed["life_limited_parts"], digest)


def convert_entry(name: str, raw: Any, where: str) -> _Entry:
    try:
        return msgspec.convert(raw, ENTRY_TYPES[name])
    except msgspec.ValidationError as exc:
        raise RegistryError(f"{where}: {exc}") from None


def decode_public_key(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RegistryError(f"{where}: public_key is not base64") from None
    if len(raw) != 32:
        raise RegistryError(f"{where}: public_key must be a 32-byte Ed25519 key, got {len(raw)} bytes")
    return raw


def _compile_technician(entry: TechnicianEntry) -> Technician:
    where = f"technician {entry.cert_no!r}"
    key = decode_public_key(entry.public_key, where) if entry.public_key else None
    for auth in entry.authorisations:
        for chapter in auth.chapters:
            if chapter != ANY and chapter not in ATA_CHAPTERS:
                raise RegistryError(f"{where}: authorised chapter {chapter!r} is not an ATA chapter "
                                    f"(two digits, e.g. 32) or '*'")
    certificates: dict[str, list[Certificate]] = {}
    for cert in entry.certificates:
        certificates.setdefault(cert.kind, []).append(cert)
    return Technician(entry, key, {kind: tuple(certs) for kind, certs in certificates.items()})


# --- files --------------------------------------------------------------------------------------

def registry_files(directory: Path) -> dict[str, Path]:
    """The registry file of each name present in `directory` (TOML preferred over JSON)."""
    found = {}
    for name in KINDS:
        for suffix in _SUFFIXES:
            path = directory / f"{name}{suffix}"
            if path.is_file():
                found[name] = path
                break
    return found


def read_file_entries(directory: Path) -> dict[str, dict[str, dict]]:
    """Plain entries per registry name, keyed by their key field; RegistryError on any problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RegistryError(f"registry directory {directory} does not exist (set [compliance] registries_dir)")
    out: dict[str, dict[str, dict]] = {name: {} for name in KINDS}
    for name, path in registry_files(directory).items():
        array_key, key_field = KINDS[name]
        try:
            raw = path.read_bytes()
            document = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
            raise RegistryError(f"{path}: {exc}") from None
        items = document.get(array_key, []) if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise RegistryError(f"{path}: expected an array of tables [[{array_key}]]")
        for index, item in enumerate(items):
            key = item.get(key_field) if isinstance(item, dict) else None
            if not isinstance(key, str):
                raise RegistryError(f"{path}: entry {index} has no {key_field}")
            if key in out[name]:
                raise RegistryError(f"{path}: {key_field} {key!r} appears twice")
            out[name][key] = _plain(item)
    return out


def _plain(value: Any) -> Any:
    """TOML dates as ISO strings, so file entries and JSON updates look alike (and hash alike)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, date):
        return value.isoformat()
    return value


def merge(files: dict[str, dict[str, dict]], overlay: dict[str, Any] | None) -> dict[str, dict[str, dict]]:
    """Files with the overlay's replacements and removals (null) applied."""
    if not overlay:
        return files
    merged = {name: dict(entries) for name, entries in files.items()}
    for name in KINDS:
        for key, entry in (overlay.get(name) or {}).items():
            if entry is None:
                merged[name].pop(key, None)
            else:
                merged[name][key] = entry
    return merged


def load_registry(directory: Path, overlay: dict[str, Any] | None = None) -> Registry:
    return Registry.build(merge(read_file_entries(directory), overlay))


class RegistrySource:
    """The effective registry, rebuilt only when the files or the overlay changed.

    `current(overlay_serial, overlay_loader)` costs a clock read per call, plus a stat of each
    file at most every `check_every_s`.
    """

    def __init__(self, directory: Path, check_every_s: float = 1.0):
        self.directory = Path(directory)
        self.check_every_s = check_every_s
        self._files: dict[str, dict[str, dict]] | None = None
        self._fingerprint: tuple = ()
        self._next_check = 0.0
        self._overlay_serial: int | None = None
        self.registry = Registry()
        self.last_error: str | None = None

    def fingerprint(self) -> tuple:
        parts = []
        for name, path in sorted(registry_files(self.directory).items()):
            try:
                st = os.stat(path)
            except OSError:
                continue
            parts.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(parts)

    def load(self, overlay: dict[str, Any] | None) -> Registry:
        """First load: errors propagate (a stage must not start on a broken registry)."""
        self._fingerprint = self.fingerprint()
        self._files = read_file_entries(self.directory)
        self._overlay_serial = (overlay or {}).get("serial", 0)
        self.registry = Registry.build(merge(self._files, overlay))
        self._next_check = time.monotonic() + self.check_every_s
        return self.registry

    @property
    def files(self) -> dict[str, dict[str, dict]]:
        return self._files or {}

    def adopt(self, registry: Registry, overlay_serial: int) -> None:
        """Use `registry`, built by the caller from these files and the overlay of that serial."""
        self.registry = registry
        self._overlay_serial = overlay_serial

    def current(self, overlay_serial: int, overlay_loader) -> tuple[Registry, str | None]:
        """(registry in force, error text if a changed file or overlay was refused just now)."""
        changed_files = False
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_every_s
            fingerprint = self.fingerprint()
            if fingerprint != self._fingerprint:
                self._fingerprint = fingerprint
                try:
                    self._files = read_file_entries(self.directory)
                    changed_files = True
                except RegistryError as exc:
                    self.last_error = str(exc)
                    return self.registry, self.last_error
        if not changed_files and overlay_serial == self._overlay_serial:
            return self.registry, None
        overlay = overlay_loader() if overlay_serial else None
        try:
            registry = Registry.build(merge(self._files or {}, overlay))
        except RegistryError as exc:
            self._overlay_serial = overlay_serial
            self.last_error = str(exc)
            return self.registry, self.last_error
        self._overlay_serial = overlay_serial
        self.registry = registry
        self.last_error = None
        return registry, None
