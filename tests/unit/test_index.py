"""train.index: Flat equals numpy; approximate indexes reach a stated recall; the floor holds."""

import dataclasses

import numpy as np
import pytest

from common.config import IndexConfig
from common.errors import ConfigError, IndexQualityError
from ensemble.ops.search import SearchItems, ivf_of
import faiss

from train.index import (build_checked_index, build_index, exact_top_k, factory_string, narrowest_probe, recall_against_exact,
                         recall_per_query, search_params, standard_error, training_sample, wider_probe)


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


@pytest.mark.parametrize("cfg", [IndexConfig(kind="ivf", nlist=64, nprobe=32), IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64),
                                 IndexConfig(kind="ivf_sq", sq_nlist=64, sq_nprobe=32, sq_type="SQfp16", add_chunk=1000)])
def test_approximate_indexes_reach_their_recall(vectors, cfg):
    items, queries = vectors
    index = build_index(items, cfg)
    assert recall_against_exact(index, queries, items, 10) >= 0.95  # the default floor


def test_ivf_cells_are_capped_by_catalogue_size():
    assert factory_string(IndexConfig(kind="ivf", nlist=1024), 3900, 64) == "IVF100,Flat"
    assert factory_string(IndexConfig(kind="hnsw", hnsw_m=8), 10, 64) == "HNSW8,Flat"
    assert factory_string(IndexConfig(kind="ivf_sq", sq_nlist=4096, sq_type="SQfp16"), 3900, 64) == "IVF100,SQfp16"
    auto_large = IndexConfig(flat_max_items=10, ivf_max_items=100, pq_nlist=16, pq_nprobe=8, pq_m=32)
    assert factory_string(auto_large, 1000, 64) == "IVF16,PQ32x4fsr,Refine(SQfp16)"


def test_auto_serves_the_seed_size_catalogue_with_ivf_pq_and_1024_cells():
    # 489,179: the seed-size preset's trained items; measured: IVF-PQ 0.12 ms a query, IVF-Flat 0.25, same recall
    assert [IndexConfig().resolved_kind(n) for n in (300_000, 300_001)] == ["ivf", "ivf_pq"]
    assert factory_string(IndexConfig(), 489_179, 64) == "IVF1024,PQ64x4fsr,Refine(SQfp16)"
    assert factory_string(IndexConfig(), 300_000, 64) == "IVF1024,Flat"


def test_ivf_pq_cells_and_codes_follow_the_catalogue_and_the_vector_size():
    cfg = IndexConfig(kind="ivf_pq")  # pq_nlist 0: the smallest power of two >= sqrt(n); pq_m 0: a code per dimension
    assert factory_string(cfg, 1_000_000, 64) == "IVF1024,PQ64x4fsr,Refine(SQfp16)"
    assert factory_string(cfg, 10_000_000, 64) == "IVF4096_HNSW32,PQ64x4fsr,Refine(SQfp16)"  # from 4,096 cells the cells are found in a graph
    assert factory_string(dataclasses.replace(cfg, pq_hnsw_cells=0), 10_000_000, 64) == "IVF4096,PQ64x4fsr,Refine(SQfp16)"
    assert factory_string(dataclasses.replace(cfg, pq_hnsw_cells=8192), 10_000_000, 64) == "IVF4096,PQ64x4fsr,Refine(SQfp16)"
    assert factory_string(cfg, 473_333, 32) == "IVF1024,PQ32x4fsr,Refine(SQfp16)"  # the nearest power of two was 512
    assert factory_string(cfg, 512 * 512, 64) == "IVF512,PQ64x4fsr,Refine(SQfp16)"  # sqrt exactly a power of two
    assert factory_string(cfg, 512 * 512 + 1, 64) == "IVF1024,PQ64x4fsr,Refine(SQfp16)"
    assert factory_string(cfg, 1024 * 1024 + 1, 64) == "IVF2048,PQ64x4fsr,Refine(SQfp16)"
    assert factory_string(cfg, 3900, 16) == "IVF64,PQ16x4fsr,Refine(SQfp16)"
    assert factory_string(cfg, 1000, 16) == "IVF25,PQ16x4fsr,Refine(SQfp16)"  # capped at 39 points a cell
    with pytest.raises(ConfigError, match="^index.pq_m=32 must divide the embedding size 48$"):
        factory_string(dataclasses.replace(cfg, pq_m=32), 10_000, 48)


def test_exact_top_k_in_blocks_equals_one_block(vectors):
    items, queries = vectors
    np.testing.assert_array_equal(exact_top_k(queries, items, 10, chunk=7, block=333), exact_top_k(queries, items, 10, block=10**6))


def test_ivf_trains_on_a_sample_and_adds_every_row(vectors):
    items, queries = vectors
    sample = training_sample(items, 16, 50)
    assert sample.shape == (800, 16) and len(np.unique(sample, axis=0)) == 800  # 16 cells x 50 points, no repeats
    assert training_sample(items, 100, 50) is items  # fewer rows than asked: all of them
    index = build_index(items, IndexConfig(kind="ivf_sq", sq_nlist=16, sq_nprobe=16, train_points_per_cell=50, add_chunk=999))
    assert index.ntotal == 4000 and faiss.extract_index_ivf(index).nprobe == 16
    # every cell probed: only the 8-bit codes separate it from exact search
    assert recall_against_exact(index, queries, items, 10) >= 0.95


def test_ivf_pq_short_list_is_re_ranked_and_reads_back(vectors, tmp_path):
    items, queries = vectors
    cfg = IndexConfig(kind="ivf_pq", pq_nlist=32, pq_nprobe=32, pq_m=8, refine="SQfp16", refine_k_factor=16)
    assert factory_string(cfg, 4000, 16) == "IVF32,PQ8x4fsr,Refine(SQfp16)"
    index = build_index(items, cfg)
    assert isinstance(index, faiss.IndexRefine) and index.k_factor == 16 and search_params(index) == {"nprobe": 32, "k_factor": 16.0}
    # every cell probed, 160 PQ candidates re-ranked with fp16 vectors: near exact
    assert recall_against_exact(index, queries, items, 10) >= 0.95
    no_refine = build_index(items, dataclasses.replace(cfg, refine="none"))
    assert recall_against_exact(no_refine, queries, items, 10) < 0.9  # 4-bit codes alone are coarse
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    loaded = faiss.read_index(str(tmp_path / "i.faiss"))
    assert loaded.k_factor == 16 and ivf_of(loaded).nprobe == 32 and ivf_of(loaded).by_residual
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])
    with pytest.raises(ConfigError, match="index.pq_m=6 must divide the embedding size 16"):
        build_index(items, dataclasses.replace(cfg, pq_m=6))


def test_ivf_pq_codes_of_offsets_from_the_cell_rank_better_than_codes_of_the_vectors(vectors):
    items, queries = vectors
    cfg = IndexConfig(kind="ivf_pq", pq_nlist=32, pq_nprobe=32, pq_m=8, refine="none")
    assert factory_string(dataclasses.replace(cfg, pq_residual=False), 4000, 16) == "IVF32,PQ8x4fs"
    plain = build_index(items, dataclasses.replace(cfg, pq_residual=False))
    residual = build_index(items, cfg)
    assert not ivf_of(plain).by_residual and ivf_of(residual).by_residual
    # every cell probed and nothing re-ranked: the codes alone decide the order
    plain_recall, residual_recall = (recall_against_exact(i, queries, items, 10) for i in (plain, residual))
    assert residual_recall > plain_recall + 0.03, (plain_recall, residual_recall)  # 0.54 against 0.49


def test_ivf_pq_cells_found_in_an_hnsw_graph_hold_the_floor_and_read_back_with_its_width(vectors, tmp_path):
    items, queries = vectors
    cfg = IndexConfig(kind="ivf_pq", pq_nlist=32, pq_nprobe=8, pq_m=8, pq_hnsw_cells=32, pq_quantizer_ef=48)
    assert factory_string(cfg, 4000, 16) == "IVF32_HNSW32,PQ8x4fsr,Refine(SQfp16)"
    index = build_index(items, cfg)
    quantizer = faiss.downcast_index(ivf_of(index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSWFlat) and quantizer.hnsw.efSearch == 48
    assert search_params(index) == {"nprobe": 8, "k_factor": 4.0, "quantizer_ef_search": 48}
    flat = build_index(items, dataclasses.replace(cfg, pq_hnsw_cells=0))
    assert "quantizer_ef_search" not in search_params(flat)
    assert recall_against_exact(index, queries, items, 10) >= recall_against_exact(flat, queries, items, 10) - 0.02
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    np.save(tmp_path / "ids.npy", np.arange(len(items), dtype=np.int64))
    np.savez(tmp_path / "s.npz", user_ids=np.array([1]), indptr=np.array([0, 0]), indices=np.zeros(0, np.int64))
    op = SearchItems(tmp_path / "i.faiss", tmp_path / "ids.npy", tmp_path / "s.npz", {**search_params(index), "quantizer_ef_search": 20})
    op.load_artifacts()
    assert faiss.downcast_index(ivf_of(op._cpu_index).quantizer).hnsw.efSearch == 20  # as the manifest says
    assert "cells found by HNSW, efSearch 20" in op.describe()


def test_ivf_sq_index_reads_back_with_its_probe(vectors, tmp_path):
    items, queries = vectors
    index = build_index(items, IndexConfig(kind="ivf_sq", sq_nlist=32, sq_nprobe=8))
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    loaded = faiss.read_index(str(tmp_path / "i.faiss"))
    assert isinstance(loaded, faiss.IndexIVFScalarQuantizer) and faiss.extract_index_ivf(loaded).nprobe == 8
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])


def test_recall_floor_fails_the_build(vectors):
    items, queries = vectors
    cfg = IndexConfig(kind="ivf", nlist=64, nprobe=1, min_recall_at_10=0.99)
    with pytest.raises(IndexQualityError, match=r"IVF64,Flat has recall@10 0\.\d+ .* below the floor index\.min_recall_at_10=0\.99"):
        build_checked_index(items, queries, cfg)
    _, report = build_checked_index(items, queries, dataclasses.replace(cfg, kind="flat"))
    assert report.recall_at_10 == 1.0 and report.n_items == 4000


def test_auto_index_widens_its_probe_by_half_then_settles_on_the_narrowest_that_holds_the_floor(vectors):
    items, queries = vectors
    steps = [1]
    while steps[-1] < 64:
        steps.append(wider_probe(steps[-1], 64))
    assert steps == [1, 2, 3, 5, 8, 12, 18, 27, 41, 62, 64]
    cfg = IndexConfig(flat_max_items=10, nlist=64, nprobe=1)  # kind auto: IVF-Flat at 4000 items
    index, report = build_checked_index(items, queries, cfg)
    chosen = report.search_params["nprobe"]
    assert chosen > 1 and report.recall_at_10 - report.recall_se >= 0.95 and 0 < report.recall_se < 0.01
    assert report.recall_at_10 == recall_against_exact(index, queries, items, 10)  # reported as served
    ivf_of(index).nprobe = chosen - 1
    fewer = recall_per_query(index, queries, items, 10)
    assert np.mean(fewer) - standard_error(fewer) < 0.95  # one cell fewer falls short: no wider than needed


def test_narrowest_probe_bisects_to_the_first_width_that_holds_the_floor_with_a_standard_error_to_spare():
    class Ivf:
        nprobe, nlist = 16, 4096

    def recalls(mean):  # 100 queries: half at mean - 0.05, half at mean + 0.05; standard error 0.005
        return np.repeat([mean - 0.05, mean + 0.05], 50)

    # from 41 on the mean is 0.96, its standard error 0.005; 30..40 reach 0.952, above the floor
    # but not by a standard error; below 30, 0.90
    recall_at = {n: recalls(0.96 if n >= 41 else 0.952 if n >= 30 else 0.90) for n in range(1, 4097)}
    ivf, tried = Ivf(), []

    def measure():
        tried.append(ivf.nprobe)
        return recall_at[ivf.nprobe]

    assert np.mean(narrowest_probe(ivf, 0.95, recall_at[16], measure)) == pytest.approx(0.96) and ivf.nprobe == 41
    assert tried == [24, 36, 54, 45, 40, 42, 41]  # widened by half to 54, then bisected in 36..54
    ivf.nprobe = 16
    assert np.mean(narrowest_probe(ivf, 0.99, recall_at[16], measure)) == pytest.approx(0.96) and ivf.nprobe == 4096  # never holds
    ivf.nprobe = 64
    assert np.mean(narrowest_probe(ivf, 0.95, recall_at[64], measure)) == pytest.approx(0.96) and ivf.nprobe == 64  # held at once


def test_served_ivf_pq_widens_its_probe_for_short_rows(vectors, tmp_path):
    from ensemble.ops.search import SearchItems

    items, queries = vectors
    index = build_index(items, IndexConfig(kind="ivf_pq", pq_nlist=32, pq_nprobe=1, pq_m=8, refine_k_factor=2))
    faiss.write_index(index, str(tmp_path / "items.faiss"))
    np.save(tmp_path / "item_ids.npy", np.arange(4000, dtype=np.int64) + 100)
    np.savez(tmp_path / "seen.npz", user_ids=np.zeros(0, np.int64), indptr=np.zeros(1, np.int64), indices=np.zeros(0, np.int64))
    op = SearchItems(tmp_path / "items.faiss", tmp_path / "item_ids.npy", tmp_path / "seen.npz", search_params(index))
    op.load_artifacts()
    # one cell of about 125 items cannot answer 300: the rows are searched again with a wider probe
    ids, scores = op.search(queries[:4], np.full(4, 300))
    assert (ids >= 100).all() and all(len(np.unique(row)) == 300 for row in ids)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert ivf_of(op._cpu_index).nprobe == 1 and op._cpu_index.k_factor == 2  # the wider probe was for those calls only
