"""Torque controllers speaking Atlas Copco Open Protocol: codec, typed MIDs, integrator client.

Not yet a registered service: the bridge process that publishes results as contract
`torque_event` records is wired in later (see docs/architecture.md, "Torque controllers")."""
