"""The history input's index arithmetic (train.history), checked against a per-row loop, and the
compiled tower's pooling."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.ops.tower import NumpyTower, pool_mean, ragged_codes
from train.history import Ragged, latest_items, padded_inputs, previous_items


def _by_loop_previous(users, items, key, n):
    rows = []
    for i in range(len(users)):
        same = [j for j in range(len(users)) if users[j] == users[i] and (key[j], j) < (key[i], i)]
        same.sort(key=lambda j: (key[j], j))
        rows.append([items[j] for j in same][-n:] if n else [])
    return rows


def _rows(ragged: Ragged) -> list[list[int]]:
    return [ragged.values[ragged.offsets[i] : ragged.offsets[i + 1]].tolist() for i in range(len(ragged))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_previous_items_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 7, 60)
    items = rng.integers(100, 200, 60)
    key = rng.integers(0, 10, 60)  # ties: row order decides
    got = previous_items(users, items, key, 4)
    assert _rows(got) == _by_loop_previous(users, items, key, 4)


def test_previous_items_without_a_timestamp_is_row_order():
    users = np.array([5, 3, 5, 5, 3])
    items = np.array([10, 20, 30, 40, 50])
    assert _rows(previous_items(users, items, None, 2)) == [[], [], [10], [10, 30], [20]]


def test_latest_items_per_user_row():
    users = np.array([2, 0, 2, 2, 0, 2])
    items = np.array([1, 2, 3, 4, 5, 6])
    key = np.array([9, 1, 1, 5, 0, 7])
    # user 0: by time 5 (t0), 2 (t1); user 1: none; user 2: 3 (t1), 4 (t5), 6 (t7), 1 (t9)
    assert _rows(latest_items(users, items, key, 3, 4)) == [[5, 2], [], [4, 6, 1], []]


def test_ragged_take_slice_padded():
    r = Ragged.from_lengths(np.array([1, 2, 3, 4, 5, 6]), np.array([2, 0, 3, 1]))
    assert _rows(r.take(np.array([3, 0, 0]))) == [[6], [1, 2], [1, 2]]
    assert _rows(r.slice(1, 3)) == [[], [3, 4, 5]]
    # the latest `width` of a longer row, values first then the pad
    np.testing.assert_array_equal(r.padded(2, -1), [[1, 2], [-1, -1], [4, 5], [6, -1]])


def test_pool_mean_ignores_padding_and_unknown_codes():
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    codes = np.array([[3, 5, 0], [2, 1, 0], [9, 9, 4]])
    pooled = pool_mean(table, codes)
    np.testing.assert_allclose(pooled[0], (table[3] + table[5]) / 2)
    np.testing.assert_array_equal(pooled[1], np.zeros(3))  # nothing known: zeros
    np.testing.assert_allclose(pooled[2], (2 * table[9] + table[4]) / 3)
    values, offsets = ragged_codes(codes)
    assert values.tolist() == [3, 5, 9, 9, 4] and offsets.tolist() == [0, 2, 2, 5]


def test_numpy_tower_pools_a_list_feature_and_is_batch_invariant():
    rng = np.random.default_rng(0)
    arrays = {
        "features": np.array(["user_id", "history_item_ids"]), "pooled": np.array(["history_item_ids"]),
        "table_user_id": rng.normal(size=(6, 4)).astype(np.float32),
        "table_history_item_ids": rng.normal(size=(12, 4)).astype(np.float32),
        "kernel_0": rng.normal(size=(8, 5)).astype(np.float32), "bias_0": np.zeros(5, np.float32),
        "activations": np.array(["linear"]), "l2_norm": np.array(True),
    }
    tower = NumpyTower(arrays)
    users = np.array([3, 4, 5])
    history = Ragged.from_lengths(np.array([3, 7, 11, 4]), np.array([2, 0, 2]))
    inputs = padded_inputs({"user_id": users, "history_item_ids": history}, 5)
    together = tower.embed(inputs)
    for i in range(3):
        alone = tower.embed({k: v[i : i + 1] for k, v in inputs.items()})
        np.testing.assert_array_equal(alone[0], together[i])
    # order within a history does not matter (a mean), a different item does
    swapped = tower.embed({"user_id": users[:1], "history_item_ids": np.array([[7, 3, 0, 0, 0]])})
    np.testing.assert_allclose(swapped[0], together[0], atol=1e-6)
    assert np.abs(tower.embed({"user_id": users[:1], "history_item_ids": np.array([[8, 3]])})[0] - together[0]).max() > 1e-3
