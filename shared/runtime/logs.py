"""structlog JSON logs with `service`, `station`, `correlation_id` and `state_transition`.

Free text (notes, descriptions, findings, names) and secrets must never reach a log line:
the `_scrub` processor drops such keys wherever a caller passes them by mistake.

Every line a service writes is one JSON object: the standard library's loggers (uvicorn,
amqtt, httpx, warnings) are routed through the same processors, and an uncaught exception is
logged as a JSON `uncaught exception` line instead of a bare traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

import structlog

SENSITIVE_KEYS = frozenset(
    {
        "notes", "description", "findings", "name", "names", "password", "secret", "token",
        "signature", "body", "payload", "raw", "private_key",
    }
)
# Libraries that log a line per request at INFO; their warnings still come through.
QUIET_LOGGERS = ("httpx", "httpcore", "amqtt", "transitions", "asyncio")


def _scrub(_logger, _method, event_dict: dict) -> dict:
    for key in SENSITIVE_KEYS.intersection(event_dict):
        event_dict[key] = "<redacted>"
    return event_dict


def _level_number(level: str | None) -> int:
    name = (level or os.environ.get("MRO_LOG_LEVEL", "INFO")).upper()
    number = logging.getLevelName(name)
    return number if isinstance(number, int) else logging.INFO


class _NeverRaises:
    """A log stream whose failures (a reader gone: EPIPE, a full disk) never reach the service:
    losing a log line must not interrupt a commit-then-ack sequence."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


def configure_logging(service: str, station: str, level: str | None = None, *,
                      stream: TextIO | None = None) -> None:
    """JSON lines on `stream` (stderr) for structlog and for every standard-library logger."""
    safe = _NeverRaises(stream or sys.stderr)
    number = _level_number(level)

    def identity(_logger, _method, event_dict: dict) -> dict:
        # also on lines from other threads, which do not share the main thread's context
        event_dict.setdefault("service", service)
        event_dict.setdefault("station", station)
        return event_dict

    stamped: list[Any] = [
        structlog.contextvars.merge_contextvars,
        identity,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="at"),
    ]
    structlog.configure(
        processors=stamped + [_scrub, structlog.processors.format_exc_info,
                              structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(safe),  # type: ignore[arg-type]  # a TextIO in all but name
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service, station=station)

    handler = logging.StreamHandler(safe)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=stamped + [structlog.stdlib.add_logger_name, _scrub],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.setLevel(number)  # also for loggers that set their own, lower level (uvicorn)
    root.addHandler(handler)
    root.setLevel(number)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(number, logging.WARNING))
    logging.captureWarnings(True)
    _log_uncaught()


def _log_uncaught() -> None:
    def excepthook(kind, value, tb) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        structlog.get_logger().critical("uncaught exception", exc_info=(kind, value, tb),
                                        state_transition="CRASHED")

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        structlog.get_logger().critical("uncaught exception in thread",
                                        thread=getattr(args.thread, "name", None),
                                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
                                        state_transition="CRASHED")

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def get_logger(**bound) -> structlog.typing.FilteringBoundLogger:
    """A logger that follows `configure_logging` even when made at import time (binding at once
    would freeze structlog's default console configuration into a module-level logger)."""
    return structlog.get_logger(**bound)
