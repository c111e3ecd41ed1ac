"""Operator: raw user id -> the user's stored raw features (the feature-store lookup)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema

from common import contract
from ensemble.feature_store import FeatureStore, ParquetFeatureStore
from ensemble.history import append_sent
from ensemble.ops import ArrayOperator


class LookupUserFeatures(ArrayOperator, BaseOperator):
    """Looks up each user's raw features; unknown users get MISSING values and a flag.

    Inputs: the request's `user_id`, and optionally its raw feature columns (same names as the
    features): a value other than FEATURE_NOT_GIVEN replaces the stored one, which is how a new
    user's features reach the tower.
    Output columns: the user id under the dataset's id column name (what the workflow reads),
    one int64 column per raw feature, and `unknown_user` (bool), true where the store has no
    row for the id.
    With history_length N > 0 it also takes the request's `history_item_ids` ([batch, n] raw
    item ids, oldest first) and outputs `history_item_ids` [batch, N + n]: the stored history
    followed by the request's ids (the most recent), padded at the end. The transform keeps the
    latest N the model knows (an unknown id must not push a known one out).

    Args:
        table_path: parquet file with one row per user (saved beside the ensemble on export).
        id_column: the user id column.
        feature_names: the raw feature columns to return.
        history_length: N, the model's history length (0: no history).
    """

    history_length = 0  # ensembles pickled before the history input have none

    def __init__(self, table_path: str | Path, id_column: str, feature_names: tuple[str, ...], history_length: int = 0):
        super().__init__()
        self.table_path = str(table_path)
        self.id_column = id_column
        self.feature_names = tuple(feature_names)
        self.history_length = int(history_length)
        self._store: FeatureStore | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_store"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._store = None

    def save_artifacts(self, artifact_path: str) -> None:
        shutil.copy2(self.table_path, Path(artifact_path) / Path(self.table_path).name)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        if self._store is not None:  # a shared store was set (set_store): no local table needed
            return
        path = Path(artifact_path) / Path(self.table_path).name if artifact_path else Path(self.table_path)
        self._store = ParquetFeatureStore(path, self.id_column, self.feature_names, self.history_length)

    @property
    def store(self) -> FeatureStore | None:
        """The store lookups read (None before load_artifacts)."""
        return self._store

    def set_store(self, store: FeatureStore) -> None:
        """Replaces the embedded table with another store (a shared online store, say)."""
        self._store = store

    def compute_input_schema(self, root_schema, parents_schema, deps_schema, selector) -> Schema:
        available = root_schema + parents_schema + deps_schema
        optional = [*self.feature_names, *([contract.INPUT_HISTORY] if self.history_length else [])]
        names = [contract.INPUT_USER_ID, *[n for n in optional if n in available.column_names]]
        return available.select_by_name(names)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema=None) -> Schema:
        cols = [ColumnSchema(self.id_column, dtype=np.int64)]
        cols += [ColumnSchema(name, dtype=np.int64) for name in self.feature_names]
        if self.history_length:
            cols.append(ColumnSchema(contract.INPUT_HISTORY, dtype=np.int64, dims=(None, None)))  # stored + sent: N + n wide
        cols.append(ColumnSchema(contract.OUTPUT_UNKNOWN, dtype=np.bool_))
        return Schema(cols)

    def run(self, columns: dict) -> dict:
        if self._store is None:
            self.load_artifacts()
        ids = np.asarray(columns[contract.INPUT_USER_ID], dtype=np.int64).reshape(-1)
        features, found = self._store.get(ids)
        # Request values replace stored ones where given; usually none is, which one check settles.
        names = [name for name in self.feature_names if name in columns]
        if names:
            given = np.array([np.asarray(columns[name]).reshape(-1) for name in names], dtype=np.int64)
            sent = given != contract.FEATURE_NOT_GIVEN
            if sent.any():
                for j in np.flatnonzero(sent.any(axis=1)):
                    features[names[j]] = np.where(sent[j], given[j], features[names[j]])
        if self.history_length:
            features[contract.INPUT_HISTORY] = append_sent(features.pop(contract.INPUT_HISTORY), columns.get(contract.INPUT_HISTORY))
        return {self.id_column: ids, **features, contract.OUTPUT_UNKNOWN: ~found}
