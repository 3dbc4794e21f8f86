"""The one alarm payload, published on `mro/<station>/alarm` for maintenance control.

`detail` says what happened and what to do; it is cut to ALARM_DETAIL_MAX characters so a
long exception text never floods the dashboard. Extra fields (the link state, an epoch) are
machine-readable context, never free text from devices.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.runtime.clock import utc_now

ALARM_DETAIL_MAX = 500
_encode = msgspec.json.Encoder().encode


def alarm_payload(service: str, kind: str, detail: str, *, detail_max: int = ALARM_DETAIL_MAX,
                  **context: Any) -> bytes:
    """JSON `{"service", "alarm", "detail", "at", ...context}` for the alarm topic.

    `detail_max` is larger only for a detail that is itself the recovery procedure (the sign
    stage's refusals), which an operator must read whole."""
    return _encode({"service": service, "alarm": kind, "detail": detail[:detail_max], "at": utc_now(),
                    **context})
