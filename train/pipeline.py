"""The training job end to end: data -> ETL -> training -> evaluation -> export."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import PipelineConfig
from train import etl as etl_stage
from train.coldstart import ColdUsers, cold_history_report, cold_start_report, load_cold_users
from train.data import COLD_FILE, DATA_DIR, TRUTH_FILE, Truth, prepare_data
from train.evaluate import (
    EvalSet, Scorer, als_scorer, embedding_scorer, evaluate_methods, fit_als, format_table,
    popularity_scorer, random_scorer, split_tune_eval, tuned_als_scorer, verdicts,
)
from train.export import export_artifacts, prepare_output
from train.fit import Tables, embeddings, load_tables, train_two_tower
from train.history import padded_inputs
from train.model import encode_in_batches
from train.stages import StageRecorder

LOG = logging.getLogger(__name__)

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


def evaluation_users(cfg: PipelineConfig, tables: Tables) -> tuple[EvalSet, EvalSet]:
    """(tuning users, reported users): disjoint seeded samples of the users with held-out positives.

    Seeded by data.seed, so every model seed and every baseline is scored on the same users.
    """
    data = tables.eval_set()
    tune, report = split_tune_eval(data, cfg.data.seed, cfg.eval.tune_fraction, cfg.eval.max_tune_users, cfg.eval.max_users)
    LOG.info("evaluation users: %d tuning, %d reported (of %d with held-out positives)", tune.n_users, report.n_users, data.n_users)
    return tune, report


def baseline_scorers(cfg: PipelineConfig, work_dir: Path, tables: Tables, tune: EvalSet) -> tuple[dict, dict]:
    """The baselines, one scorer per seed where they have randomness, and the tuned ALS settings."""
    counts = tables.train_counts
    seeds = [cfg.train.seed + i for i in range(cfg.eval.seeds)]
    als, als_params = tuned_als_scorer(counts, tune, seeds[0], cfg.train.eval_ks[0], cfg.eval.als_budget_s)
    fit_params = {k: v for k, v in als_params.items() if k != "settings_tried"}
    scorers = {
        "random": [random_scorer(len(tables.items), s) for s in seeds],
        "popular": popularity_scorer(counts),
        "als": [als] + [als_scorer(counts, seed=s, **fit_params) for s in seeds[1:]],
    }
    truth_path = work_dir / DATA_DIR / TRUTH_FILE
    if cfg.data.source == "synthetic" and truth_path.is_file():
        scorers["oracle"] = oracle_scorer(Truth.load(truth_path), work_dir / ETL_DIR, cfg)
    return scorers, als_params


def evaluate_all(cfg: PipelineConfig, report_users: EvalSet, model_embeddings: list[tuple[np.ndarray, np.ndarray]],
                 baselines: dict, als_params: dict, n_tune: int) -> dict:
    """Full-catalogue metrics of the model (one per seed) and every baseline on the reported users.

    Args:
        model_embeddings: per seed, (query embedding per users-table row, item embedding per catalogue row).
    """
    scorers = {"two_tower": [embedding_scorer(q, i) for q, i in model_embeddings], **baselines}
    report = evaluate_methods(scorers, report_users, tuple(cfg.train.eval_ks), bootstrap=cfg.eval.bootstrap,
                              confidence=cfg.eval.confidence, seed=cfg.data.seed)
    report["als_params"] = als_params
    report["tuning_users"] = n_tune
    report["seeds"] = {"two_tower": [cfg.train.seed + i for i in range(len(model_embeddings))],
                       "baselines": [cfg.train.seed + i for i in range(cfg.eval.seeds)]}
    return report


def cold_start(cfg: PipelineConfig, work_dir: Path, tables: Tables, cold: ColdUsers, queries: list[np.ndarray],
               items: list[np.ndarray], history_queries: list[np.ndarray], als_params: dict) -> tuple[dict, dict | None]:
    """The cold-start tables of the users kept out of training (see train.coldstart): features only,
    and with their first positives as history (None without `eval.cold_history` or such users)."""
    warm_raw = pd.read_parquet(work_dir / ETL_DIR / etl_stage.USERS_RAW)
    ks, counts = tuple(cfg.train.eval_ks), tables.train_counts
    features_only = cold_start_report(cold, queries, items, counts, warm_raw, cfg.eval, ks, cfg.data.seed)
    if cold.later is None or cold.later.n_users == 0:
        return features_only, None
    params = {k: v for k, v in als_params.items() if k != "settings_tried"}
    als = fit_als(counts, seed=cfg.train.seed, **params)
    with_history = cold_history_report(cold, history_queries, items, counts, warm_raw, als, cfg.train.history_length > 0,
                                       cfg.eval, ks, cfg.data.seed, queries)
    return features_only, with_history


def add_cold_start(report: dict, features_only: dict, with_history: dict | None) -> None:
    report["cold_start"] = features_only
    if with_history is not None:
        report["cold_start_history"] = with_history


def log_report(report: dict, cfg: PipelineConfig) -> None:
    LOG.info("full-catalogue evaluation on %d users, %d items:\n%s", report["n_users"], report["n_items"], format_table(report))
    for line in verdicts(report, cfg.train.eval_ks[0]):
        (LOG.warning if "LOSES TO" in line else LOG.info)(line)
    if "cold_start" in report:
        cold = report["cold_start"]
        LOG.info("cold start: %d new users, features only:\n%s", cold["n_users"], format_table(cold))
        for line in verdicts(cold, cfg.train.eval_ks[0]):
            LOG.info("cold start: %s", line)
    if "cold_start_history" in report:
        cold = report["cold_start_history"]
        LOG.info("cold start: %d new users, history = %s:\n%s", cold["n_users"], cold["history"], format_table(cold))
        for line in verdicts(cold, cfg.train.eval_ks[0]):
            LOG.info("cold start with history: %s", line)


def evaluate_artifacts(work_dir: str | Path, artifacts_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """`make eval`: the full-catalogue table of what an artifacts folder serves, and the baselines.

    Query embeddings come from the exported (compiled) tower and item embeddings from the
    exported file: the numbers describe the served model (one seed), not a copy still in memory.
    The baselines run with every configured seed.
    """
    from common import contract
    from common.config import config_from_dict
    from common.manifest import read_manifest
    from ensemble.ops.tower import NumpyTower
    from train.evaluate import save_report

    work, artifacts = Path(work_dir), Path(artifacts_dir)
    manifest = read_manifest(artifacts)
    cfg = config_from_dict(manifest["config"])
    tables = load_tables(work / ETL_DIR, cfg.data)
    with np.load(artifacts / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        tower = NumpyTower({k: arrays[k] for k in arrays.files})
    n_history = cfg.train.history_length
    queries = tower.embed(padded_inputs(tables.query_inputs(n_history), n_history))
    items = np.load(artifacts / contract.ARTIFACT_ITEM_EMBEDDINGS)[: len(tables.items)]
    tune, report_users = evaluation_users(cfg, tables)
    baselines, als_params = baseline_scorers(cfg, work, tables, tune)
    report = evaluate_all(cfg, report_users, [(queries, items)], baselines, als_params, tune.n_users)
    cold = load_cold_users(work / DATA_DIR / COLD_FILE, work / ETL_DIR, cfg.data, cfg.eval.cold_history)
    if cold is not None:
        add_cold_start(report, *cold_start(
            cfg, work, tables, cold, [tower.embed(padded_inputs(cold.query_inputs(n_history, False), n_history))], [items],
            [tower.embed(padded_inputs(cold.query_inputs(n_history, True), n_history))], als_params))
    log_report(report, cfg)
    save_report(report, Path(out_dir) if out_dir else artifacts)
    return report


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def run_training(cfg: PipelineConfig, work_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> TrainingRun:
    """Runs every training stage and exports the artifacts; ends with the table of stage costs.

    Args:
        cfg: the pipeline configuration.
        work_dir: folder for intermediate data (raw splits, ETL output).
        out_dir: artifacts folder to create (must be empty unless overwrite).
        overwrite: replace a non-empty out_dir.
    """
    work, out = Path(work_dir), Path(out_dir)
    prepare_output(out, overwrite)
    stages = StageRecorder()
    with stages.stage("data", "impressions") as s:
        paths = prepare_data(cfg.data, work / DATA_DIR)
        s.rows = _rows(paths["train"]) + _rows(paths["valid"])
    with stages.stage("etl", "impressions") as s:
        etl = etl_stage.run_etl(cfg.data, paths["train"], paths["valid"], work / ETL_DIR)
        s.rows = etl.input_rows
    with stages.stage("tables and users", "positives") as s:
        tables = load_tables(work / ETL_DIR, cfg.data)
        tune, report_users = evaluation_users(cfg, tables)
        cold = load_cold_users(work / DATA_DIR / COLD_FILE, work / ETL_DIR, cfg.data, cfg.eval.cold_history)
        s.rows = len(tables.train_pairs[0]) + len(tables.valid_pairs[0])
    model_embeddings, cold_queries, cold_history_queries, first = [], [], [], None
    n_history = cfg.train.history_length
    for i in range(cfg.eval.seeds):
        train_cfg = dataclasses.replace(cfg.train, seed=cfg.train.seed + i)
        with stages.stage(f"training (seed {train_cfg.seed})", "examples") as s:
            result = train_two_tower(train_cfg, cfg.data, work / ETL_DIR, tables, tune)
            s.rows = int(round(result.examples_per_s * sum(h["seconds"] for h in result.history)))
        with stages.stage(f"embeddings (seed {train_cfg.seed})", "users+items") as s:
            model_embeddings.append(embeddings(result.model, tables, n_history))
            if cold is not None:
                cold_queries.append(encode_in_batches(result.model.query_encoder, cold.query_inputs(n_history, False)))
                cold_history_queries.append(encode_in_batches(result.model.query_encoder, cold.query_inputs(n_history, True)))
            s.rows = len(tables.users) + len(tables.items)
        if first is None:
            first = result
        else:
            del result
    with stages.stage("baselines (ALS tuning)", "tuning users") as s:
        baselines, als_params = baseline_scorers(cfg, work, tables, tune)
        s.rows = tune.n_users * als_params["settings_tried"]
    with stages.stage("evaluation", "users") as s:
        report = evaluate_all(cfg, report_users, model_embeddings, baselines, als_params, tune.n_users)
        if cold is not None:
            add_cold_start(report, *cold_start(cfg, work, tables, cold, cold_queries, [items for _, items in model_embeddings],
                                               cold_history_queries, als_params))
        s.rows = report_users.n_users * sum(len(v) if isinstance(v, list) else 1 for v in baselines.values()) + report_users.n_users * len(model_embeddings)
    log_report(report, cfg)
    with stages.stage("export and index", "items") as s:
        manifest, _ = export_artifacts(cfg, work / ETL_DIR, tables, first, report, out, etl.rows_per_s)
        s.rows = len(tables.items)
    stages.save(out)
    LOG.info("training job finished in %.1f s:\n%s", time.perf_counter() - stages.started, stages.table())
    return TrainingRun(out, manifest, report, first.model)
