"""Part nameplate marks as a 2-D (Data Matrix) or barcode scanner sends them, parsed into `PartMark`.

What is accepted:

* **ISO/IEC 15434 envelopes**: `[)>` RS, then one or more format segments `<ff>` GS field GS field
  ... RS, then EOT (RS 0x1E, GS 0x1D, EOT 0x04). Format `06` holds ANSI MH10.8.2 data
  identifiers, `12` ATA Spec 2000 text element identifiers, and `DD` the same TEIs under the
  DoD's interim format header (MIL-STD-130 IUID marks, e.g. `[)>` RS `DD` GS `MFR 0CVA5` GS
  `SER 674A36458` RS EOT). Other formats are refused by name.
* **Data identifiers** (format 06): a DI is up to three digits and one capital letter,
  immediately followed by its data. `17V` is the CAGE code, `1P` the part number, `S` the
  serial, `18S` and `25S` unique item identifiers (UII); every other DI is kept raw.
* **Text element identifiers** (formats 12 and DD, and the loose text marked on nameplates):
  three capital letters, a space, the data. `MFR`/`CAG` are the CAGE code, `PNR` the (current)
  part number, `PNO` the original part number (the one a UII is built on; it may differ from
  `PNR` after a modification, so it has its own field), `SER`/`SEQ` the serial, `UCN` the UII;
  others (`SPL`, `PDT`, ...) are kept raw. Loose text separates
  elements with `*` (then values may hold spaces: `MFR 81205*PNR 12345-01*SER ABC123`) or with
  spaces (then values may not); it is recognised only when it starts with one of those TEIs.
* An **AIM symbology identifier** (`]d1`, `]Q1`, `]C0`, ...) before the data is kept in
  `symbology`; a trailing CR/LF (the scanner's suffix) is dropped.

A scan whose framing was lost, as when a keyboard-wedge bridge drops GS, RS or EOT, is never
guessed at: anything starting with `[)>` that is not a well-framed envelope (RS after `[)>`, GS
after each format code, RS EOT at the end) is returned with `framing_lost: true`, the raw text,
and no fields. A bridge drops a kind of character everywhere, which always breaks that framing.
A single GS lost between two fields of an otherwise intact envelope would merge them; the
CAGE rule (exactly five letters or digits) catches that where a CAGE element is followed by
another, and the remaining cases look like a longer value: nothing in the symbol can tell.

Conflicting duplicates (the same identifier, or two that mean the same field, with different
values) are refused, never resolved by picking one.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from services.devices.malformed import Malformed, field_error
from shared.contract.errors import FieldError, cut

RS, GS, EOT = "\x1e", "\x1d", "\x04"
ENVELOPE_HEADER = "[)>" + RS
ENVELOPE_TRAILER = RS + EOT
#: Data Matrix ECC 200 holds at most 3116 characters; anything longer is not one scan.
MAX_SCAN = 4096

#: Which identifier fills which field: MH10.8.2 data identifiers and ATA Spec 2000 TEIs.
FIELD_OF = {
    "17V": "cage", "MFR": "cage", "CAG": "cage",
    "1P": "part_number", "PNR": "part_number", "PNO": "original_part_number",
    "S": "serial", "SER": "serial", "SEQ": "serial",
    "18S": "uii", "25S": "uii", "UCN": "uii",
}
CAGE_IDS = frozenset({"17V", "MFR", "CAG"})
LOOSE_TEIS = frozenset(k for k in FIELD_OF if len(k) == 3)

_AIM = re.compile(r"\][A-Za-z][0-9A-Za-z]")
_DI = re.compile(r"([0-9]{0,3}[A-Z])(.+)", re.DOTALL)
_TEI = re.compile(r"([A-Z]{3}) (.+)", re.DOTALL)
_CAGE = re.compile(r"[A-Z0-9]{5}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class PartMark(msgspec.Struct, frozen=True, tag="devices.part_mark/1"):
    """One scanned part mark. `elements` holds every identifier and its data as scanned
    (`17V`, `1P`, `MFR`, ...); `cage`, `part_number`, `original_part_number`, `serial` and `uii`
    are the fields they name. `envelope_formats` lists the 15434 formats (`06`, `12`, `DD`) or
    `text` for a loose TEI mark; it is empty when `framing_lost`. `raw` is the scan as sent."""

    raw: str
    framing_lost: bool
    envelope_formats: list[str]
    elements: dict[str, str]
    cage: str | None = None
    part_number: str | None = None
    original_part_number: str | None = None
    serial: str | None = None
    uii: str | None = None
    symbology: str | None = None


def envelope(segments: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """An ISO/IEC 15434 message: `[(format, [(identifier, data), ...]), ...]`.

    Format 06 writes `<DI><data>`, formats 12 and DD `<TEI> <data>`; used to print marks and in tests.
    """
    parts = []
    for fmt, fields in segments:
        joiner = "" if fmt == "06" else " "
        parts.append(fmt + GS + GS.join(ident + joiner + data for ident, data in fields))
    return ENVELOPE_HEADER + RS.join(parts) + ENVELOPE_TRAILER


class _Fields:
    """Collects elements and errors, and refuses conflicting duplicates."""

    def __init__(self) -> None:
        self.elements: dict[str, str] = {}
        self.named: dict[str, tuple[str, str]] = {}
        self.errors: list[FieldError] = []

    def add(self, ident: str, value: str, path: str) -> None:
        if not _PRINTABLE.fullmatch(value):
            self.errors.append(field_error(path, "value.charset", "printable ASCII", value))
            return
        if ident in self.elements and self.elements[ident] != value:
            self.errors.append(field_error(path, "element.duplicate",
                                           f"one value for {ident} (first: {cut(self.elements[ident], 40)!r})", value))
            return
        if ident in CAGE_IDS and not _CAGE.fullmatch(value):
            self.errors.append(field_error(path, "cage.format", "a CAGE code: 5 capital letters or digits", value))
            return
        self.elements[ident] = value
        name = FIELD_OF.get(ident)
        if name is None:
            return
        seen = self.named.get(name)
        if seen is not None and seen[1] != value:
            self.errors.append(field_error(path, "element.conflict",
                                           f"{name} equal to {seen[0]}'s {cut(seen[1], 40)!r}", value))
            return
        self.named.setdefault(name, (ident, value))

    def mark(self, raw: str, formats: list[str], symbology: str | None) -> PartMark | Malformed:
        if self.errors:
            return Malformed("partmark", self.errors)
        fields = {name: value for name, (_, value) in self.named.items()}
        return PartMark(raw=raw, framing_lost=False, envelope_formats=formats, elements=self.elements,
                        symbology=symbology, **fields)


def _lost(raw: str, symbology: str | None) -> PartMark:
    return PartMark(raw=raw, framing_lost=True, envelope_formats=[], elements={}, symbology=symbology)


def _parse_envelope(raw: str, body: str, symbology: str | None) -> PartMark | Malformed:
    if not body.startswith(ENVELOPE_HEADER) or not body.endswith(ENVELOPE_TRAILER) \
            or len(body) < len(ENVELOPE_HEADER) + len(ENVELOPE_TRAILER):
        return _lost(raw, symbology)
    segments = body[len(ENVELOPE_HEADER):-len(ENVELOPE_TRAILER)].split(RS)
    if any(len(s) < 3 or s[2] != GS for s in segments):
        return _lost(raw, symbology)
    fields = _Fields()
    formats: list[str] = []
    for i, segment in enumerate(segments):
        fmt, content = segment[:2], segment[3:]
        path = f"$.segments[{i}]"
        formats.append(fmt)
        if fmt not in ("06", "12", "DD"):
            fields.errors.append(field_error(f"{path}.format", "envelope.format",
                                             "format 06 (data identifiers), 12 or DD (text element identifiers)",
                                             fmt))
            continue
        pattern, expected = (_DI, "a data identifier (0-3 digits, a capital letter) and its data") if fmt == "06" \
            else (_TEI, "a text element identifier (3 capital letters), a space and its data")
        for j, field in enumerate(content.split(GS)):
            match = pattern.fullmatch(field)
            if match is None:
                rule = "di.syntax" if fmt == "06" else "tei.syntax"
                fields.errors.append(field_error(f"{path}.fields[{j}]", rule, expected, field))
                continue
            fields.add(match.group(1), match.group(2), f"{path}.fields[{j}]")
    return fields.mark(raw, formats, symbology)


def _parse_loose(raw: str, body: str, symbology: str | None) -> PartMark | Malformed:
    fields = _Fields()
    if "*" in body:
        pairs: list[tuple[str, str] | None] = []
        for element in body.split("*"):
            match = _TEI.fullmatch(element.strip())
            pairs.append((match.group(1), match.group(2).strip()) if match else None)
        texts = [element.strip() for element in body.split("*")]
    else:
        tokens = body.split()
        pairs = [(tokens[k], tokens[k + 1]) if k + 1 < len(tokens) and re.fullmatch(r"[A-Z]{3}", tokens[k])
                 else None for k in range(0, len(tokens), 2)]
        texts = [" ".join(tokens[k:k + 2]) for k in range(0, len(tokens), 2)]
    for j, pair in enumerate(pairs):
        if pair is None or not pair[1]:
            fields.errors.append(field_error(f"$.elements[{j}]", "tei.syntax",
                                             "a text element identifier (3 capital letters), a space and its data",
                                             texts[j]))
            continue
        fields.add(pair[0], pair[1], f"$.elements[{j}]")
    return fields.mark(raw, ["text"], symbology)


def parse_partmark(scan: bytes | str) -> PartMark | Malformed:
    """What a scanner sent for a part mark: the parsed mark, a framing-lost mark, or every problem."""
    if isinstance(scan, bytes):
        if len(scan) > MAX_SCAN:
            return Malformed("partmark", [field_error("$", "payload.size", f"at most {MAX_SCAN} bytes",
                                                      f"{len(scan)} bytes")])
        try:
            raw = scan.decode("ascii")
        except UnicodeDecodeError:
            return Malformed("partmark", [field_error("$", "encoding", "ASCII", scan[:80].decode("latin-1"))])
    else:
        raw = scan
    if len(raw) > MAX_SCAN:
        return Malformed("partmark", [field_error("$", "payload.size", f"at most {MAX_SCAN} characters",
                                                  f"{len(raw)} characters")])
    body = raw.rstrip("\r\n")
    symbology = None
    if _AIM.match(body):
        symbology, body = body[:3], body[3:]
    if body.startswith("[)>"):
        return _parse_envelope(raw, body, symbology)
    return _parse_unframed(raw, body, symbology)


def _parse_unframed(raw: str, body: str, symbology: str | None) -> PartMark | Malformed:
    if any(c in body for c in (RS, GS, EOT)):
        return Malformed("partmark", [field_error("$", "envelope.header",
                                                  "'[)>' RS before GS/RS/EOT-separated data", _shown(body))])
    first = body.lstrip()[:4]
    if len(first) == 4 and first[:3] in LOOSE_TEIS and first[3] == " ":
        return _parse_loose(raw, body.strip(), symbology)
    return Malformed("partmark", [field_error("$", "partmark.format",
                                              "an ISO/IEC 15434 envelope or TEI text such as 'MFR 81205*PNR ...'",
                                              _shown(body))])


def _shown(value: Any) -> str:
    """Control characters made visible, so a report shows where framing went."""
    return str(value).replace(RS, "<RS>").replace(GS, "<GS>").replace(EOT, "<EOT>")
