"""The one list of the box's services: what each one is and how it starts.

`mro-edge service NAME` starts a service from here, `mro-edge run` supervises them in this
order, and tests/integration/test_compose.py holds compose.yaml to it (one container per
service that runs on the box). A new service is added here and nowhere else.

Entry points are strings, imported only when the service starts, so reading the list costs
no service's imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from importlib import import_module

from shared.runtime.config import Config


class Kind(StrEnum):
    BROKER = "broker"  # the embedded MQTT broker (compose runs Mosquitto instead)
    GATEWAY = "gateway"  # the reference central gateway, off the box
    STAGE = "stage"  # a pipeline stage: a `shared.runtime.stage.Stage` run by `run_stage`
    MONITOR = "monitor"  # watches and publishes status, records nothing
    BRIDGE = "bridge"  # speaks a device's own protocol and publishes for it on its `in` topic
    VIEW = "view"  # only subscribes and shows (the MCC page and /metrics): publishes nothing


@dataclass(frozen=True)
class Service:
    name: str
    kind: Kind
    entry: str  # "module:attribute": the Stage class of a stage, else a function of the Config
    on_box: bool  # runs on the edge box; False: central, started locally only by `mro-edge run`
    # the connections it makes, each with client id mro-<station>-<each>-<tag> as its own broker user
    # (services/broker/credentials.py: SERVICE_ACL, service_client_id)
    mqtt_clients: tuple[str, ...] = ()

    @property
    def publishes_status(self) -> bool:
        """Its own retained `status/<name>` says when it is up."""
        return self.kind in (Kind.STAGE, Kind.MONITOR, Kind.BRIDGE)

    def run(self, config: Config) -> None:
        """Run the service in this process until it is told to stop."""
        module, _, attribute = self.entry.partition(":")
        target: Callable = getattr(import_module(module), attribute)
        if self.kind is Kind.STAGE:
            from shared.runtime.stage import run_stage

            run_stage(target(), config)
        else:
            target(config)


SERVICES: tuple[Service, ...] = (
    Service("broker", Kind.BROKER, "services.broker.service:run_broker", on_box=True),
    Service("gateway", Kind.GATEWAY, "services.gateway.server:run_gateway", on_box=False),
    Service("ingest", Kind.STAGE, "services.ingest.stage:Ingest", on_box=True, mqtt_clients=("ingest",)),
    Service(
        "validate", Kind.STAGE, "services.validate.stage:Validate", on_box=True, mqtt_clients=("validate",)
    ),
    Service("sign", Kind.STAGE, "services.sign.stage:Sign", on_box=True, mqtt_clients=("sign", "sign-alarm")),
    Service("uplink", Kind.STAGE, "services.uplink.stage:Uplink", on_box=True, mqtt_clients=("uplink",)),
    Service(
        "heartbeat",
        Kind.MONITOR,
        "services.heartbeat.service:run_heartbeat",
        on_box=True,
        mqtt_clients=("heartbeat",),
    ),
    Service("torque", Kind.BRIDGE, "services.torque.bridge:run_bridge", on_box=True, mqtt_clients=("torque",)),
    Service("mcc", Kind.VIEW, "services.mcc.service:run_mcc", on_box=True, mqtt_clients=("mcc",)),
)
BY_NAME = {service.name: service for service in SERVICES}


def service_names(*kinds: Kind) -> tuple[str, ...]:
    """The services of these kinds (every service if none is given), in start order."""
    return tuple(s.name for s in SERVICES if not kinds or s.kind in kinds)
