"""The registry of services (services/registry.py) names what really exists: every entry point
resolves, every stage's entry is the stage of that name, and `mro-edge service` offers exactly
the registry's services."""

from __future__ import annotations

from importlib import import_module

import pytest

from mro_edge.cli import build_parser
from mro_edge.supervisor import run_services
from services.registry import BY_NAME, SERVICES, Kind, service_names


def resolve(entry: str):
    module, _, attribute = entry.partition(":")
    return getattr(import_module(module), attribute)


def test_every_entry_point_resolves_and_a_stage_entry_is_the_stage_of_that_name() -> None:
    assert len(BY_NAME) == len(SERVICES), "service names are unique"
    for service in SERVICES:
        target = resolve(service.entry)
        assert callable(target), service.name
        if service.kind is Kind.STAGE:
            assert target.name == service.name, f"{service.entry} is the {target.name} stage"
            assert service.mqtt_clients[0] == service.name, "a stage connects as mro-<station>-<stage>"


def test_the_cli_offers_exactly_the_registry_services_and_resumes_only_stages(capsys) -> None:
    parser = build_parser()
    for service in SERVICES:
        assert parser.parse_args(["service", service.name]).name == service.name
        if service.kind is Kind.STAGE:
            assert parser.parse_args(["resume", service.name]).name == service.name
        else:
            with pytest.raises(SystemExit):
                parser.parse_args(["resume", service.name])
    with pytest.raises(SystemExit):
        parser.parse_args(["service", "simulator"])  # a tool: `mro-edge simulate`
    assert "invalid choice" in capsys.readouterr().err


def test_run_starts_the_broker_first_and_leaves_out_what_it_is_told_to() -> None:
    everything = [s.name for s in run_services(with_broker=True, with_gateway=True)]
    assert everything == list(service_names()) and BY_NAME[everything[0]].kind is Kind.BROKER
    assert [s.name for s in run_services(with_broker=False, with_gateway=False)] == [
        s.name for s in SERVICES if s.kind not in (Kind.BROKER, Kind.GATEWAY)]
