"""Two-tower training with early stopping on full-catalogue Recall@10 of the tuning users."""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import tensorflow as tf
from merlin.io import Dataset
from merlin.schema import ColumnSchema, Schema, Tags

from common import contract
from common.config import DataConfig, TrainConfig
from common.progress import progress_bar
from train import etl as etl_stage
from train.data import DATA_DIR, TRAIN_FILE
from train.history import Ragged, latest_items, previous_items, training_order_key
from train.evaluate import EvalSet, build_eval_set, interactions_matrix, rank_metrics, top_k
from train.model import build_two_tower, encode_in_batches, item_probabilities, tower_schemas

LOG = logging.getLogger(__name__)


@dataclass
class Tables:
    """The encoded entity tables and the positives, in table-row coordinates.

    Attributes:
        users: encoded user features, one row per training user (query tower input).
        items: encoded item features, one row per catalogue item (item tower input).
        train_pairs: (user rows [n], item rows [n]) of training positives.
        valid_pairs: (user rows [m], item rows [m]) of held-out positives; item row -1 when the
            item is not in the catalogue. Users absent from training are dropped.
        seen_pairs: what rankings leave out when it is not the training positives (data.seen=all).
        train_key: [n] the time of each training positive (None without a timestamp: row order),
            which orders the histories.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    train_pairs: tuple[np.ndarray, np.ndarray]
    valid_pairs: tuple[np.ndarray, np.ndarray]
    seen_pairs: tuple[np.ndarray, np.ndarray] | None = None
    train_key: np.ndarray | None = None

    def history_rows(self, n: int) -> Ragged:
        """Each user row's latest `n` training positives as catalogue rows, oldest first."""
        return latest_items(self.train_pairs[0], self.train_pairs[1], self.train_key, n, len(self.users))

    def history(self, n: int) -> Ragged | None:
        """The same as item-id codes, the query tower's input (None when n is 0)."""
        if n == 0:
            return None
        codes = self.items[self.item_id_column].to_numpy()
        return self.history_rows(n).map(lambda rows: codes[rows])

    @property
    def item_id_column(self) -> str:
        return self.items.columns[0]

    def query_inputs(self, n: int, rows: np.ndarray | None = None) -> dict:
        """The query tower's inputs for user rows (all when None), with their history when n > 0."""
        users = self.users if rows is None else self.users.iloc[rows]
        history = self.history(n)
        if history is not None and rows is not None:
            history = history.take(rows)
        return query_inputs(users, history)

    @functools.cached_property
    def train_counts(self) -> sp.csr_matrix:
        """[users, items] training positives per pair (what ALS and the popularity baselines learn from)."""
        return interactions_matrix(*self.train_pairs, len(self.users), len(self.items))

    def eval_set(self) -> EvalSet:
        """Users with held-out positives; each ranking leaves out `seen_pairs` (default: the training positives)."""
        seen = self.seen_pairs if self.seen_pairs is not None else self.train_pairs
        return build_eval_set(*seen, *self.valid_pairs, len(self.users), len(self.items))


def _row_lookup(codes: np.ndarray) -> np.ndarray:
    """Array mapping an encoded id to its table row, -1 elsewhere."""
    lookup = np.full(int(codes.max()) + 2, -1, dtype=np.int64)
    lookup[codes] = np.arange(len(codes))
    return lookup


def _to_rows(lookup: np.ndarray, codes: np.ndarray) -> np.ndarray:
    inside = (codes >= 0) & (codes < len(lookup))
    return np.where(inside, lookup[np.clip(codes, 0, len(lookup) - 1)], -1)


def load_tables(etl_dir: Path, cfg: DataConfig) -> Tables:
    """Reads the ETL output into table-row coordinates."""
    users = pd.read_parquet(etl_dir / etl_stage.USERS_ENCODED)
    items = pd.read_parquet(etl_dir / etl_stage.ITEMS_ENCODED)
    user_rows = _row_lookup(users[cfg.user_id].to_numpy())
    item_rows = _row_lookup(items[cfg.item_id].to_numpy())
    pairs = {}
    for name in (etl_stage.TRAIN_DIR, etl_stage.VALID_DIR):
        df = etl_stage.read_encoded(etl_dir / name, [cfg.user_id, cfg.item_id])
        u = _to_rows(user_rows, df[cfg.user_id].to_numpy())
        i = _to_rows(item_rows, df[cfg.item_id].to_numpy())
        keep = u >= 0
        pairs[name] = (u[keep], i[keep])
        if name == etl_stage.TRAIN_DIR:
            train_item_codes, train_keep = df[cfg.item_id].to_numpy(), keep
    seen = _all_training_pairs(etl_dir, cfg) if cfg.seen == "all" else None
    key = training_order_key(etl_dir.parent / DATA_DIR / TRAIN_FILE, cfg, train_item_codes, item_codes_of_raw(etl_dir, cfg))
    if key is not None:
        key = key[train_keep]
    return Tables(users, items, pairs[etl_stage.TRAIN_DIR], pairs[etl_stage.VALID_DIR], seen, key)


def item_codes_of_raw(etl_dir: Path, cfg: DataConfig):
    """raw item ids -> their item-id codes (-1 for ids outside the catalogue)."""
    raw = pd.read_parquet(etl_dir / etl_stage.ITEMS_RAW, columns=[cfg.item_id])[cfg.item_id].to_numpy()
    codes = pd.read_parquet(etl_dir / etl_stage.ITEMS_ENCODED, columns=[cfg.item_id])[cfg.item_id].to_numpy()
    return lambda ids: np.where((rows := rows_of_raw(raw, np.asarray(ids))) >= 0, codes[rows], -1)


def rows_of_raw(sorted_ids: np.ndarray, raw_ids: np.ndarray) -> np.ndarray:
    """Table rows of raw ids in a table sorted by raw id (the ETL's raw tables), -1 where absent."""
    pos = np.searchsorted(sorted_ids, raw_ids)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == raw_ids)
    return np.where(found, pos_c, -1)


def _all_training_pairs(etl_dir: Path, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(user rows, item rows) of every raw training interaction, positive or not (data.seen=all)."""
    raw = pd.read_parquet(etl_dir.parent / DATA_DIR / TRAIN_FILE, columns=[cfg.user_id, cfg.item_id])
    users = pd.read_parquet(etl_dir / etl_stage.USERS_RAW, columns=[cfg.user_id])[cfg.user_id].to_numpy()
    items = pd.read_parquet(etl_dir / etl_stage.ITEMS_RAW, columns=[cfg.item_id])[cfg.item_id].to_numpy()
    u = rows_of_raw(users, raw[cfg.user_id].to_numpy())
    i = rows_of_raw(items, raw[cfg.item_id].to_numpy())
    keep = (u >= 0) & (i >= 0)
    return u[keep], i[keep]


def tower_inputs(table: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: table[c].to_numpy(dtype=np.int32) for c in table.columns}


def query_inputs(users: pd.DataFrame, history: Ragged | None) -> dict:
    """Encoded user columns, plus the history (item codes) under the contract's name when there is one."""
    inputs = tower_inputs(users)
    if history is not None:
        inputs[contract.INPUT_HISTORY] = history
    return inputs


@dataclass
class TrainResult:
    """A trained model and how training went.

    Attributes:
        model: the two-tower model with the weights of its best epoch.
        history: per epoch: loss, tuning recall@10, seconds, examples/s.
        best_epoch: 1-based epoch whose weights were kept.
        examples_per_s: training examples per second over all epochs (fit time only).
    """

    model: tf.keras.Model
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    examples_per_s: float = 0.0


def embeddings(model: tf.keras.Model, tables: Tables, history_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings per user row, item embeddings per catalogue row)."""
    return (
        encode_in_batches(model.query_encoder, tables.query_inputs(history_length)),
        encode_in_batches(model.candidate_encoder, tower_inputs(tables.items)),
    )


PREPARED_DIR = "train_prepared"


def prepare_training_rows(etl_dir: Path, data_cfg: DataConfig, cfg: TrainConfig) -> Path:
    """The encoded training positives as the model trains on them: masked, with their history.

    Masking (cold-start rows): a `mask_user_id` share of rows gets the unknown-id code
    (OOV_OFFSET) as user id; in a `mask_features` share, each user feature independently gets
    the missing-value code (NULL_OFFSET), and in as many again the unseen-value code (OOV_OFFSET).
    These are the codes the served workflow gives a new user's id, a feature not sent and a value
    training never saw, so the embedding rows they select are trained rather than left at their
    initial values. Seeded by cfg.seed.

    History (`history_length` > 0): each row gets the list column `history_item_ids`, the item
    codes of the same user's `history_length` positives before it (by time where the data has a
    timestamp, else row order), computed on the real user ids before any masking; a `mask_history` share of rows
    gets an empty one. A `mask_new_user` share looks like a user the server has never seen: the
    unknown id and no history (their features stay, masked as above).

    Returns the training folder to read (the ETL's own when there is nothing to add).
    """
    from nvtabular.ops.categorify import NULL_OFFSET, OOV_OFFSET

    source = etl_dir / etl_stage.TRAIN_DIR
    if cfg.mask_user_id == 0 and cfg.mask_features == 0 and cfg.mask_new_user == 0 and cfg.history_length == 0:
        return source
    frame = etl_stage.read_encoded(source)
    history = None
    if cfg.history_length:
        items = frame[data_cfg.item_id].to_numpy()
        key = training_order_key(etl_dir.parent / DATA_DIR / TRAIN_FILE, data_cfg, items, item_codes_of_raw(etl_dir, data_cfg))
        history = previous_items(frame[data_cfg.user_id].to_numpy(), items, key, cfg.history_length)
    rng = np.random.default_rng(cfg.seed + 7)
    n = len(frame)
    ids = frame[data_cfg.user_id].to_numpy()
    frame[data_cfg.user_id] = np.where(rng.random(n) < cfg.mask_user_id, OOV_OFFSET, ids).astype(ids.dtype)
    if history is not None and cfg.mask_history:
        history = history.emptied(rng.random(n) < cfg.mask_history)
    for name in data_cfg.user_features:
        draw = rng.random(n)
        values = frame[name].to_numpy()
        values = np.where(draw < cfg.mask_features, NULL_OFFSET, values)
        values = np.where((draw >= cfg.mask_features) & (draw < 2 * cfg.mask_features), OOV_OFFSET, values)
        frame[name] = values.astype(frame[name].dtype)
    if cfg.mask_new_user:  # drawn last, so that the other masks stay as they were without it
        new = rng.random(n) < cfg.mask_new_user
        frame[data_cfg.user_id] = np.where(new, OOV_OFFSET, frame[data_cfg.user_id].to_numpy()).astype(ids.dtype)
        if history is not None:
            history = history.emptied(new)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if history is not None:
        lists = pa.ListArray.from_arrays(pa.array(history.offsets.astype(np.int32)), pa.array(history.values.astype(np.int32)))
        table = table.append_column(contract.INPUT_HISTORY, lists)
    out = etl_dir / PREPARED_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pq.write_table(table, out / "part_0.parquet")
    LOG.info("training rows: user id masked in %.0f%%, each user feature %.0f%% missing + %.0f%% unseen, history of up to %d positives (%d rows)",
             100 * cfg.mask_user_id, 100 * cfg.mask_features, 100 * cfg.mask_features, cfg.history_length, n)
    return out


def history_column(item_id: ColumnSchema) -> ColumnSchema:
    """The schema of the history list column: the item id's codes and domain, a user-side sequence."""
    return ColumnSchema(contract.INPUT_HISTORY, dtype=np.int32, tags=[Tags.USER, Tags.SEQUENCE],
                        properties=dict(item_id.properties), is_list=True, is_ragged=True)


def training_dataset(etl_dir: Path, data_cfg: DataConfig, cfg: TrainConfig) -> Dataset:
    """The prepared training rows as a merlin Dataset whose schema holds only the towers' columns."""
    source_schema = Dataset(str(etl_dir / etl_stage.TRAIN_DIR), engine="parquet").schema
    user_schema, item_schema = tower_schemas(source_schema)
    train = Dataset(str(prepare_training_rows(etl_dir, data_cfg, cfg)), engine="parquet")
    schema = user_schema + item_schema
    if cfg.history_length:
        schema = schema + Schema([history_column(item_schema[data_cfg.item_id])])
    train.schema = schema
    return train


class _StepProgress(tf.keras.callbacks.Callback):
    """Feeds a progress bar with the examples of each training step."""

    def __init__(self, bar, batch_size: int):
        super().__init__()
        self.bar, self.batch_size = bar, batch_size

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(self.batch_size)


def train_two_tower(cfg: TrainConfig, data_cfg: DataConfig, etl_dir: Path, tables: Tables, tune: EvalSet) -> TrainResult:
    """Trains `TwoTowerModelV2` on the encoded positives, keeping the best epoch's weights.

    After each epoch the towers embed every catalogue item and the tuning users, and their
    full-catalogue Recall@10 (training positives excluded) decides early stopping.

    Args:
        tune: the tuning users (see train.evaluate.split_tune_eval), never the reported ones.
    """
    tf.keras.utils.set_random_seed(cfg.seed)
    train = training_dataset(etl_dir, data_cfg, cfg)
    item_schema = train.schema.select_by_tag(Tags.ITEM)
    probs = None
    if cfg.logq_correction > 0:
        cardinality = int(item_schema[data_cfg.item_id].int_domain.max) + 1
        codes = etl_stage.read_encoded(etl_dir / etl_stage.TRAIN_DIR, [data_cfg.item_id])[data_cfg.item_id].to_numpy()
        probs = item_probabilities(codes, cardinality)
    model = build_two_tower(train.schema, cfg, probs)
    k = cfg.eval_ks[0]
    tune_inputs = tables.query_inputs(cfg.history_length, tune.user_rows)

    result = TrainResult(model=model)
    best_recall, best_weights, waited, fit_seconds = -1.0, None, 0, 0.0
    n_examples = train.num_rows
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        with progress_bar(n_examples, f"epoch {epoch}/{cfg.epochs}", "examples", min_total=2_000_000) as bar:
            callbacks = [_StepProgress(bar, cfg.batch_size)] if not bar.disable else []
            hist = model.fit(train, batch_size=cfg.batch_size, epochs=1, verbose=0, shuffle=True, callbacks=callbacks)
        seconds = time.perf_counter() - started
        fit_seconds += seconds
        queries = encode_in_batches(model.query_encoder, tune_inputs)
        items = encode_in_batches(model.candidate_encoder, tower_inputs(tables.items))
        scorer = lambda rows, q=queries: q[np.searchsorted(tune.user_rows, rows)] @ items.T  # noqa: E731
        recall = rank_metrics(top_k(scorer, tune, k), tune, (k,))[f"recall@{k}"]
        row = {"epoch": epoch, "loss": float(hist.history["loss"][-1]), f"tune_recall@{k}": recall,
               "seconds": seconds, "examples_per_s": n_examples / seconds,
               "tune_seconds": time.perf_counter() - started - seconds}
        result.history.append(row)
        LOG.info(
            "epoch %d/%d: loss %.4f, tuning recall@%d %.4f (%d users, %.1f s), %.1f s (%.0f examples/s)",
            epoch, cfg.epochs, row["loss"], k, recall, tune.n_users, row["tune_seconds"], seconds, row["examples_per_s"],
        )
        if recall > best_recall:
            best_recall, best_weights, waited, result.best_epoch = recall, model.get_weights(), 0, epoch
        else:
            waited += 1
            if cfg.early_stopping_patience and waited >= cfg.early_stopping_patience:
                LOG.info("early stopping: no better tuning recall for %d epochs", waited)
                break
    model.set_weights(best_weights)
    result.examples_per_s = n_examples * len(result.history) / fit_seconds
    LOG.info("kept epoch %d (tuning recall@%d %.4f)", result.best_epoch, k, best_recall)
    return result
