"""Open Protocol framing and fixed-width fields: pure functions, no I/O.

A telegram is ASCII: a 20-byte header, a data field, and a NUL terminator.

    bytes  1-4   length of header + data (4 digits; the NUL is not counted)
    bytes  5-8   MID (4 digits)
    bytes  9-11  revision (3 digits; blanks or 000 mean revision 1)
    byte   12    no-ack flag (blank or 0: the event must be acknowledged, 1: no acknowledge)
    bytes 13-14  station id, 15-16 spindle id, 17-18 sequence number,
    byte   19    number of message parts, byte 20 message part number (all blank when unused;
                 older controllers send these eight bytes as spare blanks)

Data fields are `<2-digit parameter id><value>` with a fixed width per field: numbers
right-aligned and zero-padded, text left-aligned and blank-padded. Some MIDs (0004, 0005)
carry bare values without parameter ids.

Frames are split by the length header, never by scanning for NUL: the header says where the
frame ends, and the byte there must be the NUL. A length that lies (not digits, shorter than a
header, or a frame whose terminator is not where the length puts it, or a NUL inside the frame)
is refused with `FramingError`; the stream cannot be resynchronised after that, so the caller
drops the connection.

Sources: the header layout and the field conventions follow the Atlas Copco "Open Protocol"
user guide (9836 4415 01, release 7.5, section 2.2, as published on pdfslide.us / 1library.net)
and the open-source parsers Rickedb/OpenProtocolInterpreter (C#, `Header` and `DataField`)
and st-one-io/node-open-protocol (JavaScript, `helpers.js`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import msgspec

HEADER_LEN = 20
MAX_LENGTH = 9999
TERMINATOR = 0


class FramingError(ValueError):
    """The byte stream is not Open Protocol framing; the connection cannot be trusted any more."""


class DecodeError(ValueError):
    """A well-framed telegram whose header or data does not match the layout of its MID."""


class Kind(enum.Enum):
    NUM = "num"
    TEXT = "text"


class Field(NamedTuple):
    """One fixed-width data field; `pid` None for the bare values of MID 0004 and 0005."""

    pid: int | None
    name: str
    width: int
    kind: Kind


class Header(msgspec.Struct, frozen=True, kw_only=True):
    mid: int
    revision: int = 1
    no_ack: bool = False
    station: int | None = None
    spindle: int | None = None
    sequence: int | None = None
    parts: int | None = None
    part: int | None = None


def _digits(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise DecodeError(f"{what}: expected digits, received {text!r}")
    return int(text)


def _optional(text: str, what: str) -> int | None:
    return None if text.strip(" ") == "" else _digits(text, what)


def _put(value: int | None, width: int, what: str) -> str:
    if value is None:
        return " " * width
    if value < 0 or value >= 10**width:
        raise ValueError(f"{what} {value} does not fit in {width} digits")
    return str(value).zfill(width)


def encode_header(header: Header, data_len: int) -> str:
    length = HEADER_LEN + data_len
    if length > MAX_LENGTH:
        raise ValueError(f"telegram of {length} bytes is longer than the 4-digit length allows")
    if not 1 <= header.revision <= 999:
        raise ValueError(f"revision {header.revision} is not 1-999")
    return (str(length).zfill(4) + _put(header.mid, 4, "MID") + str(header.revision).zfill(3)
            + ("1" if header.no_ack else "0") + _put(header.station, 2, "station")
            + _put(header.spindle, 2, "spindle") + _put(header.sequence, 2, "sequence number")
            + _put(header.parts, 1, "message parts") + _put(header.part, 1, "message part number"))


def decode_header(text: str) -> Header:
    if len(text) < HEADER_LEN:
        raise DecodeError(f"header: expected {HEADER_LEN} bytes, received {len(text)}")
    revision_text = text[8:11]
    revision = 1 if revision_text.strip(" ") in ("", "000") else _digits(revision_text.strip(" "), "revision")
    flag = text[11]
    if flag not in " 01":
        raise DecodeError(f"no-ack flag: expected blank, 0 or 1, received {flag!r}")
    return Header(mid=_digits(text[4:8], "MID"), revision=revision, no_ack=flag == "1",
                  station=_optional(text[12:14], "station"), spindle=_optional(text[14:16], "spindle"),
                  sequence=_optional(text[16:18], "sequence number"),
                  parts=_optional(text[18:19], "message parts"), part=_optional(text[19:20], "message part number"))


def encode_frame(header: Header, data: str = "") -> bytes:
    """One telegram: header, data, NUL. Data must be printable ASCII (the fields ensure it)."""
    return (encode_header(header, len(data)) + data).encode("ascii") + b"\x00"


def split_frame(frame: bytes) -> tuple[Header, str]:
    """Header and data text of one frame as `FrameSplitter` yields it (terminator removed)."""
    try:
        text = frame.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"telegram is not ASCII (byte {exc.start})") from None
    return decode_header(text), text[HEADER_LEN:]


class FrameSplitter:
    """Cuts a TCP byte stream into frames by their length headers.

    `feed` takes any chunking of the stream and yields the complete frames (without the NUL)
    in order; the remainder waits for the next chunk. Any lie in a length header raises
    `FramingError` as soon as the bytes that prove it have arrived (after the good frames
    before it were yielded), so a reader bounded by a read timeout never waits for a frame
    that cannot come right.
    """

    def __init__(self, max_length: int = MAX_LENGTH) -> None:
        self._buffer = bytearray()
        self._max = max_length

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buffer += chunk
        while len(self._buffer) >= 4:
            length = self._length(bytes(self._buffer[:4]))
            if len(self._buffer) < length + 1:
                self._check_no_nul(length)
                break
            if self._buffer[length] != TERMINATOR:
                raise FramingError(f"length header says {length} bytes but byte {length + 1} is "
                                   f"{self._buffer[length]:#04x}, not the NUL terminator")
            self._check_no_nul(length)
            frame = bytes(self._buffer[:length])
            del self._buffer[:length + 1]
            yield frame

    def finish(self) -> None:
        """At end of stream: a partial frame left over is a truncated telegram."""
        if self._buffer:
            raise FramingError(f"stream ended inside a telegram ({len(self._buffer)} bytes of it received)")

    def _length(self, head: bytes) -> int:
        if not head.isdigit():
            raise FramingError(f"length header {head!r} is not 4 ASCII digits")
        length = int(head)
        if length < HEADER_LEN:
            raise FramingError(f"length header {length} is shorter than the {HEADER_LEN}-byte header")
        if length > self._max:
            raise FramingError(f"length header {length} exceeds the limit of {self._max}")
        return length

    def _check_no_nul(self, length: int) -> None:
        body = self._buffer[:min(length, len(self._buffer))]
        at = body.find(b"\x00")
        if at >= 0:
            raise FramingError(f"NUL at byte {at + 1} inside a telegram whose length header says {length}: "
                               "the length header lies")


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def encode_fields(layout: tuple[Field, ...], values: Mapping[str, object]) -> str:
    """The data field for `layout`; a value missing from `values` is an error."""
    parts: list[str] = []
    for field in layout:
        value = values[field.name]
        if field.pid is not None:
            parts.append(str(field.pid).zfill(2))
        if field.kind is Kind.NUM:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{field.name}: expected an int, got {type(value).__name__}")
            parts.append(_put(value, field.width, field.name))
        else:
            if not isinstance(value, str) or not _printable(value) or len(value) > field.width:
                raise ValueError(f"{field.name}: expected printable ASCII of at most {field.width} characters")
            parts.append(value.ljust(field.width))
    return "".join(parts)


def decode_fields(layout: tuple[Field, ...], data: str) -> tuple[dict[str, object], str]:
    """Values by name, and whatever follows the last known field (newer controllers append)."""
    values: dict[str, object] = {}
    at = 0
    for field in layout:
        if field.pid is not None:
            pid = data[at:at + 2]
            if pid != str(field.pid).zfill(2):
                raise DecodeError(f"{field.name}: expected parameter id {field.pid:02d} at data byte {at + 1}, "
                                  f"received {pid!r}")
            at += 2
        text = data[at:at + field.width]
        if len(text) < field.width:
            raise DecodeError(f"{field.name}: expected {field.width} characters at data byte {at + 1}, "
                              f"the data ends after {len(text)}")
        at += field.width
        if field.kind is Kind.NUM:
            stripped = text.strip(" ")
            values[field.name] = _digits(stripped, field.name)
        else:
            if not _printable(text):
                raise DecodeError(f"{field.name}: not printable ASCII")
            values[field.name] = text.rstrip(" ")
    return values, data[at:]
