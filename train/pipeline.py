"""The training job end to end: data -> ETL -> training -> evaluation -> export."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import PipelineConfig
from train import etl as etl_stage
from train.data import TRUTH_FILE, Truth, prepare_data
from train.evaluate import (
    Scorer, embedding_scorer, evaluate_methods, format_table, interactions_matrix, popularity_scorer,
    random_scorer, split_tune_eval, tuned_als_scorer, verdicts,
)
from train.export import export_artifacts, prepare_output
from train.fit import Tables, embeddings, load_tables, train_two_tower

LOG = logging.getLogger(__name__)

DATA_DIR = "data"
ETL_DIR = "etl"


@dataclass(frozen=True)
class TrainingRun:
    """What a training run produced: the artifacts folder, its manifest, the report and the model."""

    artifacts: Path
    manifest: Path
    report: dict
    model: object


def oracle_scorer(truth: Truth, etl_dir: Path, cfg: PipelineConfig) -> Scorer:
    """Ranks by the true probability of the next click (synthetic data only)."""
    users = pd.read_parquet(etl_dir / etl_stage.USERS_RAW, columns=[cfg.data.user_id])[cfg.data.user_id].to_numpy()
    items = pd.read_parquet(etl_dir / etl_stage.ITEMS_RAW, columns=[cfg.data.item_id])[cfg.data.item_id].to_numpy()
    user_rows = np.searchsorted(truth.user_ids, users)
    item_rows = np.searchsorted(truth.item_ids, items)
    return lambda rows: truth.positive_log_prob(user_rows[rows])[:, item_rows]


def evaluate_all(cfg: PipelineConfig, work_dir: Path, tables: Tables, queries: np.ndarray, items: np.ndarray) -> dict:
    """Full-catalogue metrics of the model and every baseline on the reported (non-tuning) users.

    Args:
        queries: [n_users, d] the model's query embedding per users-table row.
        items: [n_items, d] its item embedding per catalogue row.
    """
    data = tables.eval_set()
    tune, report_users = split_tune_eval(data, cfg.train.seed)
    counts = interactions_matrix(*tables.train_pairs, len(tables.users), len(tables.items))
    als, als_params = tuned_als_scorer(counts, tune, cfg.train.seed, cfg.train.eval_ks[0])
    scorers = {
        "two_tower": embedding_scorer(queries, items),
        "random": random_scorer(len(tables.items), cfg.train.seed),
        "popular": popularity_scorer(counts),
        "als": als,
    }
    truth_path = work_dir / DATA_DIR / TRUTH_FILE
    if cfg.data.source == "synthetic" and truth_path.is_file():
        scorers["oracle"] = oracle_scorer(Truth.load(truth_path), work_dir / ETL_DIR, cfg)
    report = evaluate_methods(scorers, report_users, tuple(cfg.train.eval_ks))
    report["als_params"] = als_params
    report["tuning_users"] = tune.n_users
    return report


def log_report(report: dict, cfg: PipelineConfig) -> None:
    LOG.info("full-catalogue evaluation on %d users, %d items:\n%s", report["n_users"], report["n_items"], format_table(report))
    for line in verdicts(report, cfg.train.eval_ks[0]):
        (LOG.warning if "LOSES TO" in line else LOG.info)(line)


def evaluate_artifacts(work_dir: str | Path, artifacts_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """`make eval`: the full-catalogue table of what an artifacts folder serves, and the baselines.

    Query embeddings come from the exported (compiled) tower and item embeddings from the
    exported file: the numbers describe the served model, not a copy still in memory.
    """
    from common import contract
    from common.config import config_from_dict
    from common.manifest import read_manifest
    from ensemble.ops.tower import NumpyTower
    from train.evaluate import save_report
    from train.fit import tower_inputs

    work, artifacts = Path(work_dir), Path(artifacts_dir)
    manifest = read_manifest(artifacts)
    cfg = config_from_dict(manifest["config"])
    tables = load_tables(work / ETL_DIR, cfg.data)
    with np.load(artifacts / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        tower = NumpyTower({k: arrays[k] for k in arrays.files})
    queries = tower.embed(tower_inputs(tables.users))
    items = np.load(artifacts / contract.ARTIFACT_ITEM_EMBEDDINGS)[: len(tables.items)]
    report = evaluate_all(cfg, work, tables, queries, items)
    log_report(report, cfg)
    save_report(report, Path(out_dir) if out_dir else artifacts)
    return report


def run_training(cfg: PipelineConfig, work_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> TrainingRun:
    """Runs every training stage and exports the artifacts.

    Args:
        cfg: the pipeline configuration.
        work_dir: folder for intermediate data (raw splits, ETL output).
        out_dir: artifacts folder to create (must be empty unless overwrite).
        overwrite: replace a non-empty out_dir.
    """
    work, out = Path(work_dir), Path(out_dir)
    prepare_output(out, overwrite)
    started = time.perf_counter()
    paths = prepare_data(cfg.data, work / DATA_DIR)
    etl = etl_stage.run_etl(cfg.data, paths["train"], paths["valid"], work / ETL_DIR)
    tables = load_tables(work / ETL_DIR, cfg.data)
    result = train_two_tower(cfg.train, cfg.data, work / ETL_DIR, tables)
    report = evaluate_all(cfg, work, tables, *embeddings(result.model, tables))
    log_report(report, cfg)
    manifest, _ = export_artifacts(cfg, work / ETL_DIR, tables, result, report, out, etl.rows_per_s)
    LOG.info("training job finished in %.1f s", time.perf_counter() - started)
    return TrainingRun(out, manifest, report, result.model)
