"""Gateway fixtures: a real gateway per database backend (SQLite, PostgreSQL) and an edge registered at it."""

from __future__ import annotations

import pytest

from tests.edge import database
from tests.support.gateway import ThreadedGateway
from tests.support.gateway_edge import Edge


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def gateway(db_url):
    with ThreadedGateway(db_url) as gw:
        yield gw


@pytest.fixture
def edge(db_url, gateway):
    e = Edge(db_url, gateway.url)
    yield e
    e.close()
