"""The simulated repair station's people, aircraft and tools, read from the registries the
validate stage judges against (`config/registries/`), so simulated records pass compliance.

Technicians sign with TEST keys derived from public text (`shared.compliance.esign.
simulator_seed`); the simulator uses a technician only if the registered public key is the
derived one. See config/registries/README.md: these keys are for the simulator fleet only.
"""

from __future__ import annotations

import math
import zlib
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path

from shared.compliance.esign import simulator_seed
from shared.compliance.registry import AircraftEntry, Registry, Technician, ToolEntry, load_registry
from shared.compliance.rules import RELEASE_KINDS, inspection_kinds
from shared.compliance.settings import DEFAULT_REGISTRIES
from shared.ledger.keys import SigningKey

_EPOCH = datetime(2015, 1, 1, tzinfo=UTC)
_ROLES = ("maintain", "certify", "inspect", "rii")


class Fleet:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.keys: dict[str, SigningKey] = {}
        for cert_no, technician in registry.technicians.items():
            key = SigningKey(simulator_seed(cert_no))
            if technician.public_key == key.public_bytes:
                self.keys[cert_no] = key
        self._people: dict[tuple, list[tuple[str, str]]] = {}

    # --- people --------------------------------------------------------------------------------

    def people(self, role: str, chapter: str, day: date, *, action: str | None = None,
               inspection_type: str | None = None, signing: bool = False) -> list[tuple[str, str]]:
        """(cert_no, cert_kind) pairs that may do `role` at `chapter` on `day` without any
        compliance finding; `signing` keeps only people the simulator holds a key for."""
        cache_key = (role, chapter, day, action, inspection_type, signing)
        found = self._people.get(cache_key)
        if found is None:
            found = self._people[cache_key] = [
                (t.cert_no, kind) for t in self.registry.technicians.values()
                for kind in self._kinds(t, role, chapter, day, action, inspection_type)
                if not signing or t.cert_no in self.keys]
            found.sort()
        return found

    @staticmethod
    def _kinds(t: Technician, role: str, chapter: str, day: date, action, inspection_type) -> list[str]:
        if t.suspended_on(day):
            return []
        auths = t.authorisations_on(day, chapter)
        maintain = any(
            "maintain" in a.privileges and ("*" in a.actions or action is None or action in a.actions)
            for a in auths
        )
        allowed: frozenset[str] | None
        if role == "maintain":
            allowed = None if maintain else frozenset()
        elif role == "certify":
            allowed = (
                RELEASE_KINDS[chapter]
                if maintain and any("certify" in a.privileges for a in auths)
                else frozenset()
            )
        else:
            allowed = (inspection_kinds(inspection_type or "RII", chapter)
                       if any(role in a.privileges for a in auths) else frozenset())
        return [kind for kind, certs in sorted(t.certificates.items())
                if any(c.valid_on(day) for c in certs) and (allowed is None or kind in allowed)]

    # --- aircraft and tools --------------------------------------------------------------------

    def aircraft(self, day: date) -> list[AircraftEntry]:
        return [a for a in self.registry.aircraft.values()
                if (a.registration_expires is None or day <= a.registration_expires)
                and (a.airworthiness_review_expires is None or day <= a.airworthiness_review_expires)]

    def tools(self, day: date) -> list[ToolEntry]:
        return [t for t in self.registry.tools.values() if day <= t.calibration_due]


@cache
def fleet(directory: Path = DEFAULT_REGISTRIES) -> Fleet:
    return Fleet(load_registry(directory))


def airframe_times(aircraft: AircraftEntry, moment: datetime) -> tuple[float, int]:
    """(hours, cycles) of a simulated airframe at `moment`: they only ever grow with time, so
    records reaching the box in any order agree with each other."""
    seed = zlib.crc32(f"{aircraft.type}|{aircraft.serial_number}".encode())
    elapsed_h = max((moment - _EPOCH).total_seconds() / 3600.0, 0.0)
    utilisation = 0.25 + (seed % 20) / 100.0  # flight hours per calendar hour
    sector_h = 1.2 + (seed % 7) / 5.0
    flown = elapsed_h * utilisation
    hours = math.floor((1000 + seed % 20_000 + flown) * 10) / 10
    cycles = 600 + seed % 15_000 + int(flown / sector_h)
    return hours, cycles
