"""Checks `mro-edge run` (and the client commands) make before anything starts, each answering
in one line a person can act on:

* every port the stack would listen on, all at once, with one command that moves them all;
* the broker's answer to the service login: no broker, bad login, or not authorised, told
  apart at once from the CONNACK instead of after a 10 s timeout;
* whether the broker lets an anonymous client publish device records (it must not: every
  device has its own login). It is tried, not guessed: an anonymous CONNECT, then an anonymous
  QoS 0 publish on mro/<station>/in/<kind>/<probe> for every device kind, watched by a service
  subscriber. QoS 0 is never queued for offline sessions, so a stopped ingest never sees it.
"""

from __future__ import annotations

import os
import queue
import secrets
import shlex
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from shared.runtime.config import Config
from shared.runtime.config import split_listen as split_broker_listen
from shared.runtime.mqtt import mqtt_connack, use_tls
from shared.runtime.tls import TlsProblem, client_context, explain
from shared.runtime.topics import ALL_DEVICE_KINDS, Topics

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


class BrokerProblem(Exception):
    """The broker cannot be used as configured; the message says why and what to do.
    `unreachable`: nothing answered (as opposed to a broker that refused the login)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Listener:
    what: str  # "MQTT broker", "reference gateway"
    host: str
    port: int
    env: str  # the variable that moves it
    value: str  # the variable's value for a given port, with {port}


def listeners(config: Config, *, with_broker: bool, with_gateway: bool) -> list[Listener]:
    from services.gateway.server import split_listen

    found = []
    if with_broker:
        scheme = config.mqtt.url.partition("://")[0]
        if config.broker.listen:
            host, port = split_broker_listen(config.broker.listen, "MRO_BROKER_LISTEN")
            found.append(Listener("MQTT broker", host, port, "MRO_BROKER_LISTEN", f"{host}:{{port}}"))
        else:
            host, port = config.mqtt.host, config.mqtt.port
            found.append(Listener("MQTT broker", host, port, "MRO_MQTT_URL", f"{scheme}://{host}:{{port}}"))
        if config.mqtt.tls and config.broker.plain_listen:
            host, port = split_broker_listen(config.broker.plain_listen, "MRO_BROKER_PLAIN_LISTEN")
            found.append(Listener("plain MQTT beside TLS", host, port, "MRO_BROKER_PLAIN_LISTEN",
                                  f"{host}:{{port}}"))
    if with_gateway:
        host, port = split_listen(config.gateway.listen)
        shown = f"[{host}]" if ":" in host else host
        found.append(Listener("reference gateway", host, port, "MRO_GATEWAY_LISTEN", f"{shown}:{{port}}"))
    return found


def _next_free(host: str, port: int, avoid: set[int]) -> int:
    for candidate in range(port + 1, min(port + 200, 65535)):
        if candidate not in avoid and port_free(host, candidate):
            return candidate
    return port


def check_ports(config: Config, *, with_broker: bool, with_gateway: bool, argv: list[str],
                env: Mapping[str, str] | None = None) -> str | None:
    """None if every port is free; else one message naming all taken ports and one command that
    moves them all to free ones (the uplink follows MRO_GATEWAY_LISTEN unless its URL is set)."""
    environ = os.environ if env is None else env
    wanted = listeners(config, with_broker=with_broker, with_gateway=with_gateway)
    taken = [item for item in wanted if not port_free(item.host, item.port)]
    if not taken:
        return None
    avoid = {item.port for item in wanted}
    moves = []
    for item in taken:
        port = _next_free(item.host, item.port, avoid)
        avoid.add(port)
        moves.append(f"{item.env}={item.value.format(port=port)}")
        if item.env == "MRO_GATEWAY_LISTEN" and "MRO_LINK_GATEWAY_URL" in environ:
            moves.append(f"MRO_LINK_GATEWAY_URL=http://{item.value.format(port=port)}")
    command = "make run" if environ.get("MAKELEVEL") else "mro-edge " + " ".join(shlex.quote(a) for a in argv)
    names = ", ".join(f"{item.host}:{item.port} ({item.what})" for item in taken)
    others = []
    if any(item.env in ("MRO_MQTT_URL", "MRO_BROKER_LISTEN") for item in taken):
        others.append("--no-broker to use the broker already at MRO_MQTT_URL")
    if any(item.env == "MRO_GATEWAY_LISTEN" for item in taken):
        others.append("--no-gateway to push to the gateway at MRO_LINK_GATEWAY_URL")
    return (f"already taken: {names}. Start on free ports with:\n  {' '.join(moves)} {command}\n"
            f"or use what is there: {'; '.join(others)}")


def check_login(config: Config, username: str | None, password: str | None, *, hint: str = "") -> None:
    """Raise BrokerProblem unless the broker accepts this login (CONNACK 0)."""
    url = config.mqtt.url
    try:
        tls = client_context(config.mqtt)
    except TlsProblem as exc:
        raise BrokerProblem(str(exc)) from None
    try:
        code = mqtt_connack(config.mqtt.port, username, password, timeout=3.0, host=config.mqtt.host, tls=tls)
    except ssl.SSLError as exc:
        raise BrokerProblem(explain(exc, config.mqtt)) from None
    except OSError as exc:
        if tls is not None and isinstance(exc, ConnectionError) and not isinstance(exc, ConnectionRefusedError):
            # closed after the handshake: a client certificate the broker wants or refused
            raise BrokerProblem(explain(ConnectionResetError(str(exc)), config.mqtt)) from None
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise BrokerProblem(
            f"no MQTT broker answers at {url} ({reason.lower()}): start it, or set MRO_MQTT_URL "
            "to its address" + (f"; {hint}" if hint else ""),
            unreachable=True,
        ) from None
    if code == 0:
        return
    reason = CONNACK_REASONS.get(code, f"refused with CONNACK code {code}")
    who = f"user {username!r}" if username else "an anonymous login"
    if code in (4, 5):
        advice = (
            "set MRO_MQTT_USERNAME and MRO_MQTT_PASSWORD to a login of that broker, or give it the services' "
            f"password file ({config.data_path.resolve() / 'broker' / 'passwd'})"
        )
    else:
        advice = "check the broker's log"
    raise BrokerProblem(f"the broker at {url} refused {who}: {reason} (CONNACK {code}); {advice}")


@dataclass
class AnonymousProbe:
    connects: bool  # the broker accepted a CONNECT without credentials
    delivered: str | None = None  # the device topic an anonymous publish got through on


def _anonymous_connects(config: Config) -> bool:
    try:
        return mqtt_connack(config.mqtt.port, None, None, timeout=3.0, host=config.mqtt.host,
                            tls=client_context(config.mqtt)) == 0
    except (OSError, TlsProblem):
        return False


def probe_anonymous(config: Config, service_login: tuple[str, str], wait_s: float = 2.0) -> AnonymousProbe:
    """Try it: an anonymous CONNECT, then anonymous publishes a service subscriber watches for."""
    if not _anonymous_connects(config):
        return AnonymousProbe(False)
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    probe = f"anonymous-probe-{secrets.token_hex(6)}"
    device_topics = Topics(config.station)
    topics = [device_topics.device_in(kind, probe) for kind in ALL_DEVICE_KINDS]
    arrived: queue.SimpleQueue[str] = queue.SimpleQueue()
    ready: queue.SimpleQueue[str] = queue.SimpleQueue()

    def client(name: str, login: tuple[str, str] | None) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"mro-{name}-{probe}", clean_session=True,
                        protocol=paho.MQTTv311)
        if login:
            c.username_pw_set(*login)
        use_tls(c, config.mqtt)
        return c

    watcher = client("watch", service_login)
    watcher.on_connect = lambda c, *_: c.subscribe(device_topics.device_in("+", probe), qos=0)
    watcher.on_subscribe = lambda *_: ready.put("watcher")
    watcher.on_message = lambda _c, _u, message: arrived.put(message.topic)
    anonymous = client("anon", None)
    anonymous.on_connect = lambda _c, _u, _f, code, _p: ready.put(
        "anonymous" if not code.is_failure else "refused"
    )
    result = AnonymousProbe(True)
    try:
        watcher.connect(config.mqtt.host, config.mqtt.port, keepalive=10)
        watcher.loop_start()
        if ready.get(timeout=wait_s) != "watcher":
            return result
        anonymous.connect(config.mqtt.host, config.mqtt.port, keepalive=10)
        anonymous.loop_start()
        if ready.get(timeout=wait_s) != "anonymous":
            return AnonymousProbe(False)
        for topic in topics:
            anonymous.publish(topic, b"mro-edge anonymous-publish probe; ignore", qos=0)
        result.delivered = arrived.get(timeout=wait_s)
    except (OSError, queue.Empty):
        pass
    finally:
        for c in (anonymous, watcher):
            try:
                c.disconnect()
                c.loop_stop()
            except Exception:  # closing a probe client must never mask the answer
                pass
    return result


def anonymous_message(config: Config, topic: str) -> str:
    return (
        f"the broker at {config.mqtt.url} lets anonymous clients publish device records (an anonymous "
        f"publish on {topic} was delivered): anyone on the network could record data as any device. "
        "Refuse anonymous clients (Mosquitto: allow_anonymous false, with password_file and acl_file as in "
        "config/mosquitto/mosquitto.conf), or, knowingly, start with --allow-anonymous-broker "
        "(logged and alarmed on mro/<station>/alarm)"
    )
