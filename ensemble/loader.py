"""Loads the served request path from a model repository, in the server or in this process.

Before anything is unpickled, every file of the version folder is checked against the sha256
recorded at export (`manifest.json`'s `repository_files`), so a truncated or overwritten artifact
stops the load with its file named instead of serving garbage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

from common import contract
from common.errors import ArtifactError, ConfigError, FeatureStoreError
from common.manifest import verify_files
from ensemble.executor import RetrievalExecutor
from ensemble.graph import GraphRunner
from ensemble.redis_store import store_namespace  # noqa: F401 - its home is light enough for the click CLI
from ensemble.request import Limits

LOG = logging.getLogger(__name__)
REDIS_INSTALL = "pip install redis==5.0.8"


def model_parameters(model_dir: str | Path, version: int | None = None) -> tuple[dict[str, str], int]:
    """(parameters, max_batch_size) of a model's config.pbtxt (of `version`'s own copy if kept)."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    path = Path(model_dir) / f"config.v{version}.pbtxt"
    if version is None or not path.is_file():
        path = Path(model_dir) / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}, config.max_batch_size or 1


def load_model_in_process(repository: str | Path, name: str = contract.MODEL_NAME, version: int = 1) -> RetrievalExecutor:
    """The served request path of a model repository, loaded in this process (no server)."""
    params, max_batch = model_parameters(Path(repository) / name, version)
    return load_executor(Path(repository) / name / str(version) / "ensemble", Limits.from_parameters(params, max_batch), params=params)


def verify_version(version_dir: str | Path) -> dict:
    """Checks a version folder against its manifest; returns the manifest.

    Raises:
        ArtifactError: the manifest is missing or unreadable, or a file is missing or changed.
    """
    path = Path(version_dir) / contract.MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} cannot be read: {e}") from None
    if "repository_files" not in manifest:
        raise ArtifactError(f"{path} records no file checksums (exported by an older build); run `make ensemble` again")
    verify_files(Path(version_dir), manifest["repository_files"])
    return manifest


def feature_store_for(url: str, manifest: dict, feature_names: tuple[str, ...], timeout_s: float, history_length: int = 0):
    """The shared feature store named by `url` (a Redis URL), checked to hold this export."""
    try:
        import redis  # noqa: F401 - only to say clearly when it is missing
    except ImportError:
        raise ConfigError(
            f"feature_store {url!r} needs the redis-py package, which this Python does not have; "
            f"install it in the server's environment ({REDIS_INSTALL}) or serve with feature_store=embedded"
        ) from None
    from ensemble.redis_store import RedisFeatureStore

    return RedisFeatureStore(url, store_namespace(manifest), feature_names, timeout_s=timeout_s, history_length=history_length)


def load_executor(ensemble_dir: str | Path, limits: Limits, params: Mapping[str, str] | None = None) -> RetrievalExecutor:
    """Loads a saved ensemble and its artifacts into an executor (in the server or in-process).

    Args:
        ensemble_dir: the version folder's `ensemble/`.
        limits: request limits.
        params: the model config's parameters (threads, feature_store, feature_store_timeout_s,
            index_device, query_cache_mb, probe_split_min_codes); defaults for those absent (no query cache: a repository
            exported before it).
    """
    params = dict(params or {})
    threads = int(params.get("threads", "1"))
    feature_store = params.get("feature_store", "embedded")
    manifest = verify_version(Path(ensemble_dir).parent)
    from merlin.systems.dag import Ensemble

    from ensemble.ops.lookup import LookupUserFeatures
    from ensemble.ops.search import SearchItems
    from ensemble.ops.tower import configure_threads

    configure_threads(threads)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(threads)
    # BLAS stays at one thread whatever `threads` says: the compiled tower's matmuls are a few
    # hundred rows at most, and OpenBLAS's threads spin-waiting beside FAISS's OpenMP team made
    # the tower 8x slower (0.08 -> 0.65 ms a one-user request at threads=2, bench.stub_profile).
    threadpool_limits(1, user_api="blas")
    ensemble = Ensemble.load(str(ensemble_dir))
    runner = GraphRunner(ensemble)
    n_items = 0
    for node in runner.nodes:
        if isinstance(node.op, LookupUserFeatures) and feature_store != "embedded":
            timeout_s = float(params.get("feature_store_timeout_s", "0.5"))
            node.op.set_store(feature_store_for(feature_store, manifest, node.op.feature_names, timeout_s, node.op.history_length))
        if isinstance(node.op, SearchItems):
            node.op.device = params.get("index_device", "auto")
            node.op.probe_split_min_codes = int(params.get("probe_split_min_codes", "0"))
        if node.op is not None:
            node.op.load_artifacts(str(ensemble_dir))
            if isinstance(node.op, SearchItems):
                n_items = node.op.n_items
    executor = RetrievalExecutor(runner, limits, n_items)
    try:
        executor.warm_up()
    except FeatureStoreError as e:
        # The model still loads: requests answer UNAVAILABLE (and readiness is false) until the store
        # answers, as the store itself promises at load; the first good request pays the warm-up.
        LOG.warning("warm-up skipped, the feature store is not usable at load: %s", e)
    executor.enable_query_cache(float(params["query_cache_mb"]) if "query_cache_mb" in params else None)
    return executor
