"""Export: everything serving needs, in one artifacts folder with a manifest.

Layout (names from common.contract):
    workflow/               fitted NVTabular feature workflow (no Filter)
    query_tower/            SavedModel of the query tower (encoded user features -> embedding)
    item_embeddings.npy     [n_items, dim] float32, row r is catalogue item r
    item_ids.npy            [n_items] int64 raw item ids, row-aligned
    item_features.parquet   raw item features, row-aligned
    user_features.parquet   raw user features of every training user (the lookup table)
    seen_items.npz          training positives per user (CSR over catalogue rows)
    items.faiss             FAISS index over item_embeddings, labels = rows
    metrics.json            full-catalogue evaluation
    manifest.json           versions, dims, counts, metrics, tensor names
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pandas as pd
import scipy.sparse as sp
import tensorflow as tf

from common import contract
from common.config import PipelineConfig
from common.errors import ArtifactError
from common.manifest import write_manifest
from train import etl as etl_stage
from train.fit import Tables, TrainResult, tower_inputs
from train.compile_tower import compile_query_tower, save_compiled
from train.evaluate import save_report
from train.index import IndexReport, build_checked_index
from train.model import encode_in_batches

LOG = logging.getLogger(__name__)


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Creates an empty output folder; an existing non-empty one needs overwrite=True."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ArtifactError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def tower_signature(saved_model_dir: Path) -> dict[str, object]:
    """Input names/dtypes and the output name of a SavedModel's serving signature."""
    loaded = tf.saved_model.load(str(saved_model_dir))
    sig = loaded.signatures["serving_default"]
    inputs = {name: spec.dtype.name for name, spec in sig.structured_input_signature[1].items()}
    outputs = list(sig.structured_outputs.keys())
    return {"inputs": dict(sorted(inputs.items())), "output": outputs[0]}


def write_user_features(users_raw: pd.DataFrame, tables: Tables, item_ids: np.ndarray, n_history: int, path: Path) -> None:
    """The feature store's table: one row per training user, raw features, and with a history
    input the user's latest `n_history` training positives as raw item ids, oldest first (list column)."""
    table = pa.Table.from_pandas(users_raw, preserve_index=False)
    if n_history:
        raw = tables.history_rows(n_history).map(lambda rows: item_ids[rows])
        table = table.append_column(contract.INPUT_HISTORY, pa.ListArray.from_arrays(
            pa.array(raw.offsets.astype(np.int32)), pa.array(raw.values.astype(np.int64))))
    pq.write_table(table, path)


def export_artifacts(
    cfg: PipelineConfig,
    etl_dir: Path,
    tables: Tables,
    result: TrainResult,
    report: dict,
    out_dir: Path,
    etl_rows_per_s: float,
) -> tuple[Path, IndexReport]:
    """Writes the artifacts folder and its manifest.

    Args:
        cfg: the full configuration (stored in the manifest).
        etl_dir: ETL output (workflow and raw/encoded entity tables).
        tables: encoded tables and positives used for training.
        result: the trained model and its history.
        report: the evaluation report (train.evaluate.evaluate_methods).
        out_dir: an empty or new folder.
        etl_rows_per_s: ETL throughput, recorded in the manifest.
    """
    data = cfg.data
    shutil.copytree(etl_dir / contract.ARTIFACT_WORKFLOW, out_dir / contract.ARTIFACT_WORKFLOW)
    result.model.query_encoder.save(str(out_dir / contract.ARTIFACT_QUERY_TOWER), include_optimizer=False)
    n_history = cfg.train.history_length
    probe = tables.query_inputs(n_history, np.arange(min(len(tables.users), 512)))
    compiled = compile_query_tower(result.model.query_encoder, probe)
    save_compiled(compiled, out_dir / contract.ARTIFACT_QUERY_TOWER_COMPILED)

    item_emb = encode_in_batches(result.model.candidate_encoder, tower_inputs(tables.items))
    query_emb = encode_in_batches(result.model.query_encoder, tables.query_inputs(n_history))
    items_raw = pd.read_parquet(etl_dir / etl_stage.ITEMS_RAW)
    users_raw = pd.read_parquet(etl_dir / etl_stage.USERS_RAW)
    np.save(out_dir / contract.ARTIFACT_ITEM_EMBEDDINGS, item_emb)
    np.save(out_dir / contract.ARTIFACT_ITEM_IDS, items_raw[data.item_id].to_numpy(dtype=np.int64))
    items_raw.to_parquet(out_dir / contract.ARTIFACT_ITEM_FEATURES, index=False)
    write_user_features(users_raw, tables, items_raw[data.item_id].to_numpy(dtype=np.int64), n_history,
                        out_dir / contract.ARTIFACT_USER_FEATURES)

    seen = sp.csr_matrix(
        (np.ones(len(tables.train_pairs[0]), np.float32), tables.train_pairs), shape=(len(tables.users), len(tables.items))
    )
    seen.sum_duplicates()
    np.savez(
        out_dir / contract.ARTIFACT_SEEN,
        user_ids=users_raw[data.user_id].to_numpy(dtype=np.int64),
        indptr=seen.indptr.astype(np.int64),
        indices=seen.indices.astype(np.int64),
    )

    rng = np.random.default_rng(cfg.train.seed)
    sample = query_emb[rng.permutation(len(query_emb))[: cfg.index.recall_sample]]
    index, index_report = build_checked_index(item_emb, sample, cfg.index)
    faiss.write_index(index, str(out_dir / contract.ARTIFACT_INDEX))

    save_report(report, out_dir)
    vocabularies = etl_dir.parent / "data" / "vocabularies.json"
    if vocabularies.is_file():  # text features of a declared dataset: the codes clients must send
        shutil.copy2(vocabularies, out_dir / "vocabularies.json")
    signature = tower_signature(out_dir / contract.ARTIFACT_QUERY_TOWER)
    body = {
        "config": cfg.to_dict(),
        "embedding_dim": int(item_emb.shape[1]),
        "counts": {
            "users": len(users_raw),
            "items": len(items_raw),
            "train_positives": int(len(tables.train_pairs[0])),
            "valid_positives": int(len(tables.valid_pairs[0])),
        },
        "columns": {
            "user_id": data.user_id, "item_id": data.item_id,
            "user_features": list(data.user_features), "item_features": list(data.item_features),
        },
        "tower": {**signature, "compiled_max_abs_error": float(compiled["max_abs_error"])},
        "index": index_report.__dict__,
        "training": {
            "history": result.history, "best_epoch": result.best_epoch,
            "examples_per_s": result.examples_per_s, "etl_rows_per_s": etl_rows_per_s,
        },
        "metrics": {name: row for name, row in report["methods"].items()},
        "tensors": {
            "model": contract.MODEL_NAME,
            "inputs": [contract.INPUT_USER_ID, contract.INPUT_EXCLUDE, *([contract.INPUT_HISTORY] if n_history else [])],
            "outputs": [contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN],
            "dtypes": contract.DTYPES,
        },
    }
    path = write_manifest(out_dir, body)
    LOG.info("exported %d items x %d dims and %d users to %s", len(items_raw), item_emb.shape[1], len(users_raw), out_dir)
    return path, index_report
