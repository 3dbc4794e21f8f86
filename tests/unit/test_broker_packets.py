"""The embedded broker's MQTT codec: round trips, stream splitting at every boundary, and refusal of
malformed packets (property-based: the splitter must never hang, crash or mis-frame)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.broker import packets as p

topics = st.text(st.characters(blacklist_characters="+#\0", blacklist_categories=["Cs"]), min_size=1,
                 max_size=40)
payloads = st.binary(max_size=3000)


def _utf8(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, *, username: str | None = None, password: str | None = None,
                   clean: bool = True, will: tuple[str, bytes, int, bool] | None = None, keepalive: int = 30,
                   name: str = "MQTT", level: int = 4) -> bytes:
    flags = 0x02 if clean else 0
    payload = _utf8(client_id)
    if will:
        flags |= 0x04 | (will[2] << 3) | (0x20 if will[3] else 0)
        payload += _utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    body = _utf8(name) + bytes([level, flags]) + struct.pack("!H", keepalive) + payload
    return bytes([p.CONNECT << 4]) + p.encode_length(len(body)) + body


@given(st.integers(0, 268_435_455))
def test_remaining_length_round_trips(length: int) -> None:
    encoded = p.encode_length(length)
    assert 1 <= len(encoded) <= 4
    packet = bytes([p.PINGREQ << 4]) + encoded
    splitter = p.PacketSplitter(max_packet=300_000_000)
    assert splitter.feed(packet) == ([] if length else [(p.PINGREQ, 0, b"")])


@given(st.lists(st.tuples(topics, payloads, st.integers(0, 2), st.booleans(), st.booleans()), min_size=1,
                max_size=20), st.data())
def test_publishes_survive_any_split_of_the_stream(messages, data) -> None:
    stream = b"".join(
        p.encode_publish(t, body, q, retain=r, dup=d and q > 0, packet_id=i + 1 if q else 0)
        for i, (t, body, q, r, d) in enumerate(messages)
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    splitter = p.PacketSplitter(max_packet=1 << 20)
    found = []
    last = 0
    for cut in cuts + [len(stream)]:
        found += splitter.feed(stream[last:cut])
        last = cut
    decoded = [p.decode_publish(flags, body) for kind, flags, body in found]
    assert all(kind == p.PUBLISH for kind, _, _ in found)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in decoded] == [
        (t, b, q, r) for t, b, q, r, _ in messages]
    assert [m.packet_id for m in decoded] == [i + 1 if q else 0 for i, (_, _, q, _, _) in enumerate(messages)]


@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_splitter_or_the_decoders(garbage: bytes) -> None:
    splitter = p.PacketSplitter(max_packet=1000)
    try:
        packets = splitter.feed(garbage)
    except p.ProtocolError:
        return
    decoders: dict[int, Callable[[int, bytes], object]] = {
        p.CONNECT: lambda _flags, body: p.decode_connect(body), p.PUBLISH: p.decode_publish,
        p.SUBSCRIBE: p.decode_subscribe, p.UNSUBSCRIBE: p.decode_unsubscribe,
        p.PUBACK: lambda _flags, body: p.decode_packet_id(body)}
    for kind, flags, body in packets:
        decoder = decoders.get(kind)
        if decoder:
            try:
                decoder(flags, body)
            except p.ProtocolError:
                pass


def test_a_declared_length_over_the_limit_is_refused_before_buffering() -> None:
    splitter = p.PacketSplitter(max_packet=100)
    with pytest.raises(p.ProtocolError, match="exceeds the limit"):
        splitter.feed(bytes([p.PUBLISH << 4]) + p.encode_length(101))


def test_a_five_byte_length_is_refused() -> None:
    with pytest.raises(p.ProtocolError, match="longer than 4 bytes"):
        p.PacketSplitter(max_packet=1 << 30).feed(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))


@given(st.text(min_size=0, max_size=23).filter(lambda s: "\0" not in s), st.text(max_size=30).filter(
    lambda s: "\0" not in s), st.text(max_size=30).filter(lambda s: "\0" not in s), st.booleans(),
    st.integers(0, 65535))
def test_connect_round_trips(client_id, username, password, clean, keepalive) -> None:
    packet = connect_packet(client_id, username=username, password=password, clean=clean, keepalive=keepalive,
                            will=("mro/HGR1/status/x", b"down", 1, True))
    [(kind, _, body)] = p.PacketSplitter(1 << 16).feed(packet)
    connect = p.decode_connect(body)
    assert kind == p.CONNECT
    assert (connect.client_id, connect.username, connect.password, connect.clean_session,
            connect.keepalive) == (client_id, username, password, clean, keepalive)
    assert (connect.will_topic, connect.will_payload, connect.will_qos, connect.will_retain) == (
        "mro/HGR1/status/x", b"down", 1, True)


def test_mqtt5_connect_is_answered_as_unsupported_not_parsed() -> None:
    [(_, _, body)] = p.PacketSplitter(1 << 16).feed(connect_packet("c", level=5))
    assert p.decode_connect(body).protocol_level == 5


@pytest.mark.parametrize("flags, body, error", [
    (0x00, b"\x00\x01\x00\x03a/b\x01", "wrong flags"),
    (0x02, b"\x00\x01", "without filters"),
    (0x02, b"\x00\x01\x00\x03a/b\x03", "QoS above 2"),
    (0x02, b"\x00\x01\x00\x03a/b", "without QoS"),
])
def test_bad_subscribes_are_protocol_errors(flags: int, body: bytes, error: str) -> None:
    with pytest.raises(p.ProtocolError, match=error):
        p.decode_subscribe(flags, body)


@pytest.mark.parametrize("flags, body, error", [
    (0x06, b"\x00\x01a\x00\x01", "QoS 3"),
    (0x02, b"\x00\x03a/#\x00\x01", "wildcard"),
    (0x02, b"\x00\x01a\x00\x00", "identifier 0"),
    (0x00, b"\x00\x02\xff\xfe", "not UTF-8"),
])
def test_bad_publishes_are_protocol_errors(flags: int, body: bytes, error: str) -> None:
    with pytest.raises(p.ProtocolError, match=error):
        p.decode_publish(flags, body)
