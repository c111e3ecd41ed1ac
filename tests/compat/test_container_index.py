"""The IVF-PQ index our FAISS 1.8 writes (auto's choice above index.ivf_max_items: residual codes, cells
found by a flat scan or, from index.pq_hnsw_cells on, an HNSW graph) serves on the Merlin 23.08
container's FAISS 1.7.2: it reads, keeps its probe, graph width and re-ranking, and answers as 1.8 does."""

from __future__ import annotations

import json
import subprocess

import faiss
import numpy as np
import pytest

from common.config import IndexConfig
from ensemble.ops.search import SearchItems
from tests.compat.conftest import ROOT
from train.index import build_index, search_params

pytestmark = pytest.mark.compat

N_ITEMS, DIM, N_QUERIES = 20_000, 16, 64

# Run in the container stack's Python: our search operator over the files 1.8 wrote.
SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import faiss, numpy as np
from ensemble.ops.search import SearchItems, ivf_of
folder = sys.argv[2]
op = SearchItems(folder + "/items.faiss", folder + "/item_ids.npy", folder + "/seen.npz", json.loads(sys.argv[3]))
faiss.omp_set_num_threads(2)  # serve.threads' default
op.probe_split_min_codes = int(sys.argv[4])
op.load_artifacts()
queries = np.load(folder + "/queries.npy")
top_k = np.full(len(queries), 10)
ids, scores = op.search(queries, top_k)
np.save(folder + "/ids_172.npy", ids)
np.save(folder + "/scores_172.npy", scores)
excluded = np.where(np.arange(ids.shape[1]) < 5, ids, -1)  # each row's best 5 left out
np.save(folder + "/ids_172_excluded.npy", op.search(queries, top_k, exclude=excluded)[0])
quantizer = faiss.downcast_index(ivf_of(op._cpu_index).quantizer)
print(json.dumps({"faiss": faiss.__version__, "refine": isinstance(op._cpu_index, faiss.IndexRefine),
                  "nprobe": int(ivf_of(op._cpu_index).nprobe), "k_factor": float(op._cpu_index.k_factor),
                  "residual": bool(faiss.downcast_index(ivf_of(op._cpu_index)).by_residual),
                  "quantizer_ef": int(quantizer.hnsw.efSearch) if isinstance(quantizer, faiss.IndexHNSW) else None,
                  "describe": op.describe()}))
"""


def _catalogue(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    items = centres[rng.integers(0, len(centres), N_ITEMS)] + 0.3 * rng.standard_normal((N_ITEMS, DIM))
    items /= np.linalg.norm(items, axis=1, keepdims=True)  # unit norm, as the item tower's output
    queries = centres[rng.integers(0, len(centres), N_QUERIES)] + 0.5 * rng.standard_normal((N_QUERIES, DIM))
    return items.astype(np.float32), queries.astype(np.float32)


@pytest.mark.parametrize("hnsw_cells", [0, 64], ids=["flat quantizer", "hnsw quantizer"])
def test_an_ivf_pq_index_written_by_faiss_18_answers_the_same_on_172(compat_python, tmp_path, hnsw_cells):
    items, queries = _catalogue()
    index = build_index(items, IndexConfig(kind="ivf_pq", pq_nlist=64, pq_nprobe=8, pq_hnsw_cells=hnsw_cells, pq_quantizer_ef=40))
    assert faiss.__version__.startswith("1.8") and isinstance(index, faiss.IndexRefine)
    faiss.write_index(index, str(tmp_path / "items.faiss"))
    np.save(tmp_path / "item_ids.npy", np.arange(N_ITEMS, dtype=np.int64) * 7 + 3)
    np.savez(tmp_path / "seen.npz", user_ids=np.zeros(0, np.int64), indptr=np.zeros(1, np.int64), indices=np.zeros(0, np.int64))
    np.save(tmp_path / "queries.npy", queries)
    params = search_params(index)

    op = SearchItems(tmp_path / "items.faiss", tmp_path / "item_ids.npy", tmp_path / "seen.npz", params)
    op.load_artifacts()
    top_k = np.full(N_QUERIES, 10)
    ids, scores = op.search(queries, top_k)
    excluded = np.where(np.arange(ids.shape[1]) < 5, ids, -1)
    ids_excluded = op.search(queries, top_k, exclude=excluded)[0]

    run = subprocess.run([str(compat_python), "-c", SCRIPT, str(ROOT), str(tmp_path), json.dumps(params), "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    seen.pop("describe")
    assert seen == {"faiss": "1.7.2", "refine": True, "nprobe": params["nprobe"], "k_factor": params["k_factor"], "residual": True,
                    "quantizer_ef": 40 if hnsw_cells else None}
    np.testing.assert_array_equal(np.load(tmp_path / "ids_172.npy"), ids)
    np.testing.assert_allclose(np.load(tmp_path / "scores_172.npy"), scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "ids_172_excluded.npy"), ids_excluded)
    assert not any(np.isin(row, out).any() for row, out in zip(ids_excluded, ids[:, :5]))  # each row's left-out items are gone


def test_a_split_search_on_18_answers_as_the_unsplit_one_on_172(compat_python, tmp_path):
    """serve.probe_split_min_codes reached: FAISS 1.8 splits a one-user query's cells over two threads;
    1.7.2 has no such search (`implem` 14), says so at load and answers the same on one thread a query."""
    items, queries = _catalogue(seed=1)
    index = build_index(items, IndexConfig(kind="ivf_pq", pq_nlist=64, pq_nprobe=8))
    faiss.write_index(index, str(tmp_path / "items.faiss"))
    np.save(tmp_path / "item_ids.npy", np.arange(N_ITEMS, dtype=np.int64))
    np.savez(tmp_path / "seen.npz", user_ids=np.zeros(0, np.int64), indptr=np.zeros(1, np.int64), indices=np.zeros(0, np.int64))
    np.save(tmp_path / "queries.npy", queries)
    params = search_params(index)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        op = SearchItems(tmp_path / "items.faiss", tmp_path / "item_ids.npy", tmp_path / "seen.npz", params)
        op.probe_split_min_codes = 1
        op.load_artifacts()
        assert op._split.split and "a lone query's cells split over 2 threads (2,500 codes a query)" in op.describe()
        alone = [op.search(queries[i : i + 1], np.array([10])) for i in range(N_QUERIES)]  # split after the first 4
        ids, scores = np.concatenate([a[0] for a in alone]), np.concatenate([a[1] for a in alone])
    finally:
        faiss.omp_set_num_threads(before)

    run = subprocess.run([str(compat_python), "-c", SCRIPT, str(ROOT), str(tmp_path), json.dumps(params), "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["faiss"] == "1.7.2"
    assert ", one thread a query (FAISS 1.7.2 cannot split a query's cells) on CPU" in seen["describe"]
    np.testing.assert_array_equal(np.load(tmp_path / "ids_172.npy"), ids)
    np.testing.assert_allclose(np.load(tmp_path / "scores_172.npy"), scores, rtol=1e-6, atol=1e-6)
