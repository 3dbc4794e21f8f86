"""The `open_protocol` profile's descriptor (one line in `services.devices.profiles.registry`)."""

from __future__ import annotations

from services.devices.profiles.base import Profile
from services.devices.profiles.open_protocol import mapping, simulator

PROFILE = Profile(
    name=mapping.NAME,
    device_kind=mapping.DEVICE_KIND,
    contract_kind=mapping.CONTRACT_KIND,
    role="controllers",
    what="Open Protocol MID 0061 tightening results, published by the box's torque bridge",
    reads=mapping.reads,
    record=mapping.record,
    simulate=simulator.simulate,
    registered=False,
)
