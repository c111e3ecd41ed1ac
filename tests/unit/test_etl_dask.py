"""train.etl on a real Dask cluster (2 local worker processes) gives the same output as without."""

import dataclasses

import pandas as pd
import pytest

from train import etl

pytestmark = pytest.mark.slow


def _tables(out):
    frames = {name: etl.read_encoded(out / name) for name in (etl.TRAIN_DIR, etl.VALID_DIR)}
    for name in (etl.USERS_ENCODED, etl.ITEMS_ENCODED, etl.USERS_RAW, etl.ITEMS_RAW):
        frames[name] = pd.read_parquet(out / name)
    return {k: v.sort_values(list(v.columns)).reset_index(drop=True) for k, v in frames.items()}


@pytest.fixture(scope="module")
def single(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("etl_single")
    data = trained["work"] / "data"
    result = etl.run_etl(trained["cfg"].data, data / "train.parquet", data / "valid.parquet", out)
    assert result.workers == 0
    return _tables(out)


def test_a_local_two_worker_cluster_gives_the_same_output(trained, single, tmp_path):
    cfg = dataclasses.replace(trained["cfg"].data, dask_scheduler="local:2")
    data = trained["work"] / "data"
    result = etl.run_etl(cfg, data / "train.parquet", data / "valid.parquet", tmp_path / "out")
    assert result.workers == 2
    for name, frame in _tables(tmp_path / "out").items():
        pd.testing.assert_frame_equal(frame, single[name], check_dtype=True, obj=name)


def test_a_scheduler_address_is_used(trained, single, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cfg = dataclasses.replace(trained["cfg"].data, dask_scheduler=cluster.scheduler_address)
        data = trained["work"] / "data"
        result = etl.run_etl(cfg, data / "train.parquet", data / "valid.parquet", tmp_path / "out")
    assert result.workers == 2
    pd.testing.assert_frame_equal(_tables(tmp_path / "out")[etl.TRAIN_DIR], single[etl.TRAIN_DIR])
