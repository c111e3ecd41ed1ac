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
    _replace_config(repository, config, model)


def _replace_config(repository: Path, config: mc.ModelConfig, model: str = contract.MODEL_NAME) -> None:
    """config.pbtxt replaced in one rename: a server never reads half of it."""
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


def _admin_headers() -> dict[str, str] | None:
    """The header that opens the model-repository API of a server started with the same key."""
    key = os.environ.get(contract.ADMIN_KEY_ENV)
    return {contract.GRPC_ADMIN_KEY_HEADER: key} if key else None


def _served_version(client) -> int | None:
    """The version the server has loaded and ready now (None when none is)."""
    try:
        index = client.get_model_repository_index(headers=_admin_headers(), as_json=True)
    except Exception:  # noqa: BLE001 - tritonclient's own exception type
        return None
    ready = [int(m["version"]) for m in index.get("models", []) if m.get("name") == contract.MODEL_NAME
             and m.get("state") == "READY" and str(m.get("version", "")).isdigit()]
    return max(ready) if ready else None


def activate(repository: Path, version: int, url: str, timeout_s: float = 300.0) -> bool:
    """Switches a running server (explicit model control, gRPC at url) to `version`.

    Atomic from the outside: the version folder is checked against its manifest before
    anything changes, and when the server cannot serve the new version, the previous config is
    written back and the server loaded with it again, so config, loaded version and readiness
    are exactly as before. Activating the version already served changes nothing.

    Returns:
        True when the server switched; False when it already served `version`.

    Raises:
        ArtifactError: the version folder does not exist or fails its checksums.
        ServerError: the server refused the load or did not serve the version in time.
    """
    import tritonclient.grpc as grpcclient

    from ensemble.loader import verify_version

    repository = Path(repository)
    if version not in versions(repository):
        raise ArtifactError(f"{repository} has no version {version}; it has {versions(repository)}")
    verify_version(repository / contract.MODEL_NAME / str(version))
    previous = active_version(repository)
    client = grpcclient.InferenceServerClient(url)
    try:
        served = _served_version(client)
        if previous == version and served == version:
            LOG.info("version %d is already being served by %s; nothing to do", version, url)
            return False
        previous_config = read_config(repository)
        write_config(repository, _config_for(repository, version), version)
        started = time.monotonic()
        try:
            client.load_model(contract.MODEL_NAME, headers=_admin_headers())
            while not client.is_model_ready(contract.MODEL_NAME, str(version)):
                if time.monotonic() - started > timeout_s:
                    raise ServerError(f"version {version} was not ready after {timeout_s:.0f} s")
                time.sleep(0.2)
        except Exception as e:  # noqa: BLE001 - tritonclient raises its own exception type
            _restore(repository, previous_config)
            if isinstance(e, ServerError):
                raise
            reason = str(e).split("\n\nAt:")[0].strip()  # Triton appends the Python stack of initialize
            raise ServerError(f"the server at {url} did not switch to version {version}: {reason}; "
                              f"it still serves version {previous}") from None
        LOG.info("serving version %d (was %s) after %.1f s", version, previous, time.monotonic() - started)
        return True
    finally:
        client.close()


def _restore(repository: Path, config: mc.ModelConfig) -> None:
    """Writes the previous config back, and asks nothing of the server: after a failed load
    Triton keeps serving the previous version, and loading that same version again while it
    serves crashes tritonserver 2.51 (SIGSEGV when the old instance unloads). Triton's table
    keeps the failed version's state, which is why the server runs with
    --strict-readiness=false and readiness that tells the truth comes from the canary."""
    _replace_config(repository, config)


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
