"""Shared fixtures: real brokers (embedded and Mosquitto) on free ports, and the real pipeline."""

from __future__ import annotations

import pytest

from tests.brokers import start_broker
from tests.pipeline import Pipeline

BROKERS = ("embedded", "mosquitto")

# Fixture scopes wider than a test but narrower than the session: the tests of one module (or
# class) that share such a fixture share one broker, stack or gateway that took seconds to start.
SHARED_SCOPES = ("class", "module", "package")
# Modules whose tests push thousands of records through a whole stack and time out when two of
# them compete for the 2 cores (their devices' resends then pile up): under xdist they all run
# one after another on one worker, beside the lighter tests of the other workers.
HEAVY_MODULES = ("tests/integration/test_reconcile.py", "tests/integration/test_intake_stock.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup` (`make test`), keep together on one worker the tests of
    a module that share a module- or class-scoped fixture: split over workers, each worker would
    start that fixture again, and tests written against its state in file order would see another
    state; and the HEAVY_MODULES' tests together. Every other test is handed out on its own, so
    the workers stay evenly busy.
    tryfirst: xdist's own hook reads the marks afterwards. Without xdist the mark does nothing."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if module in HEAVY_MODULES:
            item.add_marker(pytest.mark.xdist_group("heavy"))
            continue
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if any(definition.scope in SHARED_SCOPES
               for definitions in info.name2fixturedefs.values() for definition in definitions):
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(params=BROKERS)
def broker(request, tmp_path):
    proc = start_broker(request.param, tmp_path / "data")
    yield proc
    proc.stop()


@pytest.fixture
def pipeline(broker, tmp_path):
    pipe = Pipeline(broker, tmp_path / "data")
    pipe.start()
    yield pipe
    pipe.stop()
