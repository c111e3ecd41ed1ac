"""train.data: the synthetic generator carries signal; splits lose nothing."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from common.config import ALICCP_ITEM_FEATURES, ALICCP_USER_FEATURES, DataConfig
from common.errors import ConfigError, DataError
from train.data import Truth, check_columns, draw_impressions, generate_merlin, generate_synthetic, prepare_data, split_holdout

CFG = DataConfig(num_users=300, num_items=200, num_impressions=20_000, latent_dim=8, seed=3)


@pytest.fixture(scope="module")
def synthetic():
    return generate_synthetic(CFG)


def test_columns_and_dtypes_are_aliccp_shaped(synthetic):
    df, _ = synthetic
    assert list(df.columns) == ["user_id", *ALICCP_USER_FEATURES, "item_id", *ALICCP_ITEM_FEATURES, "click"]
    assert all(df[c].dtype == np.int32 for c in df.columns if c != "click")
    assert df["click"].dtype == np.int64 and set(df["click"].unique()) <= {0, 1}
    assert len(df) == CFG.num_impressions


def test_same_seed_same_data_other_seed_other_data(synthetic):
    df, _ = synthetic
    again, _ = generate_synthetic(CFG)
    other, _ = generate_synthetic(dataclasses.replace(CFG, seed=4))
    pd.testing.assert_frame_equal(df, again)
    assert not df.equals(other)


def test_clicks_follow_the_hidden_affinity(synthetic):
    df, truth = synthetic
    u = np.searchsorted(truth.user_ids, df.user_id.to_numpy())
    i = np.searchsorted(truth.item_ids, df.item_id.to_numpy())
    affinity = np.einsum("nd,nd->n", truth.user_taste[u], truth.item_taste[i])
    clicked = df.click.to_numpy() == 1
    assert affinity[clicked].mean() > affinity[~clicked].mean() + 0.2


def test_user_features_say_what_users_click(synthetic):
    df, _ = synthetic
    match = df.item_category == df.user_categories
    clicked = df.click == 1
    # A user's favourite-category feature agrees with the clicked item's category much more often.
    assert match[clicked].mean() > 1.3 * match[~clicked].mean()  # 1.50x on this seed; 2.0x at the default size


def test_popularity_is_skewed(synthetic):
    df, _ = synthetic
    counts = df.item_id.value_counts().to_numpy()
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.3  # the top 10% of items get over 30% of impressions


def test_oracle_ranks_heldout_clicks_above_popularity(synthetic):
    df, truth = synthetic
    pos = df[df.click == 1]
    users = np.searchsorted(truth.user_ids, pos.user_id.to_numpy()[:500])
    items = np.searchsorted(truth.item_ids, pos.item_id.to_numpy()[:500])
    scores = truth.positive_log_prob(users)
    oracle_rank = (scores > scores[np.arange(len(users)), items][:, None]).sum(axis=1)
    popularity = truth.item_log_pop
    pop_rank = (popularity[None, :] > popularity[items][:, None]).sum(axis=1)
    assert np.median(oracle_rank) < 0.5 * np.median(pop_rank)


def test_truth_round_trip(tmp_path, synthetic):
    _, truth = synthetic
    truth.save(tmp_path / "t.npz")
    back = Truth.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.item_taste, truth.item_taste)
    assert back.affinity_scale == truth.affinity_scale


def test_split_loses_nothing_and_keeps_users(synthetic):
    df, _ = synthetic
    train, valid = split_holdout(df, CFG)
    assert len(train) + len(valid) == len(df)
    assert set(valid.user_id) <= set(train.user_id)
    assert abs(len(valid) / len(df) - CFG.valid_fraction) < 0.03
    merged = pd.concat([train, valid]).sort_values(list(df.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, df.sort_values(list(df.columns)).reset_index(drop=True))


def _ratings():
    # User 1: 10 rows, positives (>= 4) at times 1, 3, 5, 7, 9; user 2: one positive; user 3: 4 positives.
    rows = [(1, i, 4 if i % 2 else 2, i) for i in range(10)] + [(2, 50, 5, 1), (2, 51, 1, 2)] + [(3, 60 + i, 5, 10 - i) for i in range(4)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "ts"])


def test_positives_protocol_holds_out_the_latest_positives_at_least_one():
    cfg = DataConfig(source="files", interactions="x", user_features=(), item_features=(), label="rating", positive_min=4,
                     timestamp="ts", holdout="positives", holdout_min=1, valid_fraction=0.2)
    train, valid = split_holdout(_ratings(), cfg)
    assert (valid.rating >= 4).all()  # non-positives always train
    # user 1: 5 positives -> 1 held (the latest, t=9); user 2: 1 positive -> none; user 3: 4 -> at least 1 (t=10, row 60)
    assert sorted(map(tuple, valid[["user_id", "item_id"]].to_numpy())) == [(1, 9), (3, 60)]
    assert len(train) + len(valid) == len(_ratings())


def test_all_interactions_protocol_random_order_is_seeded_and_differs_from_time():
    base = dict(source="files", interactions="x", user_features=(), item_features=(), label="rating", positive_min=4,
                timestamp="ts", holdout_min=1, valid_fraction=0.3)
    by_time = split_holdout(_ratings(), DataConfig(**base, holdout_by="time"))[1]
    at_random = split_holdout(_ratings(), DataConfig(**base, holdout_by="random"))[1]
    again = split_holdout(_ratings(), DataConfig(**base, holdout_by="random"))[1]
    pd.testing.assert_frame_equal(at_random, again)
    assert set(by_time[by_time.user_id == 1].ts) == {7, 8, 9}  # floor(10 * 0.3) latest of all ten
    assert not by_time.equals(at_random)


def test_holdout_by_time_needs_a_timestamp():
    with pytest.raises(ConfigError, match=r"^data.holdout_by=time needs data.timestamp$"):
        DataConfig(holdout_by="time")


def test_impressions_favour_high_affinity_items(synthetic):
    _, truth = synthetic
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(50), 400)
    items = draw_impressions(truth, rows, rng)
    shown = np.einsum("nd,nd->n", truth.user_taste[rows], truth.item_taste[items])
    # Against items drawn by popularity alone (what the personalized channel draws candidates from).
    pop = np.exp(truth.item_log_pop - truth.item_log_pop.max())
    by_pop = rng.choice(len(pop), size=len(rows), p=pop / pop.sum())
    baseline = np.einsum("nd,nd->n", truth.user_taste[rows], truth.item_taste[by_pop])
    assert shown.mean() > baseline.mean() + 0.15


def test_generation_memory_does_not_grow_with_users_times_items():
    import tracemalloc

    cfg = DataConfig(num_users=20_000, num_items=200_000, num_impressions=50_000, seed=1)
    tracemalloc.start()
    try:
        df, _ = generate_synthetic(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(df) == 50_000
    # A users x items float32 matrix would be 16 GB; the generator holds O(users + items + impressions).
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_merlin_generator_has_the_same_columns():
    df = generate_merlin(dataclasses.replace(CFG, source="merlin", num_impressions=500))
    check_columns(df, CFG, "merlin data")
    assert len(df) == 500


def test_missing_declared_column_is_a_clear_error(synthetic):
    df, _ = synthetic
    with pytest.raises(DataError, match=r"train lacks the declared columns \['user_age'\]"):
        check_columns(df.drop(columns=["user_age"]), CFG, "train")


def test_prepare_data_writes_splits_and_truth(tmp_path):
    paths = prepare_data(CFG, tmp_path)
    assert set(paths) == {"train", "valid", "truth", "cold"}
    parts = [pd.read_parquet(paths[name]) for name in ("train", "valid", "cold")]
    assert sum(len(p) for p in parts) == CFG.num_impressions  # nothing lost
    everyone = pd.concat(parts)
    with_positive = everyone[everyone.click == 1].user_id.nunique()
    assert parts[2].user_id.nunique() == with_positive // 5  # the default 200 is capped at a fifth
    assert not set(parts[2].user_id) & (set(parts[0].user_id) | set(parts[1].user_id))


@pytest.mark.parametrize("n, exponent", [(50, 0.7), (50, 1.0), (50, 0.0), (1000, 1.3)])
def test_popularity_draws_follow_the_zipf_weights(n, exponent):
    from train.data import _draw_ranks, zipf_log_weights

    ranks = _draw_ranks(np.random.default_rng(0), 1_000_000, n, exponent)
    share = np.bincount(ranks, minlength=n) / len(ranks)
    weights = np.exp(zipf_log_weights(np.arange(1, n + 1), exponent))
    np.testing.assert_allclose(share, weights / weights.sum(), atol=0.002)
