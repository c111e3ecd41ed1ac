"""train.declared: any dataset declared in the config runs through the whole pipeline."""

import json

import numpy as np
import pandas as pd
import pytest

from common.config import DataConfig, load_config
from common.errors import DataError
from train.data import split_holdout
from train.declared import ABSENT, load_declared


def write_dataset(root, n_users=120, n_items=60, seed=0):
    """A shop with its own column names: interactions in CSV, customers in parquet, products in CSV."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    segment = rng.choice(["gold", "silver", "bronze"], n_users)
    customers = pd.DataFrame({"customer": np.arange(1, n_users + 1), "segment": segment, "region": rng.integers(1, 5, n_users)})
    customers.loc[3, "segment"] = None  # an empty cell
    customers.to_parquet(root / "customers.parquet", index=False)
    products = pd.DataFrame({"product": np.arange(100, 100 + n_items), "aisle": rng.integers(1, 8, n_items)})
    products.to_csv(root / "products.csv", index=False)
    rows = []
    for c in range(1, n_users + 1):
        liked = rng.choice(n_items, 12, replace=False)
        for t, p in enumerate(liked):
            rows.append((c, 100 + int(p), float(rng.integers(1, 6)), 1_600_000_000 + 3600 * t + c))
    pd.DataFrame(rows, columns=["customer", "product", "stars", "ts"]).to_csv(root / "orders.csv", index=False)
    return root


def declared_cfg(root, **extra):
    return DataConfig(
        source="files", interactions=str(root / "orders.csv"), users_table=str(root / "customers.parquet"),
        items_table=str(root / "products.csv"), timestamp="ts", user_id="customer", item_id="product",
        user_features=("segment", "region"), item_features=("aisle",), label="stars", positive_min=4, **extra,
    )


def test_load_joins_tables_and_maps_text(tmp_path):
    root = write_dataset(tmp_path / "shop")
    df = load_declared(declared_cfg(root), tmp_path / "out")
    assert list(df.columns) == ["customer", "product", "segment", "region", "aisle", "stars", "ts"]
    vocab = json.loads((tmp_path / "out" / "vocabularies.json").read_text())
    assert vocab == {"segment": {"bronze": 1, "gold": 2, "silver": 3}}
    assert (df[df.customer == 4].segment == ABSENT).all()  # the empty cell
    assert df.dtypes[["customer", "product", "segment", "region", "aisle"]].tolist() == [np.dtype("int64")] * 5


def test_split_by_time_holds_out_each_users_latest(tmp_path):
    root = write_dataset(tmp_path / "shop")
    cfg = declared_cfg(root)
    train, valid = split_holdout(load_declared(cfg, tmp_path / "out"), cfg)
    last_train = train.groupby("customer").ts.max()
    first_valid = valid.groupby("customer").ts.min()
    assert (first_valid > last_train.loc[first_valid.index]).all()
    assert len(valid) == 120 * 2  # 12 per user: ceil(12 * 0.8) = 10 stay in training, the latest 2 are held out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: (r / "orders.csv").unlink(), "orders.csv does not exist"),
        (lambda r: pd.read_csv(r / "orders.csv").assign(customer=lambda d: "c" + d.customer.astype(str)).to_csv(r / "orders.csv", index=False),
         "customer must hold integers"),
        (lambda r: pd.read_parquet(r / "customers.parquet").drop(columns="region").to_parquet(r / "customers.parquet"),
         r"user table .* lacks the declared columns \['region'\]"),
        (lambda r: pd.concat([pd.read_csv(r / "products.csv")] * 2).to_csv(r / "products.csv", index=False),
         "repeated product values"),
        (lambda r: pd.read_csv(r / "orders.csv").assign(stars="five").to_csv(r / "orders.csv", index=False), "label stars must be numeric"),
    ],
)
def test_declared_data_errors_are_clear(tmp_path, change, message):
    root = write_dataset(tmp_path / "shop")
    change(root)
    with pytest.raises(DataError, match=message):
        load_declared(declared_cfg(root), tmp_path / "out")


def test_a_declared_dataset_runs_through_training_export_and_serving(tmp_path):
    """Other column names, CSV + parquet, ratings as labels, split by time: no code change."""
    from common import contract
    from ensemble.build import build_repository
    from ensemble.loader import load_model_in_process
    from train.pipeline import run_training

    root = write_dataset(tmp_path / "shop")
    cfg = load_config(environ={}, overrides=["train.epochs=2", "train.batch_size=128", "train.eval_ks=[10]",
                                              "train.query_mlp=[16,8]", "train.item_mlp=[16,8]", "index.recall_sample=50"])
    import dataclasses

    cfg = dataclasses.replace(cfg, data=declared_cfg(root))
    run = run_training(cfg, tmp_path / "work", tmp_path / "artifacts")
    assert set(run.report["methods"]) == {"two_tower", "random", "popular", "als"}  # no oracle for real data
    assert (tmp_path / "artifacts" / "vocabularies.json").is_file()
    repo = build_repository(tmp_path / "artifacts", tmp_path / "repo")
    executor = load_model_in_process(repo)
    assert executor.limits.user_features == ("segment", "region")
    answer = executor.execute([({contract.INPUT_USER_ID: np.array([[5], [10**6]], np.int64),
                                 "segment": np.array([[-1], [2]], np.int64)}, {"top_k": 4})])[0]
    assert answer[contract.OUTPUT_ITEM_IDS].shape == (2, 4) and answer[contract.OUTPUT_UNKNOWN].ravel().tolist() == [False, True]
    assert np.isin(answer[contract.OUTPUT_ITEM_IDS], np.arange(100, 160)).all()
