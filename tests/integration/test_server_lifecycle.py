"""ensemble.server: fails fast and loudly, stops cleanly."""

import os
import socket

import psutil
import pytest

from common.errors import ServerError
from ensemble.server import TritonServer
from tests.integration.conftest import free_serve_config

pytestmark = pytest.mark.integration


def test_a_taken_port_fails_fast(repository):
    cfg = free_serve_config()
    with socket.socket() as s:
        s.bind((cfg.host, cfg.grpc_port))
        s.listen()
        with pytest.raises(ServerError, match=f"port 127.0.0.1:{cfg.grpc_port} is already in use"):
            TritonServer(repository, cfg).start()


def test_a_repository_without_our_model_is_refused(tmp_path):
    with pytest.raises(ServerError, match="holds no 'retrieval' model; run `make ensemble` first"):
        TritonServer(tmp_path, free_serve_config()).start()


def test_a_server_that_cannot_load_fails_with_its_log(tmp_path):
    bad = tmp_path / "repo" / "retrieval"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('name: "retrieval"\nbackend: "python"\nmax_batch_size: 0\n')
    (bad / "1" / "model.py").write_text("raise RuntimeError('broken model for the test')\n")
    server = TritonServer(tmp_path / "repo", free_serve_config(), log_path=tmp_path / "log.txt")
    with pytest.raises(ServerError, match=r"(?s)exited with code \d+ before it was ready.*broken model for the test"):
        server.start().wait_ready(60)
    server.close()


def test_sigterm_stops_it_cleanly_and_frees_the_ports(repository, tmp_path):
    from ensemble.server import port_is_free

    cfg = free_serve_config()
    shm_before = set(os.listdir("/dev/shm"))
    server = TritonServer(repository, cfg, log_path=tmp_path / "log.txt").start().wait_ready()
    stubs = [p for p in psutil.Process(server.process.pid).children(recursive=True)]
    assert server.close() == 0
    assert all(port_is_free(cfg.host, p) for p in (cfg.http_port, cfg.grpc_port, cfg.metrics_port))
    # nothing left behind: no process of its group, no shared-memory region
    assert not [p for p in stubs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert {n for n in os.listdir("/dev/shm") if n.startswith("triton_python_backend_shm_region_")} - shm_before == set()
