"""train.aliccp: the real Ali-CCP raw format, on a tiny sample written here."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from common.config import DataConfig
from common.errors import DataError
from train.aliccp import ABSENT, convert_aliccp, convert_split, parse_features
from train.data import prepare_data

SEP1, SEP2, SEP3 = "\x01", "\x02", "\x03"


def _features(pairs):
    return SEP1.join(f"{field}{SEP2}{fid}{SEP3}1.0" for field, fid in pairs)


def write_raw_sample(root, n_rows=25, seed=0, complete=False):
    """Tianchi's layout: {train,test}/sample_skeleton_*.csv and common_features_*.csv.

    Field 129 (geography) is left out unless complete=True, which also adds every field the
    stock merlin converter insists on.
    """
    rng = np.random.default_rng(seed)
    expected = {}
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        users = {}
        with open(root / split / f"common_features_{split}.csv", "w") as f:
            for u in range(5):
                key = f"{split}{u:030d}"
                fields = [("101", 1000 + u), ("109_14", 50 + u), ("109_14", 60 + u), ("110_14", 70), ("127_14", 80),
                          ("150_14", 90), ("121", 3), ("122", 2), ("124", 1 + u % 2), ("125", 4), ("127", 2),
                          ("128", 1)] + ([("129", 3), ("126", 1)] if complete else [])
                users[key] = 1000 + u
                f.write(f"{key},{len(fields)},{_features(fields)}\n")
        rows = []
        with open(root / split / f"sample_skeleton_{split}.csv", "w") as f:
            for i in range(n_rows):
                key = list(users)[i % 5]
                click = int(rng.random() < 0.3)
                conversion = int(click and rng.random() < 0.5)
                if i == 3:
                    click, conversion = 0, 1  # invalid in Ali-CCP: dropped
                fields = [("205", 500 + i), ("206", 20 + i % 3), ("207", 30 + i % 4), ("216", 40 + i % 2), ("301", 1)]
                if complete:
                    fields += [("210", 7), ("508", 1), ("509", 2), ("702", 3), ("853", 4)]
                f.write(f"{i},{click},{conversion},{key},{len(fields)},{_features(fields)}\n")
                if not (click == 0 and conversion == 1):
                    rows.append((users[key], 500 + i, click))
        expected[split] = rows
    return expected


def test_parse_features_keeps_wanted_fields_and_last_value():
    text = _features([("109_14", 5), ("109_14", 6), ("999", 1)])
    assert parse_features(text, {"109_14": "user_categories"}) == {"user_categories": 6}


def test_converter_keeps_every_valid_row(tmp_path):
    expected = write_raw_sample(tmp_path / "raw", n_rows=25)
    train, valid = convert_aliccp(tmp_path / "raw", DataConfig(source="aliccp", aliccp_dir="x"), tmp_path / "out")
    for frame, rows in ((train, expected["train"]), (valid, expected["test"])):
        assert len(frame) == len(rows) == 24  # 25 lines, one invalid
        assert list(zip(frame.user_id, frame.item_id, frame.click)) == rows
    assert (train.user_geography == ABSENT).all()  # absent field -> its own category, never null
    assert train.user_categories.iloc[0] == 60  # multi-valued field keeps its last value
    assert train.dtypes.unique().tolist() == [np.dtype("int64")]


def test_merlin_converter_drops_the_last_partial_chunk(tmp_path):
    """The stock merlin-models converter loses rows; ours (above) does not."""
    from merlin.datasets.ecommerce.aliccp.dataset import _convert_data

    write_raw_sample(tmp_path / "raw", n_rows=25, complete=True)
    _convert_data(str(tmp_path / "raw"), file_size=10, is_train=True, pickle_common_features=False, output_dir=str(tmp_path / "stock"))
    stock = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "stock" / "train").glob("*.parquet"))])
    # Chunks are written when the line number hits 10 and 20: lines 0-10 (less the invalid one)
    # and 11-20 make 10 + 10 rows; the 4 valid rows of lines 21-24 are never written.
    assert len(stock) == 20


def test_missing_files_and_bad_lines_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="sample_skeleton_train.csv is missing"):
        convert_split(tmp_path, "train", tmp_path / "o.parquet")
    write_raw_sample(tmp_path / "raw", n_rows=3)
    with open(tmp_path / "raw" / "train" / "sample_skeleton_train.csv", "a") as f:
        f.write("broken,line\n")
    with pytest.raises(DataError, match=r"sample_skeleton_train.csv:4: expected 6 comma-separated fields, got 2"):
        convert_split(tmp_path / "raw", "train", tmp_path / "o.parquet")


def test_pipeline_uses_the_real_files_through_config(tmp_path):
    write_raw_sample(tmp_path / "raw", n_rows=25)
    cfg = DataConfig(source="aliccp", aliccp_dir=str(tmp_path / "raw"), cold_users=0)  # every converted row stays in the splits
    paths = prepare_data(cfg, tmp_path / "data")
    assert len(pd.read_parquet(paths["train"])) == 24 and "truth" not in paths
    limited = prepare_data(dataclasses.replace(cfg, aliccp_max_rows=10), tmp_path / "data10")
    assert len(pd.read_parquet(limited["train"])) == 9
