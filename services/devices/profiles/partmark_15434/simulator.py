"""What a 2-D scanner sends for a part nameplate: an ISO/IEC 15434 envelope (format 06 data
identifiers, 12 or DD text element identifiers), with or without the AIM symbology identifier
and the CR/LF suffix the scanner is set to add."""

from __future__ import annotations

import random

from services.devices.profiles.base import random_part
from services.devices.profiles.partmark_15434.parser import envelope

#: The identifiers each envelope format uses for CAGE, part number and serial.
IDENTIFIERS = {"06": ("17V", "1P", "S"), "12": ("MFR", "PNR", "SER"), "DD": ("MFR", "PNR", "SER")}


def scan(cage: str, part_number: str, serial: str, *, fmt: str = "06", aim: str | None = None,
         suffix: str = "") -> bytes:
    """One scan of a part mark; `aim` such as `]d1` (Data Matrix), `suffix` such as CR LF."""
    ids = IDENTIFIERS[fmt]
    text = envelope([(fmt, list(zip(ids, (cage, part_number, serial), strict=True)))])
    return ((aim or "") + text + suffix).encode("ascii")


def simulate(rng: random.Random) -> bytes:
    """A realistic scan of a part: any envelope format, with or without AIM prefix and suffix."""
    return scan(*random_part(rng), fmt=rng.choice(sorted(IDENTIFIERS)), aim=rng.choice((None, "]d1", "]Q1")),
                suffix=rng.choice(("", "\r\n")))
