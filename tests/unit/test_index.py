"""train.index: Flat equals numpy; approximate indexes reach a stated recall; the floor holds."""

import dataclasses

import numpy as np
import pytest

from common.config import IndexConfig
from common.errors import IndexQualityError
from train.index import build_checked_index, build_index, exact_top_k, factory_string, recall_against_exact


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(4000, 16)).astype(np.float32)
    queries = rng.normal(size=(200, 16)).astype(np.float32)
    return items, queries


def test_flat_equals_numpy_argsort(vectors):
    items, queries = vectors
    index = build_index(items, IndexConfig(kind="flat"))
    scores, rows = index.search(queries, 10)
    exact = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    np.testing.assert_array_equal(rows, exact)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, exact, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(exact_top_k(queries, items, 10), exact)


@pytest.mark.parametrize("cfg", [IndexConfig(kind="ivf", nlist=64, nprobe=32), IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64)])
def test_approximate_indexes_reach_their_recall(vectors, cfg):
    items, queries = vectors
    index = build_index(items, cfg)
    assert recall_against_exact(index, queries, items, 10) >= 0.95  # the default floor


def test_ivf_cells_are_capped_by_catalogue_size():
    assert factory_string(IndexConfig(kind="ivf", nlist=1024), 3900) == "IVF100,Flat"
    assert factory_string(IndexConfig(kind="hnsw", hnsw_m=8), 10) == "HNSW8,Flat"


def test_recall_floor_fails_the_build(vectors):
    items, queries = vectors
    cfg = IndexConfig(kind="ivf", nlist=64, nprobe=1, min_recall_at_10=0.99)
    with pytest.raises(IndexQualityError, match=r"IVF64,Flat has recall@10 0\.\d+ .* below the floor index\.min_recall_at_10=0\.99"):
        build_checked_index(items, queries, cfg)
    _, report = build_checked_index(items, queries, dataclasses.replace(cfg, kind="flat"))
    assert report.recall_at_10 == 1.0 and report.n_items == 4000
