"""Cold start: users kept out of training, masked training rows, and the segment baseline."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from nvtabular.ops.categorify import NULL_OFFSET, OOV_OFFSET

from common import contract
from common.config import DataConfig, EvalConfig, TrainConfig
from common.errors import ConfigError
from train import etl
from train.coldstart import load_cold_users, segment_popularity_scorer
from train.data import COLD_FILE, remove_cold_users
from train.fit import prepare_training_rows


def test_cold_users_leave_both_splits_with_every_interaction():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user_id": rng.integers(1, 101, 3000), "item_id": rng.integers(1, 50, 3000), "click": rng.integers(0, 2, 3000)})
    train, valid = frame.iloc[:2400], frame.iloc[2400:]
    cfg = DataConfig(user_features=(), item_features=(), cold_users=7, seed=5)
    new_train, new_valid, cold = remove_cold_users(train, valid, cfg)
    users = set(cold.user_id)
    assert len(users) == 7
    assert not users & set(new_train.user_id) and not users & set(new_valid.user_id)
    assert len(new_train) + len(new_valid) + len(cold) == len(frame)
    # at most a fifth of the users with a positive
    assert remove_cold_users(train, valid, DataConfig(user_features=(), item_features=(), cold_users=500))[2].user_id.nunique() == 20


def test_the_tiny_run_keeps_its_cold_users_out_and_serves_them_as_unknown(trained, tiny_cfg):
    work = trained["work"]
    cold = pd.read_parquet(work / "data" / COLD_FILE)
    warm = pd.read_parquet(work / "etl" / etl.USERS_RAW)
    assert cold.user_id.nunique() == 80 and not set(cold.user_id) & set(warm.user_id)
    users = load_cold_users(work / "data" / COLD_FILE, work / "etl", tiny_cfg.data)
    assert (users.encoded["user_id"] == OOV_OFFSET).all()  # an id training never saw
    assert users.data.n_users == 80
    report = json.loads((trained["artifacts"] / contract.ARTIFACT_METRICS).read_text())["cold_start"]
    assert set(report["methods"]) == {"two_tower", "popular", "popular_in_segment"}
    assert report["n_users"] == 80 and len(report["per_seed"]["two_tower"]) == tiny_cfg.eval.seeds
    assert report["comparisons"]["popular_in_segment"]["recall@10"]["verdict"] in ("BEATS", "TIES", "LOSES TO")


def test_masking_trains_the_unknown_and_missing_rows(trained, tiny_cfg, tmp_path):
    import shutil

    etl_dir = tmp_path / "etl"
    shutil.copytree(trained["work"] / "etl", etl_dir)
    original = etl.read_encoded(etl_dir / etl.TRAIN_DIR)
    # Nothing in the encoded training data uses the null or unknown codes on its own.
    assert (original[["user_id", *tiny_cfg.data.user_features]].to_numpy() > OOV_OFFSET).all()
    cfg = TrainConfig(mask_user_id=0.3, mask_features=0.1, seed=1)
    masked = etl.read_encoded(prepare_training_rows(etl_dir, tiny_cfg.data, cfg))
    assert len(masked) == len(original)
    assert abs((masked.user_id == OOV_OFFSET).mean() - 0.3) < 0.03
    for name in tiny_cfg.data.user_features:
        assert abs((masked[name] == NULL_OFFSET).mean() - 0.1) < 0.02, name
        assert abs((masked[name] == OOV_OFFSET).mean() - 0.1) < 0.02, name
    kept = masked.user_id != OOV_OFFSET
    assert (masked.user_id[kept] == original.user_id[kept]).all()
    pd.testing.assert_frame_equal(masked[["item_id", "click"]], original[["item_id", "click"]])
    off = TrainConfig(mask_user_id=0.0, mask_features=0.0, history_length=0)
    assert prepare_training_rows(etl_dir, tiny_cfg.data, off) == etl_dir / etl.TRAIN_DIR


def test_segment_popularity_by_hand():
    # 4 warm users, 3 items; segments by gender and age decade.
    counts = sp.csr_matrix(np.array([[5, 0, 1], [4, 0, 0], [0, 3, 0], [0, 2, 1]], dtype=np.float32))
    warm = pd.DataFrame({"gender": [1, 1, 2, 2], "age": [23, 27, 41, 45]})
    cold = pd.DataFrame({"gender": [2, 1, 1], "age": [48, 21, 60]})
    scores = segment_popularity_scorer(counts, warm, cold, ("gender", "age/10"))(np.arange(3))
    assert np.argsort(-scores[0]).tolist()[0] == 1  # women in their forties liked item 1
    assert np.argsort(-scores[1]).tolist()[0] == 0  # men in their twenties liked item 0
    # a man in his sixties: nobody of his segment trained, so the overall ranking (items 0, 1, 2: 9, 5, 2)
    assert np.argsort(-scores[2]).tolist() == [0, 1, 2]


def test_too_many_segments_is_a_clear_error(monkeypatch):
    import train.coldstart as coldstart

    monkeypatch.setattr(coldstart, "MAX_SEGMENT_SCORES", 20)
    counts = sp.csr_matrix(np.ones((3, 10), dtype=np.float32))
    warm = pd.DataFrame({"zip": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"^eval.segment \['zip'\] makes 3 segments: too many for a popularity table over 10 items"):
        segment_popularity_scorer(counts, warm, warm, ("zip",))


@pytest.mark.parametrize("entry", ["age/0", "age/x", "/10"])
def test_segment_entries_are_checked(entry):
    with pytest.raises(ConfigError, match=r"^eval.segment entries are a feature name or name/width \(width >= 1\), got "):
        EvalConfig(segment=(entry,))
