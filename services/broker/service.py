"""`mro-edge service broker`: the embedded MQTT 3.1.1 broker on one asyncio loop.

Listens on config.mqtt.url (or broker.listen): TLS when that is mqtts://, with an optional plain
listener beside it on loopback only (broker.plain_listen), see `listeners`. Authenticates against
the Mosquitto password file and applies the Mosquitto ACL file that `mro-edge devices` maintains
(services.broker.credentials), so access rules are the same on both brokers. Device publishes on
`mro/<station>/in/...` go through the intake spool (services/broker/spool.py) before their
PUBACK; see core.py for every guarantee.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import ssl
import sys

from services.broker import packets as p
from services.broker.connection import Connection
from services.broker.core import Broker, Limits
from services.broker.credentials import BrokerCredentials
from services.broker.spool import Spool
from shared.runtime.alarms import alarm_payload
from shared.runtime.budget import Guard, reload_storage
from shared.runtime.clock import utc_now
from shared.runtime.config import Config, ConfigError, load_config, split_listen
from shared.runtime.diskfull import STORAGE_FULL
from shared.runtime.logs import configure_logging, get_logger
from shared.runtime.messages import json_encode
from shared.runtime.stage import REFUSED_EXIT
from shared.runtime.tls import TlsProblem, server_context
from shared.runtime.topics import Topics

log = get_logger()

HOUSEKEEPING_S = 1.0
SHUTDOWN_GRACE_S = 3.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0  # a client that opens the TLS port and stalls holds nothing longer


class PortInUseError(RuntimeError):
    """The MQTT port is already bound, almost always by a Mosquitto that is already running."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"MQTT port {host}:{port} is taken (probably Mosquitto). Either set another port with "
            "MRO_MQTT_URL=mqtt://127.0.0.1:1884 or pass --no-broker to use the broker already there."
        )
        self.host, self.port = host, port


def spool_cap() -> int | None:
    """The spool's cap as the configuration says now (edge.toml and the environment, as at start)."""
    try:
        return load_config().store_cap_mb("spool")
    except (ConfigError, OSError):
        return None


def spool_path(config: Config):
    return config.data_path / "spool"


def listeners(config: Config) -> list[tuple[str, int, ssl.SSLContext | None]]:
    """(host, port, TLS context or None) of every listener. mqtt.url's scheme decides: mqtt://
    one plain listener; mqtts:// one TLS listener (client certificates required when
    broker.tls_client_ca_file is set; passwords always), plus a plain one only where
    broker.plain_listen says, which load_config allows on loopback only. broker.listen moves the
    main listener (e.g. 0.0.0.0:8883 for the hangar LAN while the services use 127.0.0.1)."""
    host, port = (split_listen(config.broker.listen, "MRO_BROKER_LISTEN") if config.broker.listen
                  else (config.mqtt.host, config.mqtt.port))
    if not config.mqtt.tls:
        return [(host, port, None)]
    found: list[tuple[str, int, ssl.SSLContext | None]] = [(host, port, server_context(config.broker))]
    if config.broker.plain_listen:
        found.append((*split_listen(config.broker.plain_listen, "MRO_BROKER_PLAIN_LISTEN"), None))
    return found


class BrokerServer:
    """The listening socket, the connections, and the broker's periodic duties."""

    def __init__(self, config: Config, limits: Limits | None = None) -> None:
        self.config = config
        self.topics = Topics(config.station)
        credentials = BrokerCredentials(config.data_path / "broker", config.station)
        credentials.ensure_service_users()
        self.storage = Guard(config.data_path, config.storage, reload=reload_storage)
        spool = Spool(spool_path(config), config.stage.map_size_mb, config.store_cap_mb("spool"), spool_cap,
                      refusal=self.storage.check)
        self.storage.open_stores = {"spool": spool.store}
        self.broker = Broker(credentials, spool, self.topics, limits)
        self.broker.storage_guard = self.storage
        self.refusing: str | None = None
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for host, port, context in listeners(self.config):
            try:
                self._servers.append(await asyncio.start_server(
                    self._accept, host, port, reuse_address=True, limit=1 << 20, backlog=1024, ssl=context,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if context else None))
            except OSError as exc:
                for server in self._servers:
                    server.close()
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(host, port) from None
                raise
            log.info("broker listening", listen=f"{host}:{port}", tls=context is not None,
                     client_certificates=bool(context and context.verify_mode == ssl.CERT_REQUIRED))
        self._tasks = [asyncio.create_task(self.broker.run_committer(), name="spool-committer"),
                       asyncio.create_task(self._housekeeping(), name="housekeeping")]
        log.info("broker up", spool_depth=self.broker.spool.depth, state_transition="BROKER_UP")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = Connection(self.broker, reader, writer)
        self.connections.add(connection)
        try:
            await connection.serve()
        except Exception as exc:  # a bug must cost one connection, never the broker
            log.error("connection failed", error=type(exc).__name__, detail=str(exc)[:200],
                      state_transition="CLIENT_ERROR")
            connection.close()
        finally:
            self.connections.discard(connection)

    async def _housekeeping(self) -> None:
        """Keep-alive and connect timeouts, credential changes, session expiry, deletes, status."""
        interval = self.config.stage.status_interval_s
        next_status = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            now = loop.time()
            self._close_silent_connections(now)
            self.broker.refresh_credentials()
            self.broker.expire_sessions()
            self.broker.flush_deletes_soon()
            if self._storage_changed():
                next_status = now
            if now >= next_status:
                next_status = now + interval
                self.publish_status("frozen" if self.refusing else "up")

    def _storage_changed(self) -> bool:
        """Measure the storage budget if due; one alarm on entering refusal, one on leaving it."""
        reason = self.storage.check()
        if (reason is None) == (self.refusing is None):
            self.refusing = reason
            return False
        self.refusing = reason
        if reason is not None:
            log.error("storage full: device publishes are not acknowledged", reason=reason,
                      state_transition="STORAGE_FULL")
            self.alarm(STORAGE_FULL, f"{reason}. The broker sends no PUBACK for new device publishes "
                       "(devices keep and re-send them); what it acknowledged stays in its spool. It resumes "
                       "by itself once there is room (README, 'Storage budget and a full disk')")
        else:
            log.info("storage has room again: device publishes accepted", state_transition="STORAGE_RESUMED")
            self.alarm("storage_resumed", "there is room in the storage budget again: device publishes are "
                       "acknowledged")
        return True

    def alarm(self, kind: str, detail: str) -> None:
        self.broker.publish_internal(p.Publish(self.topics.alarm, alarm_payload("broker", kind, detail), 1, False))

    def _close_silent_connections(self, now: float) -> None:
        """No CONNECT within the connect timeout, or nothing heard for 1.5 keep-alive periods."""
        connect_timeout_s = self.broker.limits.connect_timeout_s
        for connection in list(self.connections):
            session = connection.session
            if session is None and now - connection.opened > connect_timeout_s:
                connection.close()
            elif connection.keepalive and now - connection.last_seen > 1.5 * connection.keepalive:
                log.info("keep-alive expired", client_id=session and session.client_id,
                         state_transition="CLIENT_TIMED_OUT")
                connection.close()

    def publish_status(self, state: str) -> None:
        status = {"service": "broker", "state": state, "pid": os.getpid(), "at": utc_now(),
                  **self.broker.status(), "storage": {"refusing": self.refusing or ""}}
        self.broker.publish_internal(p.Publish(self.topics.status("broker"), json_encode(status), 1, True))

    async def stop(self) -> None:
        """Stop accepting, let the last commit finish (its PUBACKs go out), then close."""
        for server in self._servers:
            server.close()
        self.publish_status("down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE_S
        while self.broker.pending and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the PUBACKs of that commit leave on the next iterations
        for connection in list(self.connections):
            connection.will = None
            connection.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.broker.close()
        log.info("broker stopped", state_transition="BROKER_DOWN")


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run the broker until `stop` is set."""
    server = BrokerServer(config)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()


def run_broker(config: Config) -> None:
    """Blocking: serve MQTT on config.mqtt.url until SIGTERM or SIGINT."""
    configure_logging("broker", config.station)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop)

    try:
        asyncio.run(main())
    except TlsProblem as exc:
        # a person has to supply the files: REFUSED_EXIT, so `mro-edge run` does not restart it
        log.critical("broker cannot start its TLS listener", detail=str(exc), state_transition="REFUSED")
        print(f"mro-edge broker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(REFUSED_EXIT) from None
