"""The user's recent positives as a query-tower input (`train.history_length`).

A training example (user, item) sees the user's `n` training positives before it, oldest first;
the served query sees the user's latest `n` (what the export stores per user). "Before" is time
order where the data has a timestamp, else the order of the rows. Lists are ragged (`Ragged`):
a user's first positive has an empty history, which the tower pools to zeros.

Everything here is index arithmetic on sorted arrays: no Python loop per user or per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.contract import HISTORY_PAD
from common.errors import DataError
from ensemble.history import rows_from_ragged


@dataclass(frozen=True)
class Ragged:
    """Rows of variable length: row i is values[offsets[i]:offsets[i + 1]].

    Attributes:
        values: [total] the rows' values, row after row.
        offsets: [rows + 1] int64, starting at 0.
    """

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Ragged:
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def take(self, rows: np.ndarray) -> Ragged:
        """The given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.lengths[rows]
        return Ragged.from_lengths(self.values[_gather_index(starts, lengths)], lengths)

    def slice(self, start: int, stop: int) -> Ragged:
        """Rows start..stop-1 (offsets rebased to 0)."""
        offsets = self.offsets[start : stop + 1]
        return Ragged(self.values[offsets[0] : offsets[-1]], offsets - offsets[0])

    def emptied(self, rows: np.ndarray) -> Ragged:
        """The same rows, those where `rows` (a [rows] bool mask) is true made empty."""
        return Ragged.from_lengths(self.values[np.repeat(~rows, self.lengths)], np.where(rows, 0, self.lengths))

    def latest(self, n: int) -> Ragged:
        """Each row's last `n` values (all of a shorter row), in order."""
        lengths = np.minimum(self.lengths, n)
        return Ragged.from_lengths(self.values[_gather_index(self.offsets[1:] - lengths, lengths)], lengths)

    def map(self, fn) -> Ragged:
        """The same rows with fn applied to the values array."""
        return Ragged(fn(self.values), self.offsets)

    def padded(self, width: int, pad: int) -> np.ndarray:
        """[rows, width] int64 with each row's values first (its latest `width` when longer), then `pad`."""
        out = rows_from_ragged(self.values, self.offsets[:-1], self.lengths, width)
        if pad != HISTORY_PAD:
            out[out == HISTORY_PAD] = pad  # the values are ids or codes, never the serving pad
        return out


def padded_inputs(inputs: dict, width: int) -> dict:
    """Tower inputs with each Ragged history as [rows, width] codes padded with 0 (what the
    compiled tower and the served request path take)."""
    return {k: v.padded(max(width, 1), 0) if isinstance(v, Ragged) else v for k, v in inputs.items()}


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges starts[i] .. starts[i] + lengths[i] - 1."""
    total = int(lengths.sum())
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)


def sequence_order(users: np.ndarray, key: np.ndarray | None) -> np.ndarray:
    """Row order by user, then by key (time), ties and key=None in row order."""
    if key is None:
        return np.argsort(users, kind="stable")
    return np.lexsort((np.arange(len(users)), key, users))


def user_runs(sorted_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first position of each user's run, position within the run) of a user-sorted array."""
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) if len(sorted_users) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(sorted_users)])
    return starts, np.arange(len(sorted_users)) - np.repeat(starts, counts)


def previous_items(users: np.ndarray, items: np.ndarray, key: np.ndarray | None, n: int) -> Ragged:
    """Per row, the same user's up to `n` items before it (by key, then row order), oldest first.

    Returns:
        a Ragged with one row per input row, in input order.
    """
    order = sequence_order(users, key)
    sorted_items = items[order]
    _, position = user_runs(users[order])
    lengths = np.minimum(position, n)
    ragged = Ragged.from_lengths(sorted_items[_gather_index(np.arange(len(order)) - lengths, lengths)], lengths)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return ragged.take(back)


def latest_items(users: np.ndarray, items: np.ndarray, key: np.ndarray | None, n: int, n_users: int) -> Ragged:
    """Per user 0..n_users-1 (users are row numbers), their latest `n` items, oldest first; empty when none."""
    order = sequence_order(users, key)
    sorted_users = users[order]
    starts, _ = user_runs(sorted_users)
    ends = np.r_[starts[1:], len(order)]
    lengths = np.zeros(n_users, dtype=np.int64)
    begin = np.zeros(n_users, dtype=np.int64)
    who = sorted_users[starts]
    lengths[who] = np.minimum(ends - starts, n)
    begin[who] = ends - lengths[who]
    return Ragged.from_lengths(items[order][_gather_index(begin, lengths)], lengths)


def training_order_key(raw_train: Path, cfg: DataConfig, encoded_items: np.ndarray, item_codes_of_raw) -> np.ndarray | None:
    """The time of each encoded training positive (None without a timestamp: row order is the order).

    The ETL keeps the raw rows' order when it filters positives, so the raw training positives
    line up with the encoded ones; the check that each row's raw item encodes to the row's code
    makes a misalignment an error rather than a silently wrong history.

    Args:
        raw_train: the raw training split (train.parquet).
        encoded_items: [n] item codes of the encoded training positives, in file order.
        item_codes_of_raw: raw item ids -> their codes.
    """
    if not cfg.timestamp:
        return None
    raw = pd.read_parquet(raw_train, columns=[cfg.item_id, cfg.label, cfg.timestamp])
    raw = raw[cfg.is_positive(raw[cfg.label]).to_numpy()]
    if len(raw) != len(encoded_items) or not np.array_equal(item_codes_of_raw(raw[cfg.item_id].to_numpy()), encoded_items):
        raise DataError("the encoded training positives do not line up with the raw ones; cannot order histories by time")
    return raw[cfg.timestamp].to_numpy()
