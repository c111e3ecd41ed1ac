"""Model versions without downtime: add a version, switch a running server to it, roll back.

Each export is a version folder `model_repository/retrieval/<N>/` holding its own index,
features, tower and code. The model config names the version to serve
(`version_policy { specific { versions: [N] } }`). Switching rewrites that line and asks the
server, which runs with `--model-control-mode=explicit`, to load the model again: Triton loads
the named version beside the running one, sends requests to it only once it is READY, then
unloads the old one, so no request fails and none reaches a half-loaded version.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format

from common import contract
from common.config import PipelineConfig
from common.errors import ArtifactError, ServerError

LOG = logging.getLogger(__name__)


def versions(repository: Path, model: str = contract.MODEL_NAME) -> list[int]:
    """Version folders present on disk, ascending."""
    folder = Path(repository) / model
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def read_config(repository: Path, model: str = contract.MODEL_NAME) -> mc.ModelConfig:
    return text_format.Parse((Path(repository) / model / "config.pbtxt").read_text(), mc.ModelConfig())


def active_version(repository: Path, model: str = contract.MODEL_NAME) -> int | None:
    """The version the config names (None when it uses Triton's default policy)."""
    config = read_config(repository, model)
    if config.version_policy.HasField("specific") and config.version_policy.specific.versions:
        return int(config.version_policy.specific.versions[0])
    return None


def write_config(repository: Path, config: mc.ModelConfig, version: int, model: str = contract.MODEL_NAME) -> None:
    """Writes config.pbtxt serving exactly `version`, atomically (write, then rename)."""
    config.version_policy.Clear()
    config.version_policy.specific.versions.append(version)
    target = Path(repository) / model / "config.pbtxt"
    tmp = target.with_suffix(".pbtxt.tmp")
    tmp.write_text(text_format.MessageToString(config))
    os.replace(tmp, target)


def add_version(repository: Path, artifacts: Path, cfg: PipelineConfig | None = None) -> int:
    """Exports artifacts as the next version folder; the running version is untouched.

    The folder is built beside the repository and moved into place in one rename, so a server
    never sees half of it. The config is not switched here (see `activate`).
    """
    from ensemble.build import build_repository

    repository = Path(repository)
    present = versions(repository)
    version = (present[-1] + 1) if present else 1
    staging = repository.parent / f".{repository.name}.v{version}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build_repository(artifacts, staging, cfg=cfg, version=version)
        (repository / contract.MODEL_NAME).mkdir(parents=True, exist_ok=True)
        os.replace(staging / contract.MODEL_NAME / str(version), repository / contract.MODEL_NAME / str(version))
        shutil.copy2(staging / contract.MODEL_NAME / "config.pbtxt", repository / contract.MODEL_NAME / f"config.v{version}.pbtxt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    LOG.info("added version %d to %s (serving stays on %s)", version, repository, active_version(repository) or present)
    return version


def _config_for(repository: Path, version: int) -> mc.ModelConfig:
    """The config a version was exported with (its inputs can differ from another version's)."""
    saved = Path(repository) / contract.MODEL_NAME / f"config.v{version}.pbtxt"
    source = saved if saved.is_file() else Path(repository) / contract.MODEL_NAME / "config.pbtxt"
    return text_format.Parse(source.read_text(), mc.ModelConfig())


def activate(repository: Path, version: int, url: str, timeout_s: float = 300.0) -> None:
    """Switches a running server (explicit model control, gRPC at url) to `version`.

    Raises:
        ArtifactError: the version folder does not exist.
        ServerError: the server refused the load or did not serve the version in time.
    """
    import tritonclient.grpc as grpcclient

    repository = Path(repository)
    if version not in versions(repository):
        raise ArtifactError(f"{repository} has no version {version}; it has {versions(repository)}")
    previous = active_version(repository)
    write_config(repository, _config_for(repository, version), version)
    client = grpcclient.InferenceServerClient(url)
    try:
        started = time.monotonic()
        client.load_model(contract.MODEL_NAME)
        while time.monotonic() - started < timeout_s:
            if client.is_model_ready(contract.MODEL_NAME, str(version)):
                LOG.info("serving version %d (was %s) after %.1f s", version, previous, time.monotonic() - started)
                return
            time.sleep(0.2)
    except Exception as e:  # noqa: BLE001 - tritonclient raises its own exception type
        if previous is not None:
            write_config(repository, _config_for(repository, previous), previous)
        raise ServerError(f"the server at {url} did not switch to version {version}: {e}") from e
    finally:
        client.close()
    raise ServerError(f"version {version} was not ready after {timeout_s:.0f} s")


def deploy(repository: Path, artifacts: Path, url: str, cfg: PipelineConfig | None = None) -> int:
    """add_version + activate: the new artifacts serve, with no failed request in between."""
    version = add_version(repository, artifacts, cfg)
    activate(repository, version, url)
    return version


def rollback(repository: Path, url: str) -> int:
    """Serves the version before the active one again (its folder is still on disk)."""
    current = active_version(repository)
    older = [v for v in versions(repository) if current is None or v < current]
    if not older:
        raise ArtifactError(f"{repository} has no version older than {current} to roll back to")
    activate(repository, older[-1], url)
    return older[-1]
