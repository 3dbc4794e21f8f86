"""structlog JSON logs with `service`, `station`, `correlation_id` and `state_transition`.

Free text (notes, descriptions, findings, names) and secrets must never reach a log line:
the `_scrub` processor drops such keys wherever a caller passes them by mistake.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

SENSITIVE_KEYS = frozenset(
    {
        "notes", "description", "findings", "name", "names", "password", "secret", "token",
        "signature", "body", "payload", "raw", "private_key",
    }
)


def _scrub(_logger, _method, event_dict: dict) -> dict:
    for key in SENSITIVE_KEYS.intersection(event_dict):
        event_dict[key] = "<redacted>"
    return event_dict


def configure_logging(service: str, station: str, level: str | None = None) -> None:
    level_name = (level or os.environ.get("MRO_LOG_LEVEL", "INFO")).upper()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="at"),
            _scrub,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service, station=station)


def get_logger(**bound) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger().bind(**bound)
