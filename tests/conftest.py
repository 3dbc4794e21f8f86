"""Shared fixtures: real brokers (embedded and Mosquitto) on free ports, and the real pipeline."""

from __future__ import annotations

import pytest

from tests.brokers import start_broker
from tests.pipeline import Pipeline

BROKERS = ("embedded", "mosquitto")


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
