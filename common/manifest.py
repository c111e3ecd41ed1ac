"""The artifacts manifest: what an export holds, made with which libraries, and its checks."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import platform
import uuid
from pathlib import Path
from typing import Any, Iterable

from common import contract
from common.errors import ArtifactError

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
LIBRARIES = (
    "merlin-core", "merlin-models", "merlin-systems", "nvtabular", "tensorflow",
    "faiss-cpu", "numpy", "pandas", "tritonclient",
)
REQUIRED_FILES = (
    contract.ARTIFACT_WORKFLOW,
    contract.ARTIFACT_QUERY_TOWER,
    contract.ARTIFACT_QUERY_TOWER_COMPILED,
    contract.ARTIFACT_ITEM_EMBEDDINGS,
    contract.ARTIFACT_ITEM_IDS,
    contract.ARTIFACT_USER_FEATURES,
    contract.ARTIFACT_ITEM_FEATURES,
    contract.ARTIFACT_INDEX,
    contract.ARTIFACT_SEEN,
)


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries an export depends on, plus Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def write_manifest(folder: Path, body: dict[str, Any]) -> Path:
    """Writes manifest.json with the format version, time, library versions and file sizes."""
    files = {}
    for name in REQUIRED_FILES:
        path = folder / name
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            size = path.stat().st_size
        else:
            raise ArtifactError(f"cannot write a manifest for {folder}: {name} is missing")
        files[name] = {"bytes": size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "artifacts_id": uuid.uuid4().hex,  # names this export in shared stores (see ensemble.redis_store)
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "files": files,
        **body,
    }
    path = folder / contract.MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def artifacts_config(manifest: dict[str, Any]):
    """The settings to serve an export with: its own data/train/index sections, today's serve
    defaults (how to serve is a deployment choice, not something fixed at training)."""
    from common.config import config_from_dict

    return config_from_dict({k: v for k, v in manifest["config"].items() if k != "serve"})


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Reads and checks an artifacts folder's manifest.

    Checks: the manifest exists and has our format version, every required file is present
    with a plausible size, and the embedding file's shape matches the recorded counts.
    Library versions that differ in major.minor from the running ones are logged as warnings.

    Raises:
        ArtifactError: naming the folder and what is wrong.
    """
    folder = Path(folder)
    path = folder / contract.MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an artifacts folder: {contract.MANIFEST} is missing (run `make train`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    missing = [name for name in REQUIRED_FILES if not (folder / name).exists()]
    if missing:
        raise ArtifactError(f"{folder} lacks {missing} listed as required by its manifest")
    import numpy as np

    emb = np.load(folder / contract.ARTIFACT_ITEM_EMBEDDINGS, mmap_mode="r")
    want = (manifest["counts"]["items"], manifest["embedding_dim"])
    if tuple(emb.shape) != tuple(want):
        raise ArtifactError(f"{folder / contract.ARTIFACT_ITEM_EMBEDDINGS} has shape {emb.shape}, manifest says {want}")
    running = library_versions(manifest.get("versions", {}).keys() - {"python"})
    for name, stored in manifest.get("versions", {}).items():
        current = running.get(name, platform.python_version() if name == "python" else "absent")
        if _major_minor(stored) != _major_minor(current):
            LOG.warning("%s was exported with %s %s, running %s", folder, name, stored, current)
    return manifest
