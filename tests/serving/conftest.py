"""The serving tests' fixture: `server(responder)` starts a FakeServer, closed after the test."""

from __future__ import annotations

import pytest

from tests.helpers.fake_server import FakeServer, Responder, canned


@pytest.fixture
def server():
    servers: list[FakeServer] = []

    def start(responder: Responder = canned) -> FakeServer:
        servers.append(FakeServer(responder))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
