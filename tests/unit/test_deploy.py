"""docker-compose.yml and docker/Dockerfile.cpu agree with `make serve` (no Docker engine here)."""

import re
from pathlib import Path

import pytest
import yaml

from common import contract
from common.config import ServeConfig
from ensemble.server import server_command

ROOT = Path(__file__).resolve().parents[2]


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


SERVICES = ["triton-gpu", "triton-gpu-own", "triton-cpu"]


@pytest.mark.parametrize("service", SERVICES)
def test_services_mount_the_one_repository_publish_loopback_ports_and_check_the_canary(compose, service):
    spec = compose["services"][service]
    assert "./model_repository:/models:ro" in spec["volumes"]
    published = [re.sub(r"\$\{[A-Z]+_PORT:-(\d+)\}", r"\1", p) for p in spec["ports"]]
    assert published == [f"127.0.0.1:{p}:{p}" for p in (contract.DEFAULT_HTTP_PORT, contract.DEFAULT_GRPC_PORT,
                                                        contract.DEFAULT_METRICS_PORT, contract.DEFAULT_HEALTH_PORT)]
    # Readiness is the supervisor's canary, not Triton's own flag (which stays 200 with a dead stub).
    assert spec["healthcheck"]["test"][-1] == f"http://127.0.0.1:{contract.DEFAULT_HEALTH_PORT}/ready"
    assert spec["restart"] == "unless-stopped"


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_runs_make_serves_supervised_command(compose, service):
    command = compose["services"][service]["command"]
    assert command[:4] == ["python3", "-m", "ensemble", "serve"]
    flags = _flags(command)
    assert flags["--repository"] == "/models" and flags["--host"] == "0.0.0.0"
    assert "--no-supervise" not in command
    assert (flags["--http-port"], flags["--grpc-port"], flags["--metrics-port"], flags["--health-port"]) == (
        "8000", "8001", "8002", "8003")


def test_gpu_services_reserve_a_gpu(compose):
    for service in ("triton-gpu", "triton-gpu-own"):
        assert compose["services"][service]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_the_merlin_container_runs_our_supervisor_on_its_own_tritonserver(compose):
    spec = compose["services"]["triton-gpu"]
    assert spec["image"] == "nvcr.io/nvidia/merlin/merlin-tensorflow:23.08"
    env = spec["environment"]
    assert env["TRITONSERVER"] == "/opt/tritonserver/bin/tritonserver" and env["PYTHONPATH"] == "/app"
    for package in ("common", "ensemble"):
        assert f"./{package}:/app/{package}:ro" in spec["volumes"]


def test_own_images_are_built_from_the_repo(compose):
    assert compose["services"]["triton-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert compose["services"]["triton-gpu-own"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    for service in ("triton-cpu", "triton-gpu-own"):
        assert (ROOT / compose["services"][service]["build"]["dockerfile"]).is_file()


def test_make_serve_flags_restrict_the_admin_apis():
    cmd = server_command(Path("tritonserver"), Path("/models"), Path("/b"), ServeConfig(), key="k")
    flags = _flags(cmd)
    assert flags["--http-restricted-api"] == "shared-memory,model-repository,logging,trace:admin-key=k"
    assert flags["--grpc-restricted-protocol"] == "shared-memory,model-repository,logging,trace:admin-key=k"
    assert flags["--model-control-mode"] == "none" and flags["--strict-readiness"] == "false"
    # a server that lacks a flag (2.36 has no --http-restricted-api) is not given it
    older = _flags(server_command(Path("t"), Path("/m"), None, ServeConfig(), known_flags=frozenset({"--grpc-restricted-protocol"})))
    assert "--http-restricted-api" not in older and "--grpc-restricted-protocol" in older and "--backend-directory" not in older


def test_cpu_image_installs_the_pinned_stack():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "FROM python:3.11" in text
    assert "-r requirements.txt -c constraints.txt" in text and "pip==23.2.1" in text
    for package in ("common", "ensemble"):
        assert f"COPY {package} ./{package}" in text
