"""A user's recent interactions as fixed-width rows: the stored history, the request's, the two merged.

A history row holds raw item ids, oldest first, padded at the end with HISTORY_PAD. Everything here
is vectorized over the rows (no Python loop per user): the feature stores, the lookup and the tests
share it.
"""

from __future__ import annotations

import numpy as np

from common.contract import HISTORY_PAD


def rows_from_ragged(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Ragged lists -> fixed-width rows holding the last `width` ids of each list.

    Args:
        values: [v] int64, every list's ids one after the other.
        starts: [n] where each row's list begins in `values`.
        lengths: [n] how many ids it has.
        width: the row width N (the latest N are kept).

    Returns:
        [n, width] int64, oldest first, padded at the end with HISTORY_PAD.
    """
    starts = np.asarray(starts, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    padded = np.append(np.asarray(values, np.int64).reshape(-1), np.int64(HISTORY_PAD))
    keep = np.minimum(lengths, width)
    first = starts + lengths - keep
    cols = np.arange(width, dtype=np.int64)
    take = cols < keep[:, None]
    # Positions outside a row's kept ids point at the pad appended above.
    return padded[np.where(take, first[:, None] + cols, len(padded) - 1)]


def keep_latest(ids: np.ndarray, width: int) -> np.ndarray:
    """[n, m] ids (HISTORY_PAD anywhere) -> [n, width]: each row's last `width` ids that are not
    padding, in their order, padded at the end."""
    ids = np.asarray(ids, np.int64)
    ids = ids.reshape(len(ids), -1)
    valid = ids != HISTORY_PAD
    lengths = valid.sum(axis=1)
    return rows_from_ragged(ids[valid], np.cumsum(lengths) - lengths, lengths, width)


def append_sent(stored: np.ndarray, sent: np.ndarray | None) -> np.ndarray:
    """The stored history followed by the request's ids (the most recent), padding left where it is.

    Args:
        stored: [n, s] raw item ids from the feature store, oldest first.
        sent: [n, m] raw item ids from the request, oldest first (None: none sent).

    Returns:
        [n, s + m] int64; `keep_latest` then keeps a row's latest N (the transform does, once it
        knows which ids the model has).
    """
    stored = np.asarray(stored, np.int64)
    stored = stored.reshape(len(stored), -1)
    if sent is None:
        return stored
    return np.concatenate([stored, np.asarray(sent, np.int64).reshape(len(stored), -1)], axis=1)
