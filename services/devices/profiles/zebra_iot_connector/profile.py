"""The `zebra_iot_connector` profile's descriptor (one line in `services.devices.profiles.registry`)."""

from __future__ import annotations

from services.devices.profiles.base import Profile
from services.devices.profiles.zebra_iot_connector import mapping, simulator

PROFILE = Profile(
    name=mapping.NAME,
    device_kind=mapping.DEVICE_KIND,
    contract_kind=mapping.CONTRACT_KIND,
    role="readers",
    what="Zebra IoT Connector tag data events (FX7500, FX9600, ATR7000), one object or an array",
    reads=mapping.reads,
    record=mapping.record,
    simulate=simulator.simulate,
)
