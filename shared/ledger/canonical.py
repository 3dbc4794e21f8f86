"""Canonical JSON (RFC 8785, JCS) for everything that is hashed or signed (DESIGN.md section 6).

The ledger profile is JCS without its hard part: no floats, integers within +-(2^53-1) (where
every JSON reader agrees on the value), and ASCII object keys. Inside that profile the only
number form is the plain integer, so JCS reduces to "sorted keys, no whitespace, minimal string
escaping". msgspec produces exactly that when told to sort keys: it escapes only `"`, `\\`
and the C0 controls (`\\b \\t \\n \\f \\r` by name, the rest as lowercase `\\u00xx`) and writes
everything else, U+2028/U+2029, DEL, `<` and `/` included, as raw UTF-8, which is the JCS rule.
So the encoder checks the profile in one pass over the value and lets msgspec write the bytes.

Object keys are ordered by UTF-16 code units (RFC 8785 section 3.2.3). For ASCII keys that is
the plain code-point order msgspec uses; `ascii_keys=False` (outside the ledger profile, kept for
the public JCS vectors and general use) re-orders objects by UTF-16 units before encoding.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

__all__ = ["MAX_SAFE_INTEGER", "CanonicalError", "canonical_json", "sha256_hex"]

MAX_SAFE_INTEGER = 2**53 - 1

_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_encode_as_given = msgspec.json.Encoder().encode


class CanonicalError(ValueError):
    """The value is outside the canonical-JSON profile; the message names the offending part."""


def canonical_json(value: Any, *, ascii_keys: bool = True) -> bytes:
    """The RFC 8785 bytes of `value` (dict, list, tuple, str, int, bool, None).

    Raises CanonicalError for floats, integers beyond +-(2^53-1), non-str keys, lone
    surrogates, any other type, and (unless `ascii_keys=False`) non-ASCII keys.
    """
    try:
        needs_utf16_order = _check(value, ascii_keys)
    except RecursionError:
        raise CanonicalError("value is nested too deeply to canonicalize") from None
    try:
        if needs_utf16_order:
            return _encode_as_given(_utf16_ordered(value))
        return _encode_sorted(value)
    except UnicodeEncodeError as exc:
        raise CanonicalError(f"string is not valid Unicode (lone surrogate at {exc.start})") from None


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256, the digest form used for idempotency keys and ledger links."""
    return hashlib.sha256(data).hexdigest()


def _check(value: Any, ascii_keys: bool) -> bool:
    """Validate the profile; True if some key is non-ASCII (so code-point order may be wrong)."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return False
    if kind is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return False
        raise CanonicalError(f"integer {value} is outside +-(2^53-1)")
    if kind is dict:
        non_ascii = False
        for key, item in value.items():
            if type(key) is not str:
                raise CanonicalError(f"object key {key!r} is not a string")
            if not key.isascii():
                if ascii_keys:
                    raise CanonicalError(f"object key {key!r} is not ASCII")
                non_ascii = True
            if _check(item, ascii_keys):
                non_ascii = True
        return non_ascii
    if kind is list or kind is tuple:
        non_ascii = False
        for item in value:
            if _check(item, ascii_keys):
                non_ascii = True
        return non_ascii
    if kind is float:
        raise CanonicalError(f"float {value!r} is outside the profile (send integers or decimal strings)")
    raise CanonicalError(f"type {kind.__name__} has no canonical JSON form")


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _utf16_ordered(value: Any) -> Any:
    """A copy whose dicts iterate in UTF-16 code-unit key order (msgspec keeps insertion order)."""
    if type(value) is dict:
        return {key: _utf16_ordered(value[key]) for key in sorted(value, key=_utf16_key)}
    if type(value) is list or type(value) is tuple:
        return [_utf16_ordered(item) for item in value]
    return value
