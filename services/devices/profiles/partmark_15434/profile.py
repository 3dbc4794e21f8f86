"""The `partmark_15434` profile's descriptor (one line in `services.devices.profiles.registry`)."""

from __future__ import annotations

from services.devices.profiles.base import Profile
from services.devices.profiles.partmark_15434 import mapping, simulator

PROFILE = Profile(
    name=mapping.NAME,
    device_kind=mapping.DEVICE_KIND,
    contract_kind=mapping.CONTRACT_KIND,
    role="scanners",
    what="part-mark scans: ISO/IEC 15434 envelopes (MH10.8.2 DIs, ATA Spec 2000 TEIs) or TEI text",
    reads=mapping.reads,
    record=mapping.record,
    simulate=simulator.simulate,
)
