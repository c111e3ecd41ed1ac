"""train.data: the synthetic generator carries signal; splits lose nothing."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from common.config import ALICCP_ITEM_FEATURES, ALICCP_USER_FEATURES, DataConfig
from common.errors import DataError
from train.data import Truth, check_columns, generate_merlin, generate_synthetic, prepare_data, split_per_user

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
    assert match[clicked].mean() > 1.5 * match[~clicked].mean()


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


def test_split_per_user_loses_nothing_and_keeps_users(synthetic):
    df, _ = synthetic
    train, valid = split_per_user(df, CFG)
    assert len(train) + len(valid) == len(df)
    assert set(valid.user_id) <= set(train.user_id)
    assert abs(len(valid) / len(df) - CFG.valid_fraction) < 0.03
    merged = pd.concat([train, valid]).sort_values(list(df.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, df.sort_values(list(df.columns)).reset_index(drop=True))


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
    assert set(paths) == {"train", "valid", "truth"}
    assert len(pd.read_parquet(paths["train"])) + len(pd.read_parquet(paths["valid"])) == CFG.num_impressions
