"""Cold-start evaluation: users kept out of training entirely, ranked from their features alone.

`data.cold_users` users leave both splits before the ETL (`train.data.remove_cold_users`), with
every interaction. Here they are served as a new user is: their raw features go through the
fitted user workflow (their id is unknown to it, so it gets the out-of-vocabulary code; values
training never saw get it too) and the query tower. What they clicked is what each method must
find, over the whole catalogue. The baselines are the most popular items, and the most popular
within the user's own segment (`eval.segment`, say gender x age decade).

A second table (`eval.cold_history` = N) gives each new user's first N positives as the history
a client would send, and looks for the rest, with those N left out of every ranking. ALS joins
it, folding the same N into a user vector with implicit's `recalculate_user` (one least-squares
solve against the trained item factors, no retraining).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from common import contract
from common.config import DataConfig, EvalConfig
from common.errors import ConfigError
from train import etl as etl_stage
from train.evaluate import EvalSet, Scorer, build_eval_set, embedding_scorer, evaluate_methods, popularity_scorer
from train.fit import query_inputs, rows_of_raw
from train.history import Ragged, user_runs, latest_items, sequence_order

LOG = logging.getLogger(__name__)

MAX_SEGMENT_SCORES = 200_000_000  # segments x items held by the segment baseline


@dataclass(frozen=True)
class ColdUsers:
    """The users kept out of training.

    Attributes:
        raw: one row per user, their raw user columns (from their latest interaction).
        encoded: the same rows encoded by the fitted user workflow (the query tower's input).
        data: what to find: every positive of theirs, by catalogue row; nothing is excluded.
        first: per user, the catalogue rows of their first `eval.cold_history` positives.
        later: what to find after those: their other positives, the first ones excluded
            (users with more positives than that only).
        item_codes: item-id code per catalogue row (to send `first` to the tower).
    """

    raw: pd.DataFrame
    encoded: pd.DataFrame
    data: EvalSet
    first: Ragged | None = None
    later: EvalSet | None = None
    item_codes: np.ndarray | None = None

    def query_inputs(self, history_length: int, with_history: bool) -> dict:
        """The query tower's inputs: features, and with a history input the first positives (or none)."""
        if not history_length:
            return query_inputs(self.encoded, None)
        if with_history and self.first is not None:
            # eval.cold_history may exceed the model's N: the server keeps the latest N sent, so does this.
            history = self.first.latest(history_length).map(lambda rows: self.item_codes[rows])
        else:
            history = Ragged.from_lengths(np.zeros(0, np.int64), np.zeros(len(self.encoded), np.int64))
        return query_inputs(self.encoded, history)


def load_cold_users(cold_path: Path, etl_dir: Path, cfg: DataConfig, n_first: int = 0) -> ColdUsers | None:
    """Reads `cold.parquet` and encodes its users as the server would; None when there are none.

    Args:
        n_first: how many first positives per user make the history of the second table (0: none).
    """
    import nvtabular as nvt

    if not cold_path.is_file():
        return None
    cold = pd.read_parquet(cold_path)
    if cold.empty:
        return None
    raw = cold.drop_duplicates(subset=[cfg.user_id], keep="last")[list(cfg.user_columns)]
    raw = raw.sort_values(cfg.user_id).reset_index(drop=True)
    workflow = etl_stage.user_workflow(nvt.Workflow.load(str(etl_dir / contract.ARTIFACT_WORKFLOW)), cfg)
    encoded = workflow._transform_df(raw).reset_index(drop=True)[list(cfg.user_columns)]
    catalogue = pd.read_parquet(etl_dir / etl_stage.ITEMS_RAW, columns=[cfg.item_id])[cfg.item_id].to_numpy()
    positives = cold[cfg.is_positive(cold[cfg.label]).to_numpy()]
    item_rows = rows_of_raw(catalogue, positives[cfg.item_id].to_numpy())
    user_rows = rows_of_raw(raw[cfg.user_id].to_numpy(), positives[cfg.user_id].to_numpy())
    empty = np.zeros(0, dtype=np.int64)
    data = build_eval_set(empty, empty, user_rows, item_rows, len(raw), len(catalogue))
    if not n_first:
        return ColdUsers(raw, encoded, data)
    # cold.parquet is in time order per user (row order without a timestamp): a stable sort by user keeps it
    order = sequence_order(user_rows, None)
    _, position = user_runs(user_rows[order])
    early = np.zeros(len(order), dtype=bool)
    early[order] = position < n_first
    first_pairs = (user_rows[early], item_rows[early])
    in_catalogue = first_pairs[1] >= 0
    first = latest_items(first_pairs[0][in_catalogue], first_pairs[1][in_catalogue], None, n_first, len(raw))
    later = build_eval_set(*first_pairs, user_rows[~early], item_rows[~early], len(raw), len(catalogue))
    codes = pd.read_parquet(etl_dir / etl_stage.ITEMS_ENCODED, columns=[cfg.item_id])[cfg.item_id].to_numpy()
    return ColdUsers(raw, encoded, data, first, later, codes)


def _segment_keys(frame: pd.DataFrame, segment: tuple[str, ...]) -> pd.DataFrame:
    keys = {}
    for entry in segment:
        name, _, width = entry.partition("/")
        if name in frame.columns:
            keys[entry] = frame[name].to_numpy() // int(width) if width else frame[name].to_numpy()
    return pd.DataFrame(keys)


def segment_popularity_scorer(train_counts: sp.csr_matrix, warm_raw: pd.DataFrame, cold_raw: pd.DataFrame,
                              segment: tuple[str, ...]) -> Scorer:
    """Ranks by training positives of the warm users in the cold user's segment (ties: overall popularity).

    Args:
        train_counts: [warm users, items] training positives, rows aligned with `warm_raw`.
        warm_raw: the training users' raw features.
        cold_raw: the cold users' raw features (rows are what the scorer is called with).
        segment: `eval.segment`; users of a segment no training user is in get the overall ranking.
    """
    warm_keys, cold_keys = _segment_keys(warm_raw, segment), _segment_keys(cold_raw, segment)
    overall = np.asarray(train_counts.sum(axis=0)).ravel().astype(np.float64)
    tie_break = overall / (overall.max() + 1.0)  # < 1: only orders items of equal segment count
    if warm_keys.shape[1] == 0:
        return lambda rows: np.broadcast_to(overall, (len(rows), len(overall)))
    both = pd.concat([warm_keys, cold_keys], ignore_index=True)
    ids = both.groupby(list(both.columns), sort=False).ngroup().to_numpy()
    warm_ids, cold_ids = ids[: len(warm_keys)], ids[len(warm_keys):]
    n_segments = int(ids.max()) + 1
    if n_segments * len(overall) > MAX_SEGMENT_SCORES:
        raise ConfigError(f"eval.segment {list(segment)} makes {n_segments} segments: too many for a popularity table "
                          f"over {len(overall)} items; bucket the feature (name/width) or pick coarser ones")
    member = sp.csr_matrix((np.ones(len(warm_ids)), (warm_ids, np.arange(len(warm_ids)))), shape=(n_segments, len(warm_ids)))
    per_segment = np.asarray((member @ train_counts).todense(), dtype=np.float64) + tie_break
    has_members = np.bincount(warm_ids, minlength=n_segments) > 0
    per_segment[~has_members] = overall
    return lambda rows: per_segment[cold_ids[rows]]


def cold_start_report(cold: ColdUsers, query_embeddings: list[np.ndarray], item_embeddings: list[np.ndarray],
                      train_counts: sp.csr_matrix, warm_raw: pd.DataFrame, cfg: EvalConfig, ks: tuple[int, ...], seed: int) -> dict:
    """The cold-start table: the two-tower model (one query embedding per seed) against the popularity baselines."""
    scorers: dict[str, Scorer | list[Scorer]] = {
        "two_tower": [embedding_scorer(q, i) for q, i in zip(query_embeddings, item_embeddings)],
        "popular": popularity_scorer(train_counts),
        "popular_in_segment": segment_popularity_scorer(train_counts, warm_raw, cold.raw, cfg.segment),
    }
    LOG.info("cold-start evaluation: %d users kept out of training, features only", cold.data.n_users)
    report = evaluate_methods(scorers, cold.data, ks, bootstrap=cfg.bootstrap, confidence=cfg.confidence, seed=seed)
    report.pop("recall_curves")
    report["segment"] = list(cfg.segment)
    report["history"] = "none: features only"
    return report


def als_fold_in_scorer(model, first: Ragged, n_items: int) -> Scorer:
    """ALS with each new user's vector solved from their first positives (implicit's recalculate_user)."""
    users = np.repeat(np.arange(len(first)), first.lengths)
    user_items = sp.csr_matrix((np.ones(len(users), np.float32), (users, first.values)), shape=(len(first), n_items))
    user_items.sum_duplicates()
    factors = np.asarray(model.recalculate_user(np.arange(len(first)), user_items))
    items = np.asarray(model.item_factors)
    return lambda rows: factors[rows] @ items.T


def cold_history_report(cold: ColdUsers, query_embeddings: list[np.ndarray], item_embeddings: list[np.ndarray],
                        train_counts: sp.csr_matrix, warm_raw: pd.DataFrame, als_model, has_history: bool,
                        cfg: EvalConfig, ks: tuple[int, ...], seed: int, features_only: list[np.ndarray] | None = None) -> dict:
    """The second cold-start table: new users with their first positives as history (see the module docstring).

    Args:
        query_embeddings: per seed, the new users' queries given the first positives as history.
        als_model: a fitted implicit ALS model (the tuned settings) to fold the same positives into.
        has_history: whether the two-tower model takes a history (without one, its row is features only).
        features_only: per seed, the same users' queries without the history: the row
            `two_tower_features_only` shows what the history adds.
    """
    scorers: dict[str, Scorer | list[Scorer]] = {
        "two_tower": [embedding_scorer(q, i) for q, i in zip(query_embeddings, item_embeddings)],
        "popular": popularity_scorer(train_counts),
        "popular_in_segment": segment_popularity_scorer(train_counts, warm_raw, cold.raw, cfg.segment),
        "als_fold_in": als_fold_in_scorer(als_model, cold.first, train_counts.shape[1]),
    }
    if has_history and features_only is not None:
        scorers["two_tower_features_only"] = [embedding_scorer(q, i) for q, i in zip(features_only, item_embeddings)]
    LOG.info("cold-start evaluation: %d new users with their first %d positives as history", cold.later.n_users, cfg.cold_history)
    report = evaluate_methods(scorers, cold.later, ks, bootstrap=cfg.bootstrap, confidence=cfg.confidence, seed=seed)
    report.pop("recall_curves")
    report["segment"] = list(cfg.segment)
    report["history"] = (f"the first {cfg.cold_history} positives" if has_history
                         else f"none for two_tower (the model has no history input); the first {cfg.cold_history} positives for ALS")
    return report
