"""The `impinj_r700` profile's descriptor (one line in `services.devices.profiles.registry`)."""

from __future__ import annotations

from services.devices.profiles.base import Profile
from services.devices.profiles.impinj_r700 import mapping, simulator

PROFILE = Profile(
    name=mapping.NAME,
    device_kind=mapping.DEVICE_KIND,
    contract_kind=mapping.CONTRACT_KIND,
    role="readers",
    what="Impinj R700 IoT device interface tagInventory events",
    reads=mapping.reads,
    record=mapping.record,
    simulate=simulator.simulate,
)
