"""`python -m services.broker`: run the embedded broker on its own (MRO_MQTT_URL, MRO_DATA_DIR,
MRO_STATION select port, data directory and station); tests start it this way."""

from __future__ import annotations

import sys

from services.broker.service import PortInUseError, run_broker
from shared.runtime.config import load_config


def main() -> int:
    try:
        run_broker(load_config())
    except PortInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
