"""`mro-edge service mcc`: subscribe (read-only) to what the box publishes and serve the page.

The MCC only subscribes; it publishes nothing (no status, no will), so its broker user needs
read access and nothing else, on exactly these filters:

    mro/<station>/status/+     every service's retained status and the link state
    mro/<station>/dlq/+        DLQ reports (rule, path, device; the page never shows values)
    mro/<station>/alarm        alarms
    mro/<station>/receipt/+    device receipts: per-device last seen

A non-persistent session: after a restart the retained statuses give the state back at once;
the DLQ, alarms and rate history start again (they are bounded views, not a record).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import uvicorn

from services.mcc.state import BoxState
from services.mcc.users import users_path
from services.mcc.web import make_app
from services.registry import SERVICES
from shared.runtime.config import Config, split_listen
from shared.runtime.logs import configure_logging, get_logger
from shared.runtime.mqtt import Inbound, MqttLink, client_id_for, service_credentials
from shared.runtime.topics import Topics

CLIENT = "mcc"


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    """Everything the MCC reads: the filters its read-only broker user must be granted."""
    return [(topics.status_all, 0), (topics.dlq_all, 0), (topics.alarm, 0), (topics.receipt_all, 0)]


def watched_services() -> tuple[str, ...]:
    """The box services whose status the page shows, in start order."""
    return tuple(s.name for s in SERVICES if s.on_box and s.publishes_status)


class Feed:
    """Hands each MQTT message to the model, under the lock the web side reads with."""

    def __init__(self, topics: Topics, state: BoxState, lock: threading.Lock) -> None:
        self.prefix = topics.root + "/"
        self.state = state
        self.lock = lock
        self.log = get_logger(component="mcc-feed")

    def take(self, message: Inbound) -> None:
        rest = message.topic.removeprefix(self.prefix).split("/")
        if rest[0] == "receipt" and len(rest) == 2:
            with self.lock:
                self.state.on_receipt(rest[1][:64], message.received_at)
            return
        try:
            body = json.loads(message.payload) if message.payload else None
        except ValueError:
            self.log.warning("unreadable message ignored", topic=message.topic)
            return
        if not isinstance(body, dict):
            return
        with self.lock:
            if rest[0] == "status" and len(rest) == 2:
                self.state.on_status(rest[1][:32], body, message.received_at)
            elif rest[0] == "dlq" and len(rest) == 2:
                self.state.on_dlq(rest[1], body, message.received_at)
            elif rest == ["alarm"]:
                self.state.on_alarm(body, message.received_at)


def run_mcc(config: Config) -> None:
    configure_logging("mcc", config.station)
    log = get_logger()
    stop = threading.Event()
    topics = Topics(config.station)
    state = BoxState(config.station, watched_services())
    lock = threading.Lock()
    feed = Feed(topics, state, lock)
    login = service_credentials(config, "mcc")
    link = MqttLink(config, client_id=client_id_for(config, CLIENT, login), credentials=login,
                    subscriptions=subscriptions(topics), persistent=False)

    def consume() -> None:
        while not stop.is_set():
            try:
                message = link.inbox.get(timeout=0.5)
            except Exception:
                continue
            feed.take(message)
            link.ack(message)

    host, port = split_listen(config.mcc.listen, "MRO_MCC_LISTEN (mcc.listen)")
    app = make_app(state, lock, users_path(Path(config.data_dir)), metrics_public=config.mcc.metrics_public,
                   session_hours=config.mcc.session_hours)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=2))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(server, "should_exit", True))
    link.start()
    worker = threading.Thread(target=consume, name="mcc-feed", daemon=True)
    worker.start()
    log.info("mcc started", state_transition="STARTED", listen=config.mcc.listen)
    try:
        server.run()
    finally:
        stop.set()
        worker.join(timeout=2)
        link.stop()
        log.info("mcc stopped", state_transition="STOPPED")
