"""MQTT 3.1.1 (and 3.1) packets: a streaming splitter and the encoders/decoders the broker needs.

Pure functions over bytes, no I/O, so they are property-tested on their own
(tests/unit/test_broker_packets.py). A malformed packet raises `ProtocolError`; the broker
then closes the connection, which is what the specification asks for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes (MQTT 3.1.1 section 3.2.2.3)
ACCEPTED = 0
BAD_PROTOCOL = 1
IDENTIFIER_REJECTED = 2
BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80
_U16 = struct.Struct("!H")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed."""


def encode_length(length: int) -> bytes:
    """The fixed header's variable-length 'remaining length'."""
    if not 0 <= length <= 268_435_455:
        raise ValueError(f"remaining length {length} out of range")
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(value: str) -> bytes:
    data = value.encode()
    return _U16.pack(len(data)) + data


class PacketSplitter:
    """Cuts a byte stream into (type, flags, body) packets; keeps a partial packet for later.

    `max_packet` bounds memory per connection: a longer declared length is a protocol error
    before any of its body is buffered.
    """

    def __init__(self, max_packet: int) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        packets = []
        start = 0
        end = len(buffer)
        while end - start >= 2:
            length, shift, index, complete = 0, 0, start + 1, False
            for _ in range(4):
                if index >= end:
                    break
                byte = buffer[index]
                index += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    complete = True
                    break
            else:
                raise ProtocolError("remaining length longer than 4 bytes")
            if not complete:
                break
            if length > self.max_packet:
                raise ProtocolError(f"packet of {length} bytes exceeds the limit of {self.max_packet}")
            if end - index < length:
                break
            first = buffer[start]
            packets.append((first >> 4, first & 0x0F, bytes(buffer[index:index + length])))
            start = index + length
        if start:
            del buffer[:start]
        return packets


def _read_string(body: bytes, offset: int) -> tuple[str, int]:
    raw, offset = _read_binary(body, offset)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None
    if "\0" in text:
        raise ProtocolError("string contains U+0000")
    return text, offset


def _read_binary(body: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 2 > len(body):
        raise ProtocolError("truncated length prefix")
    (size,) = _U16.unpack_from(body, offset)
    offset += 2
    if offset + size > len(body):
        raise ProtocolError("truncated field")
    return body[offset:offset + size], offset + size


def _read_u16(body: bytes, offset: int) -> int:
    if offset + 2 > len(body):
        raise ProtocolError("truncated packet identifier")
    return _U16.unpack_from(body, offset)[0]


@dataclass(slots=True)
class Connect:
    protocol_level: int
    client_id: str
    clean_session: bool
    keepalive: int
    username: str | None = None
    password: str | None = None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False


def decode_connect(body: bytes) -> Connect:
    name, offset = _read_string(body, 0)
    if offset + 4 > len(body):
        raise ProtocolError("truncated CONNECT")
    level, flags = body[offset], body[offset + 1]
    keepalive = _U16.unpack_from(body, offset + 2)[0]
    offset += 4
    if (name, level) not in (("MQTT", 4), ("MQIsdp", 3)):
        return Connect(level, "", True, keepalive)  # caller answers BAD_PROTOCOL
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set")
    client_id, offset = _read_string(body, offset)
    connect = Connect(level, client_id, bool(flags & 0x02), keepalive)
    if flags & 0x04:
        connect.will_topic, offset = _read_string(body, offset)
        connect.will_payload, offset = _read_binary(body, offset)
        connect.will_qos = (flags >> 3) & 0x03
        connect.will_retain = bool(flags & 0x20)
        if connect.will_qos > 2:
            raise ProtocolError("will QoS 3")
    elif flags & 0x38:
        raise ProtocolError("will flags without a will")
    if flags & 0x80:
        connect.username, offset = _read_string(body, offset)
    if flags & 0x40:
        raw, offset = _read_binary(body, offset)
        connect.password = raw.decode(errors="replace")
    return connect


def connack(session_present: bool, code: int) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present and code == ACCEPTED else 0, code))


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False
    packet_id: int = 0


def decode_publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    topic, offset = _read_string(body, 0)
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError("PUBLISH topic empty or with a wildcard")
    packet_id = 0
    if qos:
        packet_id = _read_u16(body, offset)
        offset += 2
        if packet_id == 0:
            raise ProtocolError("PUBLISH packet identifier 0")
    return Publish(topic, body[offset:], qos, bool(flags & 0x01), bool(flags & 0x08), packet_id)


def encode_publish(topic: str, payload: bytes, qos: int, *, retain: bool = False, dup: bool = False,
                   packet_id: int = 0) -> bytes:
    header = _string(topic) + (_U16.pack(packet_id) if qos else b"")
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes((first,)) + encode_length(len(header) + len(payload)) + header + payload


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0b0010), PUBCOMP or UNSUBACK."""
    return bytes(((kind << 4) | (0x02 if kind == PUBREL else 0), 2)) + _U16.pack(packet_id)


def decode_packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise ProtocolError("acknowledgement of the wrong length")
    return _U16.unpack(body)[0]


def decode_subscribe(flags: int, body: bytes) -> tuple[int, list[tuple[str, int]]]:
    if flags != 0x02:
        raise ProtocolError("SUBSCRIBE with wrong flags")
    packet_id = _read_u16(body, 0)
    offset, filters = 2, []
    while offset < len(body):
        topic_filter, offset = _read_string(body, offset)
        if offset >= len(body):
            raise ProtocolError("SUBSCRIBE filter without QoS")
        qos = body[offset]
        offset += 1
        if qos > 2:
            raise ProtocolError("SUBSCRIBE QoS above 2")
        filters.append((topic_filter, qos))
    if not filters:
        raise ProtocolError("SUBSCRIBE without filters")
    return packet_id, filters


def suback(packet_id: int, codes: list[int]) -> bytes:
    body = _U16.pack(packet_id) + bytes(codes)
    return bytes((SUBACK << 4,)) + encode_length(len(body)) + body


def decode_unsubscribe(flags: int, body: bytes) -> tuple[int, list[str]]:
    if flags != 0x02:
        raise ProtocolError("UNSUBSCRIBE with wrong flags")
    packet_id = _read_u16(body, 0)
    offset, filters = 2, []
    while offset < len(body):
        topic_filter, offset = _read_string(body, offset)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without filters")
    return packet_id, filters


PINGRESP_PACKET = bytes((PINGRESP << 4, 0))
