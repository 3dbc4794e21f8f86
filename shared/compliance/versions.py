"""Contract versions: `mro.record/1` (the wire contract, DESIGN.md section 4) plus declarative deltas.

A version `mro.record/N` (N >= 2) is mro.record/1 with extra constraints: fields that become
required, patterns that tighten, allowed values that narrow, lengths that shrink. A delta never
adds a field or loosens anything, so every record valid under N is valid under 1 and devices
keep sending `"schema": "mro.record/1"` (the wire form); the edge box enforces whichever version
is *active*. Each delta is stated relative to mro.record/1, not to the previous version: a file
for /3 restates what it keeps of /2.

Delta file (TOML or JSON):

    version = "mro.record/2"
    title = "AC 120-78A sign-offs carry the aircraft type"    # required, shown to operators
    reference = "FAA AC 43-9C chg 1"                           # optional

    [[require]]                 # the field must be present
    field = "aircraft.type"     # dotted path in the record
    types = ["*"]               # record types, "*" = every type that has the field

    [[pattern]]                 # a text field must match (when present)
    field = "work_order_id"
    types = ["*"]
    regex = "^WO-[0-9]{4}-[0-9]{6}$"
    description = "WO-YYYY-NNNNNN"

    [[allow]]                   # an enumerated field may only take these values
    field = "part.condition"
    types = ["part_installation"]
    values = ["NEW", "SERVICEABLE", "OVERHAULED"]

    [[max_length]]              # text or list no longer than
    field = "notes"
    types = ["*"]
    max = 500

Rule ids of delta failures: `schema_required`, `schema_pattern`, `schema_enum`,
`schema_max_length`; their `expected` names the version that demands it.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from shared.contract.errors import FieldError, describe
from shared.contract.types import RECORD_CLASSES, RECORD_TYPES, SCHEMA
from shared.ledger.canonical import canonical_json, sha256_hex

BASE_VERSION = SCHEMA
_VERSION = re.compile(r"^mro\.record/([1-9][0-9]{0,5})\Z")
_KINDS = ("require", "pattern", "allow", "max_length")
_TOP = {"version", "title", "reference", *_KINDS}
_KEYS = {
    "require": {"field", "types"},
    "pattern": {"field", "types", "regex", "description"},
    "allow": {"field", "types", "values"},
    "max_length": {"field", "types", "max"},
}
_BY_TAG = dict(zip(RECORD_TYPES, RECORD_CLASSES, strict=True))
_MISSING = object()


class DefinitionError(ValueError):
    """A delta file that cannot be staged; the message says what to fix."""


def version_number(version: str) -> int:
    match = _VERSION.match(version or "")
    if not match:
        raise DefinitionError(f"version {version!r} must look like mro.record/2")
    return int(match.group(1))


def read_definition(path: Path) -> dict[str, Any]:
    """A delta file as a plain dict (TOML or JSON by suffix); DefinitionError if unreadable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DefinitionError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            document = json.loads(raw)
        else:
            document = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise DefinitionError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise DefinitionError(f"{path}: expected a table/object at the top")
    return document


@dataclass(frozen=True)
class _Check:
    kind: str
    path: tuple[str, ...]
    json_path: str
    expected: str
    regex: re.Pattern[str] | None = None
    values: frozenset[str] = frozenset()
    limit: int = 0


@dataclass
class ContractVersion:
    """A compiled version: `check(body)` lists the delta rules a stored body breaks."""

    version: str
    definition: dict[str, Any]
    checks: dict[str, tuple[_Check, ...]] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return version_number(self.version)

    @property
    def sha256(self) -> str:
        return sha256_hex(canonical_json(self.definition))

    @property
    def title(self) -> str:
        return self.definition.get("title", "")

    def check(self, body: dict[str, Any]) -> list[FieldError]:
        checks = self.checks.get(body.get("type", ""))
        if not checks:
            return []
        errors = []
        for check in checks:
            value: Any = body
            for name in check.path:
                value = value.get(name, _MISSING) if type(value) is dict else _MISSING
                if value is _MISSING:
                    break
            if value is _MISSING:
                if check.kind == "require":
                    errors.append(FieldError(check.json_path, "schema_required", check.expected, None))
                continue
            if check.kind == "pattern":
                assert check.regex is not None, "_check gives every pattern check its regex"
                if type(value) is str and check.regex.search(value) is None:
                    errors.append(FieldError(check.json_path, "schema_pattern", check.expected, describe(value)))
            elif check.kind == "allow":
                if value not in check.values:
                    errors.append(FieldError(check.json_path, "schema_enum", check.expected, describe(value)))
            elif check.kind == "max_length":
                if len(value) > check.limit:
                    errors.append(FieldError(check.json_path, "schema_max_length", check.expected,
                                             describe(value, free_text=type(value) is str)))
        return errors


BASE = ContractVersion(BASE_VERSION, {"version": BASE_VERSION, "title": "device contract v1"})


def compile_version(definition: dict[str, Any]) -> ContractVersion:
    """Check a delta definition against mro.record/1 and compile it; DefinitionError if wrong."""
    if not isinstance(definition, dict):
        raise DefinitionError("a version definition is a table/object")
    unknown = set(definition) - _TOP
    if unknown:
        raise DefinitionError(f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_TOP))}")
    version = definition.get("version")
    if not isinstance(version, str):
        raise DefinitionError('version = "mro.record/N" is required')
    if version_number(version) < 2:
        raise DefinitionError(f"{version}: mro.record/1 is the built-in base; a delta is mro.record/2 or later")
    if not isinstance(definition.get("title"), str) or not definition["title"].strip():
        raise DefinitionError("title is required: one line saying what changes and why")
    if "reference" in definition and not isinstance(definition["reference"], str):
        raise DefinitionError("reference must be text")
    checks: dict[str, list[_Check]] = {}
    total = 0
    for kind in _KINDS:
        rules = definition.get(kind, [])
        if not isinstance(rules, list):
            raise DefinitionError(f"{kind} must be an array of tables [[{kind}]]")
        for index, rule in enumerate(rules):
            where = f"{kind}[{index}]"
            if not isinstance(rule, dict):
                raise DefinitionError(f"{where} must be a table")
            extra = set(rule) - _KEYS[kind]
            if extra:
                raise DefinitionError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
            for record_type, check in _compile_rule(kind, rule, where, version):
                checks.setdefault(record_type, []).append(check)
                total += 1
    if not total:
        raise DefinitionError("the delta has no rule: add [[require]], [[pattern]], [[allow]] or [[max_length]]")
    return ContractVersion(version, definition, {t: tuple(c) for t, c in checks.items()})


def _compile_rule(kind: str, rule: dict, where: str, version: str):
    dotted = rule.get("field")
    if not isinstance(dotted, str) or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", dotted):
        raise DefinitionError(f"{where}: field must be a dotted path like aircraft.type")
    types = rule.get("types", ["*"])
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise DefinitionError(f'{where}: types must be a list of record types or ["*"]')
    path = tuple(dotted.split("."))
    if types == ["*"]:
        targets = [(t, _field_type(cls, path)) for t, cls in _BY_TAG.items()]
        targets = [(t, ft) for t, ft in targets if ft is not None]
        if not targets:
            raise DefinitionError(f"{where}: no record type of {BASE_VERSION} has a field {dotted}")
    else:
        targets = []
        for record_type in types:
            cls = _BY_TAG.get(record_type)
            if cls is None:
                raise DefinitionError(f"{where}: unknown record type {record_type!r} "
                                      f"(one of {', '.join(_BY_TAG)} or *)")
            field_type = _field_type(cls, path)
            if field_type is None:
                raise DefinitionError(f"{where}: {record_type} has no field {dotted} in {BASE_VERSION} "
                                      "(a delta may only tighten existing fields)")
            targets.append((record_type, field_type))
    json_path = "$." + dotted
    for record_type, field_type in targets:
        yield record_type, _check(kind, rule, where, version, path, json_path, field_type)


def _check(kind, rule, where, version, path, json_path, field_type) -> _Check:
    since = f"(required since {version})"
    if kind == "require":
        return _Check(kind, path, json_path, f"present {since}")
    if kind == "pattern":
        if not isinstance(field_type, mi.StrType):
            raise DefinitionError(f"{where}: a pattern applies to text fields only")
        regex = rule.get("regex")
        if not isinstance(regex, str):
            raise DefinitionError(f"{where}: regex is required")
        try:
            compiled = re.compile(regex)
        except re.error as exc:
            raise DefinitionError(f"{where}: regex does not compile: {exc}") from None
        text = rule.get("description") or f"text matching {regex}"
        return _Check(kind, path, json_path, f"{text} {since}", regex=compiled)
    if kind == "allow":
        if not isinstance(field_type, mi.LiteralType):
            raise DefinitionError(f"{where}: allow applies to enumerated fields only")
        values = rule.get("values")
        if not isinstance(values, list) or not values:
            raise DefinitionError(f"{where}: values must be a non-empty list")
        outside = [v for v in values if v not in field_type.values]
        if outside:
            raise DefinitionError(f"{where}: {outside} are not values of this field in {BASE_VERSION} "
                                  "(a delta may only narrow)")
        return _Check(kind, path, json_path, f"one of {', '.join(values)} {since}", values=frozenset(values))
    limit = rule.get("max")
    if not isinstance(field_type, mi.StrType | mi.ListType):
        raise DefinitionError(f"{where}: max_length applies to text and list fields only")
    if type(limit) is not int or limit < 0:
        raise DefinitionError(f"{where}: max must be an integer >= 0")
    unit = "items" if isinstance(field_type, mi.ListType) else "characters"
    return _Check(kind, path, json_path, f"at most {limit} {unit} {since}", limit=limit)


def _unwrap(t: mi.Type) -> mi.Type:
    while True:
        if isinstance(t, mi.Metadata):
            t = t.type
        elif isinstance(t, mi.UnionType):
            inner = [x for x in t.types if not isinstance(x, mi.NoneType)]  # inspect already drops UnsetType
            if len(inner) != 1:
                return t
            t = inner[0]
        else:
            return t


def _field_type(cls: type, path: tuple[str, ...]) -> mi.Type | None:
    t: mi.Type = mi.type_info(cls)
    for name in path:
        t = _unwrap(t)
        if not isinstance(t, mi.StructType):
            return None
        match = [f for f in t.fields if f.encode_name == name]
        if not match:
            return None
        t = match[0].type
    return _unwrap(t)


# --- dry run -------------------------------------------------------------------------------------

class DryRunReport(msgspec.Struct, kw_only=True):
    """What a version would do to past accepted records. Shares are integers in parts per
    million (nothing signed carries a float)."""

    version: str
    sample: int
    failed: int
    failed_ppm: int
    tolerance_ppm: int
    by_rule: dict[str, int]
    by_field: dict[str, int]
    seconds_ms: int = 0

    @property
    def within_tolerance(self) -> bool:
        return self.failed_ppm <= self.tolerance_ppm

    def summary(self) -> str:
        share = self.failed_ppm / 10_000
        return (f"{self.version}: {self.failed} of {self.sample} recent accepted records would fail "
                f"({share:.2f} %, tolerance {self.tolerance_ppm / 10_000:.2f} %)")


def dry_run(version: ContractVersion, bodies: Iterable[dict[str, Any]], *, tolerance_ppm: int) -> DryRunReport:
    """Replay `bodies` through `version`'s delta; each record counts once per rule it breaks."""
    sample = failed = 0
    by_rule: dict[str, int] = {}
    by_field: dict[str, int] = {}
    check = version.check
    for body in bodies:
        sample += 1
        errors = check(body)
        if not errors:
            continue
        failed += 1
        for rule in {e.rule for e in errors}:
            by_rule[rule] = by_rule.get(rule, 0) + 1
        for path in {e.path for e in errors}:
            by_field[path] = by_field.get(path, 0) + 1
    ppm = (failed * 1_000_000 + sample - 1) // sample if sample else 0
    return DryRunReport(version=version.version, sample=sample, failed=failed, failed_ppm=ppm,
                        tolerance_ppm=tolerance_ppm, by_rule=by_rule, by_field=by_field)
