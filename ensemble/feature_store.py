"""Online user-feature stores: raw user id -> the user's stored raw feature values.

`ParquetFeatureStore` is the embedded default: the exported `user_features.parquet` held in
memory as sorted ids plus one int64 column per feature, looked up with one vectorized search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from common.errors import ArtifactError


class FeatureStore(Protocol):
    """What the lookup operator needs from a store."""

    feature_names: tuple[str, ...]

    def get(self, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Features of each user.

        Args:
            user_ids: [n] int64 raw ids.

        Returns:
            (feature name -> [n] int64 raw values, [n] bool found). Rows not found hold MISSING.
        """


class ParquetFeatureStore:
    """An in-memory table read from a parquet file with one row per user.

    Args:
        path: parquet file holding the id column and the feature columns.
        id_column: the user id column.
        feature_names: feature columns to serve, in this order.
    """

    def __init__(self, path: str | Path, id_column: str, feature_names: tuple[str, ...]):
        from ensemble.ops import MISSING

        self.path = Path(path)
        self.feature_names = tuple(feature_names)
        try:
            table = pd.read_parquet(self.path, columns=[id_column, *self.feature_names])
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"cannot read user features from {self.path}: {e}") from e
        table = table.sort_values(id_column, kind="stable")
        ids = table[id_column].to_numpy(dtype=np.int64)
        if len(ids) and np.any(ids[1:] == ids[:-1]):
            raise ArtifactError(f"{self.path} has repeated {id_column} values; one row per user is expected")
        self._ids = ids
        # One extra row at the end answers every miss with MISSING, so lookups need no branch.
        self._columns = {
            name: np.append(table[name].to_numpy(dtype=np.int64), np.int64(MISSING)) for name in self.feature_names
        }

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._ids, ids)
        pos_c = np.minimum(pos, max(len(self._ids) - 1, 0))
        found = (pos < len(self._ids)) & (self._ids[pos_c] == ids) if len(self._ids) else np.zeros(len(ids), bool)
        rows = np.where(found, pos_c, len(self._ids))
        return {name: col[rows] for name, col in self._columns.items()}, found
