"""The GS1 EPC Tag Data Standard ADI-var scheme: aviation part tags to CAGE, part number, serial.

ADI-var (TDS section 14, "Aerospace and Defense Identifier", header 0x3B) is what ATA Spec 2000
and the US DoD UID guide put in a part tag's EPC bank:

    header 8 bits (0x3B) | filter 6 | CAGE/DODAAC 36 | part number 6-bit chars + 000000
                         | serial 6-bit chars + 000000 | zero padding to the end of the bank

6-bit characters are the low six bits of the ASCII code: A-Z are 0x01-0x1A, 0-9 are 0x30-0x39,
"-" 0x2D, "/" 0x2F, "#" 0x23, space 0x20; 0x00 ends a variable field. The CAGE/DODAAC field is
always six characters: a five-character CAGE code is preceded by a space. The part number has
0-32 characters (A-Z, 0-9, "-", "/"), the serial 1-30 of the same, and may start with "#". The
reference example is TDS annex E.3: `3B0E0CF5E76C9047759AD00373DC7602E7200` is
`urn:epc:tag:adi-var:3.35962.PQ7VZ4.M37GXB92`.

Why a decoder of our own: `epcpy` 0.1.8 (MIT, PyPI) has an ADI scheme, but its decoder splits
the variable fields on any run of six zero bits rather than on 6-bit character boundaries, so it
fails on the TDS's own E.3 example ("Invalid ADI URI ...PQ7VZ.C\\=16") and on every part number
where a character ending in 0 bits is followed by one starting with them (e.g. "PA"). The scheme
is small and fully specified, so it is decoded here, character-aligned, and checked against E.3.
Other EPC headers (SGTIN-96 and the rest) are not aviation part tags: callers keep the raw EPC.
"""

from __future__ import annotations

import msgspec

from services.devices.malformed import field_error
from shared.contract.errors import FieldError

ADI_VAR_HEADER = 0x3B
CAGE_CHARS = 6
MAX_PART_NUMBER = 32
MAX_SERIAL = 30
#: The 6-bit characters a part number or serial may hold (TDS, ADI-var section).
ADI_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/")
_CAGE_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_URI_ESCAPES = {"/": "%2F", "#": "%23"}


class AviationPart(msgspec.Struct, frozen=True, tag="devices.aviation_part/1"):
    """An ADI-var tag's identity; `tag_uri` is the TDS tag URI, for auditors and other tools."""

    filter: int
    cage: str
    part_number: str
    serial: str
    tag_uri: str


def is_adi_var(epc_hex: str) -> bool:
    """Whether the EPC starts with the ADI-var header (0x3B)."""
    return epc_hex[:2].upper() == "3B"


def _six_bit(value: int) -> str:
    return chr(value | 0x40) if value < 0x20 else chr(value)


def _escape(text: str) -> str:
    return "".join(_URI_ESCAPES.get(c, c) for c in text)


def tag_uri(filter_value: int, cage: str, part_number: str, serial: str) -> str:
    """`urn:epc:tag:adi-var:<filter>.<CAGE>.<part number>.<serial>` with "/" and "#" escaped."""
    return f"urn:epc:tag:adi-var:{filter_value}.{cage}.{_escape(part_number)}.{_escape(serial)}"


class _Bits:
    """Reads an EPC's bits left to right, six or eight at a time."""

    def __init__(self, epc_hex: str):
        self.value = int(epc_hex, 16)
        self.size = 4 * len(epc_hex)
        self.at = 0

    def left(self) -> int:
        return self.size - self.at

    def take(self, width: int) -> int:
        shift = self.size - self.at - width
        self.at += width
        return (self.value >> shift) & ((1 << width) - 1)

    def rest(self) -> int:
        return self.value & ((1 << self.left()) - 1)


def _variable_field(bits: _Bits, limit: int) -> str | None:
    """Characters up to the 000000 terminator, or None when the bits end before it or after `limit`."""
    chars: list[str] = []
    while bits.left() >= 6:
        value = bits.take(6)
        if value == 0:
            return "".join(chars)
        if len(chars) == limit:
            return None
        chars.append(_six_bit(value))
    return None


def decode_adi_var(epc_hex: str, path: str = "epc_hex") -> AviationPart | list[FieldError]:
    """The part an ADI-var EPC names, or every rule it breaks (errors name `path`)."""
    if not epc_hex or any(c not in "0123456789abcdefABCDEF" for c in epc_hex):
        return [field_error(path, "epc.hex", "hexadecimal digits", epc_hex)]
    bits = _Bits(epc_hex)
    if bits.size < 8 + 6 + 36 + 12:
        return [field_error(path, "adi_var.length", "at least 68 bits (header, filter, CAGE, two terminators)",
                            epc_hex)]
    if bits.take(8) != ADI_VAR_HEADER:
        return [field_error(path, "adi_var.header", "EPC header 0x3B (ADI-var)", epc_hex)]
    filter_value = bits.take(6)
    cage = "".join(_six_bit(bits.take(6)) for _ in range(CAGE_CHARS))
    errors: list[FieldError] = []
    if cage.startswith(" "):
        cage = cage[1:]
    if len(cage) not in (5, 6) or any(c not in _CAGE_ALPHABET for c in cage):
        errors.append(field_error(f"{path}.cage", "adi_var.cage",
                                  "a 5-character CAGE code after a space, or a 6-character DODAAC (A-Z, 0-9)", cage))
    part_number = _variable_field(bits, MAX_PART_NUMBER)
    if part_number is None:
        errors.append(field_error(f"{path}.part_number", "adi_var.terminator",
                                  f"at most {MAX_PART_NUMBER} 6-bit characters ended by 000000", epc_hex))
        return errors
    serial = _variable_field(bits, MAX_SERIAL)
    if serial is None:
        errors.append(field_error(f"{path}.serial", "adi_var.terminator",
                                  f"at most {MAX_SERIAL} 6-bit characters ended by 000000", epc_hex))
        return errors
    if any(c not in ADI_ALPHABET for c in part_number):
        errors.append(field_error(f"{path}.part_number", "adi_var.charset", "A-Z, 0-9, '-', '/'", part_number))
    body = serial[1:] if serial.startswith("#") else serial
    if not body or any(c not in ADI_ALPHABET for c in body):
        errors.append(field_error(f"{path}.serial", "adi_var.charset",
                                  "1-30 characters A-Z, 0-9, '-', '/', optionally after a leading '#'", serial))
    if bits.rest() != 0:
        errors.append(field_error(f"{path}.padding", "adi_var.padding",
                                  "zero bits after the serial's terminator", epc_hex))
    if errors:
        return errors
    return AviationPart(filter=filter_value, cage=cage, part_number=part_number, serial=serial,
                        tag_uri=tag_uri(filter_value, cage, part_number, serial))


def encode_adi_var(filter_value: int, cage: str, part_number: str, serial: str) -> str:
    """The EPC (hex, padded with zeros to a 16-bit word, as written to a tag) for one part.

    Raises ValueError for values the scheme cannot hold; used to write tags and in tests.
    """
    if not 0 <= filter_value < 64:
        raise ValueError("filter must be 0-63")
    if len(cage) not in (5, 6) or any(c not in _CAGE_ALPHABET for c in cage):
        raise ValueError("CAGE must be 5 characters (or a 6-character DODAAC) of A-Z, 0-9")
    body = serial[1:] if serial.startswith("#") else serial
    if len(part_number) > MAX_PART_NUMBER or any(c not in ADI_ALPHABET for c in part_number):
        raise ValueError("part number must be 0-32 characters of A-Z, 0-9, '-', '/'")
    if not body or len(serial) > MAX_SERIAL or any(c not in ADI_ALPHABET for c in body):
        raise ValueError("serial must be 1-30 characters of A-Z, 0-9, '-', '/', optionally after '#'")
    chars = (" " if len(cage) == 5 else "") + cage
    value, size = ADI_VAR_HEADER, 8
    value, size = (value << 6) | filter_value, size + 6
    for text in (chars, part_number + "\0", serial + "\0"):
        for c in text:
            value, size = (value << 6) | (ord(c) & 0x3F), size + 6
    pad = -size % 16
    value, size = value << pad, size + pad
    return f"{value:0{size // 4}X}"
