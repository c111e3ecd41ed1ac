"""GPU paths (deselected by default; run with `-m gpu` where faiss has GPUs, e.g. the Merlin container)."""

import numpy as np
import pytest

from common.config import IndexConfig
from ensemble.ops.search import use_gpu_index
from train.index import build_index

pytestmark = pytest.mark.gpu


def test_the_index_moves_to_the_gpu_and_answers_like_the_cpu():
    import faiss

    assert hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, "this faiss build has no GPU"
    rng = np.random.default_rng(0)
    items = rng.normal(size=(20_000, 32)).astype(np.float32)
    queries = rng.normal(size=(64, 32)).astype(np.float32)
    cpu = build_index(items, IndexConfig(kind="flat"))
    gpu = use_gpu_index(cpu)
    assert gpu is not cpu
    d_cpu, i_cpu = cpu.search(queries, 10)
    d_gpu, i_gpu = gpu.search(queries, 10)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-4)
    assert np.mean(i_gpu == i_cpu) > 0.99  # float ties may order differently on the GPU
