"""The real tritonserver on free loopback ports, once per session; a real redis-server per module."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from ensemble.server import free_serve_config  # noqa: F401 - the tests import it from here


def _served(repository, log_dir):
    """A started, ready server; a failure to start fails the tests with the server's log."""
    from ensemble.server import TritonServer

    srv = TritonServer(repository, free_serve_config(), log_path=log_dir / "tritonserver.log")
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.close()
        assert code == 0, f"tritonserver exited with {code}:\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    yield from _served(repository, tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="session")
def hist_server(hist_repository, tmp_path_factory):
    """The history-aware variant (train.history_length 5), served the same way."""
    yield from _served(hist_repository, tmp_path_factory.mktemp("hist_server"))


def client_of(srv, protocol: str):
    """A client of a started server over one protocol, closed after the test."""
    from client.client import RetrievalClient

    with RetrievalClient(srv.grpc_url if protocol == "grpc" else srv.http_url, protocol) as c:
        yield c


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    yield from client_of(server, request.param)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    import redis

    from ensemble.server import free_port

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)"
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, f"redis-server exited with {process.returncode}"
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not answer in 20 s"
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)
