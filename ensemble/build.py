"""Builds the Triton model repository from an artifacts folder with merlin-systems' Ensemble.export.

Graph: ["user_id"] >> LookupUserFeatures >> TransformUserFeatures >> QueryTower
       (+ top_k, user_id, exclude_item_ids, exclude_seen) >> SearchItems, plus the unknown flag.
A model trained with a history (train.history_length N > 0) also takes `history_item_ids`: the
lookup appends it to the stored history, the transform encodes it with the item id's Categorify.

`RetrievalRuntime` is merlin's `TritonExecutorRuntime` with our executor model: its
config.pbtxt is written from `common.contract` (batch dimension, dynamic batching, limits as
parameters) and its model.py is `ensemble.triton_model`, with our packages vendored beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import nvtabular as nvt
import pandas as pd
import tritonclient.grpc.model_config_pb2 as model_config
from google.protobuf import text_format
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag import Ensemble
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime

from common import contract
from common.config import PipelineConfig
from common.errors import ArtifactError
from common.manifest import artifacts_config, file_digests, read_manifest
from ensemble.ops.lookup import LookupUserFeatures
from ensemble.ops.search import EXCLUDE_SEEN, TOP_K, SearchItems
from ensemble.ops.tower import QueryTower
from ensemble.ops.transform import TransformUserFeatures

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
VENDORED_PACKAGES = ("common", "ensemble")
BUILD_DIR = ".build"  # inside the model repository: intermediate files of the build


def input_schema(user_features: tuple[str, ...], history: bool = False) -> Schema:
    """The graph's request columns (one row per user)."""
    return Schema([
        *[ColumnSchema(name, dtype=np.int64) for name in user_features],
        ColumnSchema(contract.INPUT_USER_ID, dtype=np.int64),
        ColumnSchema(TOP_K, dtype=np.int32),
        ColumnSchema(contract.INPUT_EXCLUDE, dtype=np.int64, dims=(None, None)),
        ColumnSchema(EXCLUDE_SEEN, dtype=np.bool_),
        *([ColumnSchema(contract.INPUT_HISTORY, dtype=np.int64, dims=(None, None))] if history else []),
    ])


def item_id_workflow(workflow: nvt.Workflow, item_id: str) -> nvt.Workflow:
    """The part of a fitted feature workflow that encodes the item id alone (on a copy:
    `remove_inputs` edits in place), for the histories' item codes."""
    import copy

    return copy.deepcopy(workflow).remove_inputs([c for c in workflow.input_schema.column_names if c != item_id])


def build_ensemble(artifacts: Path, scratch: Path, cfg: PipelineConfig, manifest: dict) -> Ensemble:
    """Wires our operators into a merlin-systems Ensemble over the artifacts folder."""
    from train.etl import user_workflow

    data = cfg.data
    history = cfg.train.history_length
    user_wf_dir, item_wf_dir = scratch / "user_workflow", scratch / "item_id_workflow"
    workflow = nvt.Workflow.load(str(artifacts / contract.ARTIFACT_WORKFLOW))
    user_workflow(workflow, data).save(str(user_wf_dir))
    if history:
        item_id_workflow(workflow, data.item_id).save(str(item_wf_dir))

    lookup = [contract.INPUT_USER_ID, *data.user_features, *([contract.INPUT_HISTORY] if history else [])] >> LookupUserFeatures(
        artifacts / contract.ARTIFACT_USER_FEATURES, data.user_id, data.user_features, history_length=history
    )
    encoded = lookup >> TransformUserFeatures(user_wf_dir, passthrough=(contract.OUTPUT_UNKNOWN,),
                                              history_workflow_path=item_wf_dir if history else None, history_length=history)
    query = encoded >> QueryTower(
        artifacts / contract.ARTIFACT_QUERY_TOWER, artifacts / contract.ARTIFACT_QUERY_TOWER_COMPILED, cfg.serve.tower_runtime
    )
    results = (query + [TOP_K, contract.INPUT_USER_ID, contract.INPUT_EXCLUDE, EXCLUDE_SEEN]) >> SearchItems(
        artifacts / contract.ARTIFACT_INDEX,
        artifacts / contract.ARTIFACT_ITEM_IDS,
        artifacts / contract.ARTIFACT_SEEN,
        manifest["index"]["search_params"],
    )
    outputs = results + encoded[[contract.OUTPUT_UNKNOWN]]
    return Ensemble(outputs, input_schema(data.user_features, history=bool(history)))


def executor_config(cfg: PipelineConfig, name: str = contract.MODEL_NAME, canary_user_id: int | None = None,
                    canary_cold_user_id: int | None = None) -> model_config.ModelConfig:
    """config.pbtxt of the executor model, from the contract and the serve settings.

    `canary_user_id`, a user known in training, is what the health canary asks for;
    `canary_cold_user_id`, a user the export does not store, what it asks next (`ensemble.health.canary`)."""
    serve = cfg.serve
    dt = model_config.DataType.Value
    config = model_config.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=serve.max_batch_size,
        dynamic_batching=model_config.ModelDynamicBatching(max_queue_delay_microseconds=serve.max_queue_delay_us),
        instance_group=[model_config.ModelInstanceGroup(kind=model_config.ModelInstanceGroup.KIND_CPU, count=serve.instance_count)],
    )
    config.input.append(model_config.ModelInput(name=contract.INPUT_USER_ID, data_type=dt("TYPE_INT64"), dims=[1]))
    config.input.append(model_config.ModelInput(
        name=contract.INPUT_EXCLUDE, data_type=dt("TYPE_INT64"), dims=[-1], optional=True, allow_ragged_batch=True,
    ))
    if cfg.train.history_length:
        config.input.append(model_config.ModelInput(
            name=contract.INPUT_HISTORY, data_type=dt("TYPE_INT64"), dims=[-1], optional=True, allow_ragged_batch=True,
        ))
    for name in cfg.data.user_features:
        config.input.append(model_config.ModelInput(name=name, data_type=dt("TYPE_INT64"), dims=[1], optional=True))
    config.output.append(model_config.ModelOutput(name=contract.OUTPUT_ITEM_IDS, data_type=dt("TYPE_INT64"), dims=[-1]))
    config.output.append(model_config.ModelOutput(name=contract.OUTPUT_SCORES, data_type=dt("TYPE_FP32"), dims=[-1]))
    config.output.append(model_config.ModelOutput(name=contract.OUTPUT_UNKNOWN, data_type=dt("TYPE_BOOL"), dims=[1]))
    for key, value in {
        "default_top_k": serve.default_top_k, "max_top_k": serve.max_top_k,
        "max_exclude": serve.max_exclude, "threads": serve.threads, "exclude_seen": "false",
        "user_features": ",".join(cfg.data.user_features),
        "feature_store": serve.feature_store,
        "feature_store_timeout_s": serve.feature_store_timeout_s,
        "index_device": serve.index_device, "query_cache_mb": serve.query_cache_mb,
        "probe_split_min_codes": serve.probe_split_min_codes,
        "history_length": cfg.train.history_length,
    }.items():
        config.parameters[key].string_value = str(value)
    if canary_user_id is not None:
        config.parameters["canary_user_id"].string_value = str(int(canary_user_id))
    if canary_cold_user_id is not None:
        config.parameters["canary_cold_user_id"].string_value = str(int(canary_cold_user_id))
    return config


class RetrievalRuntime(TritonExecutorRuntime):
    """merlin's executor runtime, exporting our executor model instead of merlin's."""

    def __init__(self, cfg: PipelineConfig, canary_user_id: int | None = None, canary_cold_user_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.canary_user_id, self.canary_cold_user_id = canary_user_id, canary_cold_user_id
        self._version = 1

    def export(self, ensemble, path: str, version: int = 1, name: str = None):
        # merlin's export saves artifacts under <version>/ but calls _executor_model_export
        # without the version (so version 1 always); remember it here.
        self._version = version
        return super().export(ensemble, path, version=version, name=name)

    def _executor_model_export(self, path, export_name, ensemble, params=None, node_id=None, version=None):
        version = self._version if version is None else version
        model_dir = Path(path) / export_name
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        config = executor_config(self.cfg, export_name, self.canary_user_id, self.canary_cold_user_id)
        config.version_policy.specific.versions.append(version)  # the version to serve; see ensemble.deploy
        (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
        (model_dir / f"config.v{version}.pbtxt").write_text(text_format.MessageToString(config))
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), version_dir / "model.py")
        for package in VENDORED_PACKAGES:
            shutil.copytree(REPO_ROOT / package, version_dir / "code" / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        ensemble.save(str(version_dir / "ensemble"))
        return config


def cold_user_id(stored: np.ndarray) -> int:
    """A user id that is not in `stored` (the exported user table's ids): the canary's new user."""
    stored = np.unique(np.asarray(stored, dtype=np.int64))
    if not len(stored) or stored[-1] < np.iinfo(np.int64).max:
        return int(stored[-1]) + 1 if len(stored) else 0
    gaps = np.flatnonzero(np.diff(stored) > 1)  # every id taken up to int64's largest: the first hole
    return int(stored[gaps[0]]) + 1 if len(gaps) else int(stored[0]) - 1


def record_version_files(version_dir: Path, manifest: dict) -> None:
    """Writes the version folder's manifest: the artifacts' manifest plus the size and sha256 of
    every file the version serves (model.py, vendored code, ensemble), checked at every load."""
    files = {name: digest for name, digest in file_digests(version_dir).items() if name != contract.MANIFEST}
    served = {**{k: v for k, v in manifest.items() if k != "repository_files"}, "repository_files": files}
    (version_dir / contract.MANIFEST).write_text(json.dumps(served, indent=2, default=str))


def build_repository(artifacts_dir: str | Path, repository: str | Path, overwrite: bool = False,
                     cfg: PipelineConfig | None = None, version: int = 1) -> Path:
    """Exports the Triton model repository for an artifacts folder.

    Args:
        artifacts_dir: output of `python -m train`.
        repository: the model repository folder to write.
        overwrite: replace an existing non-empty repository.
        cfg: settings to serve with (default: the artifacts' data/train/index settings from their
            manifest, with today's serve defaults: how to serve is a deployment choice).
        version: Triton model version folder to write.

    Returns:
        the repository path.
    """
    artifacts, repo = Path(artifacts_dir), Path(repository)
    manifest = read_manifest(artifacts)
    cfg = cfg or artifacts_config(manifest)
    trained = artifacts_config(manifest).train.history_length
    if cfg.train.history_length != trained:
        raise ArtifactError(f"{artifacts} was trained with train.history_length {trained}; it cannot be served with "
                            f"{cfg.train.history_length} (the query tower's inputs are fixed at training)")
    if repo.exists() and any(repo.iterdir()):
        if not overwrite:
            raise ArtifactError(f"{repo} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(repo)
    scratch = repo.parent / f".{repo.name}.build"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        ensemble = build_ensemble(artifacts, scratch, cfg, manifest)
        users = pd.read_parquet(artifacts / contract.ARTIFACT_USER_FEATURES, columns=[cfg.data.user_id])[cfg.data.user_id]
        canary = int(users.iloc[0]) if len(users) else None
        ensemble.export(str(repo), runtime=RetrievalRuntime(cfg, canary, cold_user_id(users.to_numpy())),
                        name=contract.MODEL_NAME, version=version)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record_version_files(repo / contract.MODEL_NAME / str(version), manifest)
    LOG.info("model repository written to %s (model %r, version %d)", repo, contract.MODEL_NAME, version)
    return repo
