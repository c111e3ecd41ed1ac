"""Online user-feature stores: raw user id -> the user's stored raw feature values.

`ParquetFeatureStore` is the embedded default: the exported `user_features.parquet` held in
memory as sorted ids plus an int64 row of features per user, looked up with one vectorized search
and one gather.
A model with a history input (train.history_length N > 0) also gets each user's stored history:
the table's list column `history_item_ids` (raw item ids, oldest first), held as one flat array
of ids with a start and a length per user, cut into [batch, N] rows per lookup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from common import contract
from common.errors import ArtifactError
from ensemble.history import rows_from_ragged


class FeatureStore(Protocol):
    """What the lookup operator needs from a store."""

    feature_names: tuple[str, ...]
    history_length: int

    def get(self, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Features of each user.

        Args:
            user_ids: [n] int64 raw ids.

        Returns:
            (feature name -> [n] int64 raw values, [n] bool found). Rows not found hold MISSING.
            With history_length N > 0 the dict also holds INPUT_HISTORY: [n, N] int64 raw item
            ids, oldest first, padded at the end with HISTORY_PAD (all padding for users without one).
        """


class ParquetFeatureStore:
    """An in-memory table read from a parquet file with one row per user.

    Args:
        path: parquet file holding the id column and the feature columns.
        id_column: the user id column.
        feature_names: feature columns to serve, in this order.
        history_length: N, the model's history length (0: no history is read or served).
    """

    def __init__(self, path: str | Path, id_column: str, feature_names: tuple[str, ...], history_length: int = 0):
        import pyarrow.parquet as pq

        from ensemble.ops import MISSING

        self.path = Path(path)
        self.feature_names = tuple(feature_names)
        self.history_length = int(history_length)
        columns = [id_column, *self.feature_names]
        if self.history_length:
            columns.append(contract.INPUT_HISTORY)
        try:
            arrow = pq.read_table(self.path, columns=columns)
            # Positions, not the file's pandas index (a slice written by pandas keeps a RangeIndex from k).
            table = arrow.select(columns[: 1 + len(self.feature_names)]).to_pandas().reset_index(drop=True)
        except (OSError, ValueError, KeyError) as e:
            if self.history_length and contract.INPUT_HISTORY not in _parquet_columns(self.path):
                raise ArtifactError(
                    f"{self.path} has no {contract.INPUT_HISTORY!r} column, and the model takes each user's latest "
                    f"{self.history_length} items (train.history_length); export it again with this training code"
                ) from None
            raise ArtifactError(f"cannot read user features from {self.path}: {e}") from e
        table = table.sort_values(id_column, kind="stable")
        ids = table[id_column].to_numpy(dtype=np.int64)
        if len(ids) and np.any(ids[1:] == ids[:-1]):
            raise ArtifactError(f"{self.path} has repeated {id_column} values; one row per user is expected")
        self._ids = ids
        # One row per user, the features side by side, so a lookup is one gather of whole rows; one
        # extra row at the end answers every miss with MISSING, so lookups need no branch.
        self._rows = np.full((len(ids) + 1, len(self.feature_names)), MISSING, dtype=np.int64)
        for j, name in enumerate(self.feature_names):
            self._rows[:-1, j] = table[name].to_numpy(dtype=np.int64)
        if self.history_length:
            self._history = _read_history(arrow.column(contract.INPUT_HISTORY), table.index.to_numpy(), self.path)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def user_ids(self) -> np.ndarray:
        """The stored users' raw ids, sorted."""
        return self._ids

    def positions(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([n] each id's position in `user_ids`, a valid but meaningless one where not found, [n] found)."""
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if not len(self._ids):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        # An id above every stored one lands past the end, which the clamp turns into the last
        # stored id: not equal to it, so not found.
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return pos, self._ids[pos] == ids

    def get(self, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        pos, found = self.positions(user_ids)
        rows = np.where(found, pos, len(self._ids))
        found_rows = self._rows[rows]
        out = {name: found_rows[:, j] for j, name in enumerate(self.feature_names)}
        if self.history_length:
            values, starts, lengths = self._history
            out[contract.INPUT_HISTORY] = rows_from_ragged(values, starts[rows], lengths[rows], self.history_length)
        return out, found


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (OSError, ValueError):
        return []


def _read_history(column, order: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A parquet list column -> (flat int64 ids, start and length per row in `order`, one more row
    of length 0 at the end for misses), from the list offsets: no Python loop per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not pa.types.is_integer(column.type.value_type):
        raise ArtifactError(f"{path}: column {contract.INPUT_HISTORY!r} must be a list of integer item ids, got {column.type}")
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    # flatten() follows the offsets and skips null lists; a null id inside a list becomes padding.
    values = pc.fill_null(column.flatten(), contract.HISTORY_PAD).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    return values, np.append(starts[order], 0), np.append(lengths[order], 0)
