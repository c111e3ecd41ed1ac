"""GPU paths (deselected by default; run with `-m gpu` where FAISS and TensorFlow see a GPU,
e.g. our GPU image or the Merlin container)."""

import time

import numpy as np
import pytest

from common.config import IndexConfig
from ensemble.ops.search import GPU_MAX_SELECTION_K, SearchItems, place_index
from train.index import build_index, exact_top_k

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_faiss():
    import faiss

    assert hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, "this faiss build has no GPU"
    return faiss


def test_the_index_moves_to_the_gpu_and_answers_like_the_cpu(gpu_faiss):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(20_000, 32)).astype(np.float32)
    queries = rng.normal(size=(64, 32)).astype(np.float32)
    cpu = build_index(items, IndexConfig(kind="flat"))
    gpu, on_gpu = place_index(cpu, "gpu")
    assert on_gpu and gpu is not cpu
    d_cpu, i_cpu = cpu.search(queries, 10)
    d_gpu, i_gpu = gpu.search(queries, 10)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-4)
    assert np.mean(i_gpu == i_cpu) > 0.99  # float ties may order differently on the GPU


def test_a_search_deeper_than_the_gpu_selection_limit_is_complete_and_exact(gpu_faiss, tmp_path):
    """top_k 1000 + 1000 exclusions + seen items is deeper than GPU_MAX_SELECTION_K: the answer
    must still hold k items equal to exact search, never a crash or a short list."""
    rng = np.random.default_rng(1)
    items = rng.normal(size=(5_000, 16)).astype(np.float32)
    ids = np.arange(100_000, 105_000, dtype=np.int64)
    gpu_faiss.write_index(build_index(items, IndexConfig(kind="flat")), str(tmp_path / "i.faiss"))
    np.save(tmp_path / "ids.npy", ids)
    np.savez(tmp_path / "s.npz", user_ids=np.array([1]), indptr=np.array([0, 300]), indices=np.arange(300))
    op = SearchItems(tmp_path / "i.faiss", tmp_path / "ids.npy", tmp_path / "s.npz")
    op.device = "gpu"
    op.load_artifacts()
    assert op._device_max_k == GPU_MAX_SELECTION_K
    queries = rng.normal(size=(2, 16)).astype(np.float32)
    exclude = np.tile(ids[exact_top_k(queries, items, 1000)[0]], (2, 1))
    got, scores = op.search(queries, np.array([1000, 1000]), user_ids=np.array([1, 2]), exclude=exclude,
                            exclude_seen=np.array([True, False]))
    assert (got >= 0).all() and got.shape == (2, 1000)
    assert not np.isin(got, exclude[0]).any() and not np.isin(got[0], ids[:300]).any()
    full = queries @ items.T
    for row, banned in ((0, np.union1d(exclude[0], ids[:300])), (1, exclude[0])):
        allowed = np.flatnonzero(~np.isin(ids, banned))
        best = allowed[np.argsort(-full[row, allowed], kind="stable")[:1000]]
        np.testing.assert_allclose(np.sort(scores[row])[::-1], np.sort(full[row, best])[::-1], rtol=1e-4)


def test_tensorflow_grows_its_gpu_memory_instead_of_taking_it_all():
    import tensorflow as tf

    from ensemble.ops.tower import configure_threads

    configure_threads(1)
    gpus = tf.config.list_physical_devices("GPU")
    assert gpus, "TensorFlow sees no GPU"
    assert all(tf.config.experimental.get_memory_growth(g) for g in gpus)


def test_search_latency_cpu_vs_gpu_at_one_million_items(gpu_faiss, capsys):
    """Prints the figures for the README (not a timed assertion): one query and a batch of 64."""
    rng = np.random.default_rng(2)
    items = rng.normal(size=(1_000_000, 64)).astype(np.float32)
    cpu = build_index(items, IndexConfig(kind="flat"))
    gpu, _ = place_index(cpu, "gpu")
    for batch in (1, 64):
        queries = rng.normal(size=(batch, 64)).astype(np.float32)
        for name, index in (("cpu", cpu), ("gpu", gpu)):
            index.search(queries, 10)
            started = time.perf_counter()
            for _ in range(5):
                index.search(queries, 10)
            with capsys.disabled():
                print(f"\nflat 1M x 64, batch {batch}, {name}: {(time.perf_counter() - started) / 5 * 1e3:.2f} ms per search")
    _, i_cpu = cpu.search(queries, 10)
    _, i_gpu = gpu.search(queries, 10)
    assert np.mean(i_gpu == i_cpu) > 0.99
