"""The artifacts manifest: what an export holds, made with which libraries, and its checks."""

from __future__ import annotations

import datetime as dt
import hashlib
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

FORMAT_VERSION = 2  # 2: a sha256 for every file
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


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (hashlib releases the GIL on large updates)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} for every file under `names` (files or folders) of
    `folder`, or under all of it; `__pycache__` folders (written by imports) are left out."""
    folder = Path(folder)
    roots = [folder / n for n in names] if names is not None else [folder]
    out = {}
    for root in roots:
        if not root.exists():
            raise ArtifactError(f"cannot record {root}: it is missing")
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in paths:
            if "__pycache__" in path.parts:
                continue
            out[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return out


def verify_files(folder: Path, digests: dict[str, dict[str, Any]]) -> None:
    """Checks that every recorded file is present with its size and sha256.

    Raises:
        ArtifactError: naming the first file that is missing, of another size, or changed.
    """
    folder = Path(folder)
    for name, want in sorted(digests.items()):
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (recorded in the manifest at export)")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise ArtifactError(f"{path} has {size} bytes, the manifest recorded {want['bytes']}: the file was truncated or replaced")
        found = sha256_of(path)
        if found != want["sha256"]:
            raise ArtifactError(
                f"{path} does not match its sha256 in the manifest (recorded {want['sha256'][:16]}..., found {found[:16]}...): "
                "the file was changed or corrupted after export"
            )


def write_manifest(folder: Path, body: dict[str, Any]) -> Path:
    """Writes manifest.json with the format version, time, library versions and each file's size and sha256."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).exists()]
    if missing:
        raise ArtifactError(f"cannot write a manifest for {folder}: {missing} missing")
    files = file_digests(folder, REQUIRED_FILES)
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

    sections = {k: v for k, v in manifest["config"].items() if k != "serve"}
    # Exported before the history input existed: its tower has none, whatever today's default.
    sections["train"] = {"history_length": 0, **sections.get("train", {})}
    return config_from_dict(sections)


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Reads and checks an artifacts folder's manifest.

    Checks: the manifest exists and has our format version, every required file is present
    with the size and sha256 recorded at export, and the embedding file's shape matches the
    recorded counts.
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
    verify_files(folder, manifest["files"])
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
