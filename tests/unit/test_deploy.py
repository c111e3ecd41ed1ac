"""docker-compose.yml and docker/Dockerfile.cpu agree with `make serve` (no Docker engine here)."""

import re
from pathlib import Path

import pytest
import yaml

from common import contract
from common.config import ServeConfig
from ensemble.server import server_command

ROOT = Path(__file__).resolve().parents[2]
# Flags of `make serve` that only make sense for the wheel's CPU server or name local paths.
LOCAL_ONLY = {"--backend-directory", "--allow-gpu-metrics", "--pinned-memory-pool-byte-size",
              "--cuda-memory-pool-byte-size", "--model-repository", "--http-address", "--grpc-address", "--metrics-address"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _makefile_defaults():
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^([A-Z_]+) \?= (.*)$", text, flags=re.M))


def _flags(command):
    return dict(part.split("=", 1) for part in command if part.startswith("--") and "=" in part)


def test_makefile_serve_defaults_are_the_contract():
    make = _makefile_defaults()
    assert make["REPOSITORY"] == "model_repository"
    assert (make["HOST"], int(make["HTTP_PORT"]), int(make["GRPC_PORT"]), int(make["METRICS_PORT"])) == (
        contract.DEFAULT_HOST, contract.DEFAULT_HTTP_PORT, contract.DEFAULT_GRPC_PORT, contract.DEFAULT_METRICS_PORT)


@pytest.mark.parametrize("service", ["triton-gpu", "triton-cpu"])
def test_services_mount_the_repository_and_publish_loopback_ports(compose, service):
    spec = compose["services"][service]
    assert "./model_repository:/models:ro" in spec["volumes"]
    published = [p.replace("${HTTP_PORT:-8000}", "8000").replace("${GRPC_PORT:-8001}", "8001").replace("${METRICS_PORT:-8002}", "8002")
                 for p in spec["ports"]]
    assert published == [f"127.0.0.1:{p}:{p}" for p in (8000, 8001, 8002)]
    check = spec["healthcheck"]["test"]
    assert check[-1] == "http://127.0.0.1:8000/v2/health/ready"


def test_gpu_service_runs_tritonserver_with_make_serves_flags(compose):
    spec = compose["services"]["triton-gpu"]
    assert spec["image"].startswith("nvcr.io/nvidia/merlin/merlin-tensorflow:")
    assert spec["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    command = spec["command"]
    assert command[0] == "tritonserver"
    ours = _flags(server_command(Path("tritonserver"), Path("/models"), Path("/b"), ServeConfig()))
    theirs = _flags(command)
    assert theirs["--model-repository"] == "/models"
    for flag, value in ours.items():
        if flag not in LOCAL_ONLY:
            assert theirs.get(flag) == value, flag
    assert theirs["--model-control-mode"] == "none"  # the load/unload API stays off


def test_cpu_service_runs_make_serves_command(compose):
    spec = compose["services"]["triton-cpu"]
    command = spec["command"]
    assert command[:4] == ["python", "-m", "ensemble", "serve"]
    flags = _flags(command)
    assert flags["--repository"] == "/models" and flags["--host"] == "0.0.0.0"
    assert (flags["--http-port"], flags["--grpc-port"], flags["--metrics-port"]) == ("8000", "8001", "8002")
    assert (ROOT / spec["build"]["dockerfile"]).is_file()


def test_cpu_image_installs_the_pinned_stack():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "FROM python:3.11" in text
    assert "-r requirements.txt -c constraints.txt" in text and "pip==23.2.1" in text
    for package in ("common", "ensemble"):
        assert f"COPY {package} ./{package}" in text
