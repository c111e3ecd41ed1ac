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
    assert _rows(r.emptied(np.array([False, True, True, False]))) == [[1, 2], [], [], [6]]


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


def test_history_tower_shares_the_item_id_table(hist_trained):
    """The history pools over the item tower's own id embedding: one variable for both towers."""
    from merlin.models.tf.inputs.embedding import EmbeddingTable

    from common import contract

    model = hist_trained["run"].model

    def tables(encoder):
        found, stack = {}, [encoder.blocks[0]]
        while stack:
            layer = stack.pop()
            if isinstance(layer, EmbeddingTable):
                found[layer.name] = layer
            parallel = getattr(layer, "parallel_layers", None)
            stack.extend(parallel.values() if isinstance(parallel, dict) else getattr(layer, "layers", None) or [])
        return found

    history = tables(model.query_encoder)[contract.INPUT_HISTORY]
    item_id = tables(model.candidate_encoder)["item_id"]
    assert history.table is item_id.table
    assert history.sequence_combiner == "mean"


def test_exported_history_is_each_users_latest_training_positives(hist_trained):
    """user_features.parquet's list column: the latest 5 training positives, raw ids, oldest first
    (the tiny data has no timestamp, so row order is the order)."""
    import pandas as pd

    from common import contract

    cfg = hist_trained["cfg"].data
    raw = pd.read_parquet(hist_trained["work"] / "data" / "train.parquet")
    positives = raw[cfg.is_positive(raw[cfg.label])]
    table = pd.read_parquet(hist_trained["artifacts"] / contract.ARTIFACT_USER_FEATURES)
    catalogue = set(pd.read_parquet(hist_trained["artifacts"] / contract.ARTIFACT_ITEM_FEATURES)[cfg.item_id])
    by_user = positives.groupby(cfg.user_id)[cfg.item_id].apply(list)
    checked = 0
    for user, history in zip(table[cfg.user_id], table[contract.INPUT_HISTORY]):
        expected = [i for i in by_user.get(user, []) if i in catalogue][-5:]
        assert list(history) == expected, user
        checked += len(expected) > 0
    assert checked > 100


def test_training_rows_carry_only_earlier_positives_of_the_same_user(hist_trained, tmp_path):
    import dataclasses
    import shutil

    import pandas as pd

    from common import contract
    from train import etl
    from train.fit import prepare_training_rows

    etl_dir = tmp_path / "etl"
    shutil.copytree(hist_trained["work"] / "etl", etl_dir)
    cfg = dataclasses.replace(hist_trained["cfg"].train, mask_history=0.3, mask_user_id=0.2)
    original = etl.read_encoded(etl_dir / etl.TRAIN_DIR)  # unmasked user ids, same row order
    prepared = pd.read_parquet(prepare_training_rows(etl_dir, hist_trained["cfg"].data, cfg))
    assert len(prepared) == len(original)
    seen: dict[int, list[int]] = {}
    emptied = with_earlier = 0
    for user, item, history in zip(original.user_id, original.item_id, prepared[contract.INPUT_HISTORY]):
        earlier = seen.get(user, [])[-5:]
        assert list(history) in (earlier, [])  # train.mask_history empties some; masked ids keep theirs
        with_earlier += len(earlier) > 0
        emptied += len(earlier) > 0 and len(history) == 0
        seen.setdefault(user, []).append(item)
    assert abs(emptied / with_earlier - 0.3) < 0.03


def test_compiled_history_tower_matches_tensorflow(hist_trained):
    import json

    from common import contract

    manifest = json.loads((hist_trained["artifacts"] / contract.MANIFEST).read_text())
    assert manifest["tower"]["compiled_max_abs_error"] < 1e-5
    with np.load(hist_trained["artifacts"] / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        assert list(arrays["pooled"]) == [contract.INPUT_HISTORY]
        assert contract.INPUT_HISTORY in list(arrays["features"])
    assert contract.INPUT_HISTORY in manifest["tensors"]["inputs"]


def test_only_the_history_pools_and_new_user_rows_match_tensorflow(trained, hist_trained):
    """merlin gives every table sequence_combiner="mean"; only the list column may pool, or the
    missing (1) and unseen (2) codes of a new user would pool to zeros instead of their trained rows."""
    import tensorflow as tf

    from common import contract

    for run, pooled in ((trained, []), (hist_trained, [contract.INPUT_HISTORY])):
        with np.load(run["artifacts"] / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
            tower = NumpyTower({k: arrays[k] for k in arrays.files})
        assert sorted(tower.pooled) == pooled
        features = [f for f in tower.features if f not in tower.pooled]
        new_users = {f: np.array([1, 2, 1], np.int32) for f in features}
        tf_inputs = {f: tf.constant(v) for f, v in new_users.items()}
        if pooled:
            new_users[contract.INPUT_HISTORY] = np.zeros((3, 5), np.int64)
            tf_inputs[contract.INPUT_HISTORY] = tf.RaggedTensor.from_row_lengths(tf.zeros(0, tf.int32), tf.constant([0, 0, 0]))
        expected = run["run"].model.query_encoder(tf_inputs, training=False).numpy()
        np.testing.assert_allclose(tower.embed(new_users), expected, atol=1e-5)


def test_training_histories_follow_the_timestamp_and_refuse_a_misaligned_split(hist_trained, tmp_path):
    """With data.timestamp, a row's history is the user's positives at earlier times, whatever the
    rows' order in the file; raw positives that no longer line up with the encoded ones are an error."""
    import dataclasses
    import shutil

    import pandas as pd

    from common import contract
    from common.errors import DataError
    from train import etl
    from train.fit import prepare_training_rows

    work = tmp_path / "work"
    shutil.copytree(hist_trained["work"], work)
    data_cfg = dataclasses.replace(hist_trained["cfg"].data, timestamp="ts")
    raw = pd.read_parquet(work / "data" / "train.parquet")
    raw["ts"] = np.random.default_rng(3).permutation(len(raw))  # time is not the row order
    raw.to_parquet(work / "data" / "train.parquet", index=False)
    cfg = dataclasses.replace(hist_trained["cfg"].train, mask_user_id=0.0, mask_features=0.0)
    prepared = pd.read_parquet(prepare_training_rows(work / "etl", data_cfg, cfg))
    encoded = etl.read_encoded(work / "etl" / etl.TRAIN_DIR)
    times = raw.loc[data_cfg.is_positive(raw[data_cfg.label]), "ts"].to_numpy()
    for row in np.random.default_rng(0).choice(len(encoded), 200, replace=False):
        user = encoded.user_id[row]
        earlier = np.flatnonzero((encoded.user_id.to_numpy() == user) & (times < times[row]))
        expected = encoded.item_id.to_numpy()[earlier[np.argsort(times[earlier])]][-5:].tolist()
        assert list(prepared[contract.INPUT_HISTORY][row]) == expected

    first_positive = int(np.flatnonzero(data_cfg.is_positive(raw[data_cfg.label]))[0])
    raw.drop(index=first_positive).to_parquet(work / "data" / "train.parquet", index=False)  # one raw positive lost
    with pytest.raises(DataError, match="^the encoded training positives do not line up with the raw ones; cannot order histories by time$"):
        prepare_training_rows(work / "etl", data_cfg, cfg)
