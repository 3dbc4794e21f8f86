"""Input hygiene: code points no text may carry, and JSON objects that name a key twice.

Text in a record is signed into the ledger and later shown on terminals, dashboards and
printouts, so it may hold nothing that changes how other text looks instead of being text:
C0 and C1 control characters (an ANSI escape starts with ESC U+001B or CSI U+009B; NUL
truncates C strings), bidi embeddings, overrides, isolates and marks (U+202A-U+202E,
U+2066-U+2069, U+200E, U+200F, U+061C: "Trojan Source"), and zero-width or invisible
characters (U+200B-U+200D, U+2060, U+FEFF), invisible operators (U+2061-U+2064), and the
Unicode line and paragraph separators (U+2028, U+2029: JavaScript string literals end at them
and some viewers break lines there). Free text keeps LF and TAB, for multi-line notes;
identifiers have ASCII-only patterns and so exclude all of these already.

msgspec, like most JSON decoders, keeps the last of two equal keys in an object. A record
naming `torque_nm` twice would be read one way by the box and maybe another way by whoever
reads the raw message, so a repeated key is refused (`duplicate_key`). The check is cheap on
the fast path: the raw message and the decoded record re-encoded hold the same number of
colons unless a key was dropped (or a colon was escaped as \\u003a, which falls back to the
exact check); see `colons_differ`.
"""

from __future__ import annotations

import json
import re
from typing import Any

# (first, last, class) of every refused code point, in order
FORBIDDEN: tuple[tuple[int, int, str], ...] = (
    (0x0000, 0x0008, "control"),
    (0x000B, 0x001F, "control"),
    (0x007F, 0x009F, "control"),
    (0x061C, 0x061C, "bidi control"),
    (0x200B, 0x200D, "zero-width"),
    (0x200E, 0x200F, "bidi control"),
    (0x2028, 0x2029, "line separator"),
    (0x202A, 0x202E, "bidi control"),
    (0x2060, 0x2060, "zero-width"),
    (0x2061, 0x2064, "invisible operator"),
    (0x2066, 0x2069, "bidi control"),
    (0xFEFF, 0xFEFF, "zero-width"),
)
_CLASS = "".join(f"\\u{first:04x}-\\u{last:04x}" for first, last, _ in FORBIDDEN)
_FORBIDDEN = re.compile(f"[{_CLASS}]")

# The pattern free-text fields carry, so msgspec's typed decode refuses them on the fast path.
FREE_TEXT_PATTERN = f"^[^{_CLASS}]*\\Z"
TEXT_EXPECTED = ("text without control characters (LF and TAB allowed in free text), bidi controls or "
                 "zero-width characters")
DUPLICATE_EXPECTED = "each key at most once per object"


def first_forbidden(text: str) -> tuple[int, int] | None:
    """(index, code point) of the first refused code point in `text`, None if it is clean."""
    found = _FORBIDDEN.search(text)
    return (found.start(), ord(found.group())) if found else None


def name_code_point(code_point: int) -> str:
    """`U+202E (bidi control)`: the code point and why it is refused, never the text around it."""
    for first, last, kind in FORBIDDEN:
        if first <= code_point <= last:
            return f"U+{code_point:04X} ({kind})"
    return f"U+{code_point:04X}"


def forbidden_received(text: str) -> str | None:
    """The `received` text of a rule `text_control_char` error, None if `text` is clean."""
    found = first_forbidden(text)
    if found is None:
        return None
    index, code_point = found
    return f"{name_code_point(code_point)} at character {index + 1} of {len(text)}"


def escape_forbidden(text: str) -> str:
    """`text` (already JSON-quoted) with every refused code point as a \\uXXXX escape, so a
    report quoting an identifier or a key cannot carry them either."""
    return _FORBIDDEN.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def colons_differ(payload: bytes, reencoded: bytes) -> bool:
    """Whether `payload` may name a key twice, judged against the decoded record re-encoded.

    Dropping a duplicate drops its colon (and any in its value); every other colon survives
    decoding, as key separators or inside strings kept verbatim (timestamps are re-encoded with
    the same colons, numbers and dates have none). Only an escaped colon (\\u003a) hides one, so
    that spelling also answers True and the exact check decides.
    """
    return payload.count(b":") != reencoded.count(b":") or b"\\u003" in payload


class _Pairs(list):
    """An object's (key, value) pairs as the parser met them, duplicates included."""


def duplicate_keys(payload: bytes | str, limit: int = 100) -> list[tuple[str, ...]]:
    """The path (as a tuple of keys and indexes) of every repeated key, in document order.

    The payload must already be known to be valid JSON within the nesting limit; numbers are
    not converted, so huge ones cost nothing.
    """
    tree = json.loads(payload, object_pairs_hook=_Pairs, parse_int=_ignore, parse_float=_ignore,
                      parse_constant=_ignore)
    found: list[tuple[str, ...]] = []
    _walk(tree, (), found, limit)
    return found


def _ignore(_text: str) -> None:
    return None


def _walk(node: Any, path: tuple, found: list, limit: int) -> None:
    if len(found) >= limit:
        return
    if isinstance(node, _Pairs):
        seen: set[str] = set()
        for key, value in node:
            if key in seen:
                found.append((*path, key))
            seen.add(key)
            _walk(value, (*path, key), found, limit)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _walk(item, (*path, index), found, limit)
