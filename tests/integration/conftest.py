"""The real tritonserver on free loopback ports, once per session."""

from __future__ import annotations

import pytest

from ensemble.server import free_serve_config  # noqa: F401 - the tests import it from here


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    """A started, ready server; a failure to start fails the tests with the server's log."""
    from ensemble.server import TritonServer

    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    srv = TritonServer(repository, free_serve_config(), log_path=log)
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.close()
        assert code == 0, f"tritonserver exited with {code}:\n{srv.log_tail()}"


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    from client.client import RetrievalClient

    url = server.grpc_url if request.param == "grpc" else server.http_url
    with RetrievalClient(url, request.param) as c:
        yield c
