"""Torque controllers speaking Open Protocol, through the bridge: topic kind `torque_controller`."""
