"""The default configuration, installed as the package `mro_edge_config` (see pyproject.toml).

Data only: `edge.toml`, `registries/` (the example registries of the simulator fleet) and
`mosquitto/mosquitto.conf`. `shared.runtime.config.DEFAULT_CONFIG` finds them through this package, in
the working tree (editable install) and in site-packages alike.
"""
