"""train.etl: the seed's workflow without its Filter, positives only, servable user part."""

import copy

import nvtabular as nvt
import numpy as np
import pandas as pd
import pytest
from merlin.dag import postorder_iter_nodes
from merlin.schema import Tags
from nvtabular import ops

from common import contract
from train import etl


@pytest.fixture(scope="module")
def etl_dir(trained):
    return trained["work"] / "etl"


@pytest.fixture(scope="module")
def workflow(etl_dir):
    return nvt.Workflow.load(str(etl_dir / contract.ARTIFACT_WORKFLOW))


def test_saved_workflow_has_no_filter_and_tags_both_sides(workflow):
    names = {type(n.op).__name__ for n in postorder_iter_nodes(workflow.output_node)}
    assert "Filter" not in names and "Categorify" in names
    schema = workflow.output_schema
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    assert len(schema.select_by_tag(Tags.USER).column_names) == 12  # id + 11 features
    assert len(schema.select_by_tag(Tags.ITEM).column_names) == 4  # id + 3 features


def test_outputs_hold_positives_only(etl_dir, trained):
    raw = pd.read_parquet(trained["work"] / "data" / "train.parquet")
    encoded = etl.read_encoded(etl_dir / etl.TRAIN_DIR)
    assert (encoded.click == 1).all()
    assert len(encoded) == int((raw.click == 1).sum())


def test_categorify_is_fitted_on_training_only(workflow, trained, tiny_cfg):
    raw_train = pd.read_parquet(trained["work"] / "data" / "train.parquet")
    frame = raw_train.head(3).copy()
    frame.loc[0, "item_id"] = raw_train.item_id.max() + 12345  # never seen in training
    out = workflow._transform_df(frame)
    assert out.item_id.iloc[0] == 2  # NVTabular's out-of-vocabulary index
    assert (out.item_id.iloc[1:] >= 3).all()  # known ids start after pad, null and OOV


def test_user_workflow_serves_raw_user_columns(workflow, trained, tiny_cfg):
    part = etl.user_workflow(workflow, tiny_cfg.data)
    assert part.input_schema.column_names == list(tiny_cfg.data.user_columns)
    raw = pd.read_parquet(trained["work"] / "data" / "train.parquet").head(50)
    full = workflow._transform_df(raw)
    user = part._transform_df(raw[list(tiny_cfg.data.user_columns)])
    for col in tiny_cfg.data.user_columns:
        np.testing.assert_array_equal(user[col].to_numpy(), full[col].to_numpy())


def test_remove_inputs_edits_in_place_so_we_copy(workflow, tiny_cfg):
    """Stock `Workflow.remove_inputs` mutates the workflow it is called on."""
    before = list(workflow.input_schema.column_names)
    etl.user_workflow(workflow, tiny_cfg.data)
    etl.item_workflow(workflow, tiny_cfg.data)
    assert workflow.input_schema.column_names == before
    stock = copy.deepcopy(workflow)
    stock.remove_inputs(["click"])
    assert "click" not in stock.input_schema.column_names


def test_a_filter_on_the_label_cannot_serve_a_request(trained, tiny_cfg):
    """Why the saved workflow has no Filter: a request carries no label."""
    raw = pd.read_parquet(trained["work"] / "data" / "train.parquet")
    cols = list(tiny_cfg.data.user_columns)
    with_filter = nvt.Workflow((cols + ["click"]) >> ops.Filter(f=lambda df: df["click"] == 1))
    with_filter.fit(nvt.Dataset(raw.head(100)))
    with pytest.raises(KeyError, match="click"):
        with_filter.remove_inputs(["click"])._transform_df(raw[cols].head(5))


def test_entity_tables_are_row_aligned(etl_dir, tiny_cfg):
    users_raw = pd.read_parquet(etl_dir / etl.USERS_RAW)
    users_enc = pd.read_parquet(etl_dir / etl.USERS_ENCODED)
    assert len(users_raw) == len(users_enc) == users_raw.user_id.nunique()
    assert users_raw.user_id.is_monotonic_increasing
    items_enc = pd.read_parquet(etl_dir / etl.ITEMS_ENCODED)
    assert items_enc.item_id.is_unique and (items_enc.item_id >= 3).all()


def test_etl_writes_only_where_it_is_told(trained, tiny_cfg, tmp_path, monkeypatch):
    """NVTabular's Categorify writes ./categories by default; ours goes to the output folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = trained["work"] / "data"
    etl.run_etl(tiny_cfg.data, data / "train.parquet", data / "valid.parquet", tmp_path / "out")
    assert list(cwd.iterdir()) == []


def test_each_split_is_categorified_once_after_the_fit(trained, tmp_path, monkeypatch, tiny_cfg):
    """The positives filter once ran as a second workflow whose fit_transform encoded each split twice."""
    seen = []
    original = ops.Categorify.transform

    def counting(self, col_selector, df):
        seen.append(len(df))
        return original(self, col_selector, df)

    monkeypatch.setattr(ops.Categorify, "transform", counting)
    data = trained["work"] / "data"
    result = etl.run_etl(tiny_cfg.data, data / "train.parquet", data / "valid.parquet", tmp_path)
    n_train, n_valid = len(pd.read_parquet(data / "train.parquet")), len(pd.read_parquet(data / "valid.parquet"))
    n_categorify = 4  # user id, item id, user features, item features
    # the training split: once while fitting, once encoding; the validation split: once
    assert seen.count(n_valid) == n_categorify and seen.count(n_train) == 2 * n_categorify
    assert result.input_rows == n_train + n_valid
    pd.testing.assert_frame_equal(etl.read_encoded(tmp_path / etl.TRAIN_DIR), etl.read_encoded(trained["work"] / "etl" / etl.TRAIN_DIR))


def test_seen_all_excludes_every_training_interaction_not_only_positives(trained, tiny_cfg):
    import dataclasses

    from train.fit import load_tables

    etl_dir = trained["work"] / "etl"
    positives_only = load_tables(etl_dir, tiny_cfg.data)
    everything = load_tables(etl_dir, dataclasses.replace(tiny_cfg.data, seen="all"))
    raw = pd.read_parquet(trained["work"] / "data" / "train.parquet")
    assert positives_only.seen_pairs is None
    assert len(everything.seen_pairs[0]) == len(raw)  # every training row's user and item are in the tables
    a, b = positives_only.eval_set(), everything.eval_set()
    np.testing.assert_array_equal(a.user_rows, b.user_rows)
    assert b.seen.nnz > a.seen.nnz and (a.seen.multiply(b.seen) != 0).sum() == a.seen.nnz  # a superset
