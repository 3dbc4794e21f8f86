"""`PROFILES`: every device profile, by name. Ingest, the CLI, the simulators and the tests all
read this one list: a new device kind is one folder under `services/devices/profiles/` and one
line here (and its topic kind in `shared.runtime.topics`)."""

from __future__ import annotations

from services.devices.profiles.base import Profile
from services.devices.profiles.impinj_r700.profile import PROFILE as IMPINJ_R700
from services.devices.profiles.open_protocol.profile import PROFILE as OPEN_PROTOCOL
from services.devices.profiles.partmark_15434.profile import PROFILE as PARTMARK_15434
from services.devices.profiles.zebra_iot_connector.profile import PROFILE as ZEBRA_IOT_CONNECTOR

PROFILES: dict[str, Profile] = {p.name: p for p in (ZEBRA_IOT_CONNECTOR, IMPINJ_R700, PARTMARK_15434, OPEN_PROTOCOL)}
#: the profile of each intake topic kind
BY_KIND: dict[str, Profile] = {p.device_kind: p for p in PROFILES.values()}
#: the contract's device kind of a record made from a raw device's read
CONTRACT_KIND: dict[str, str] = {p.device_kind: p.contract_kind for p in PROFILES.values()}
#: the `[places.<id>]` list that names devices of each kind
DEVICE_ROLE: dict[str, str] = {p.device_kind: p.role for p in PROFILES.values()}


def profile_of_kind(device_kind: str) -> Profile:
    """The profile of an intake topic kind (KeyError for a contract kind, which has none)."""
    return BY_KIND[device_kind]


def profile_names() -> str:
    return ", ".join(PROFILES)
