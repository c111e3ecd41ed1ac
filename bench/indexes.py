"""Index choices at the benchmark's scale: build time, memory, recall@10 against exact, latency."""

from __future__ import annotations

import dataclasses
import logging
import time

import faiss
import numpy as np

from common.config import IndexConfig
from ensemble.ops.search import NO_BLAS_BELOW
from train.index import build_index, exact_top_k, factory_string

LOG = logging.getLogger(__name__)

CANDIDATES = (
    IndexConfig(kind="flat"),
    IndexConfig(kind="ivf", nlist=1024, nprobe=8),
    IndexConfig(kind="ivf", nlist=1024, nprobe=16),
    IndexConfig(kind="ivf", nlist=1024, nprobe=32),
    IndexConfig(kind="hnsw", hnsw_m=32, ef_construction=80, ef_search=64),
    IndexConfig(kind="hnsw", hnsw_m=32, ef_construction=80, ef_search=128),
)


def _single_query_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> float:
    faiss.omp_set_num_threads(1)  # as served: one thread per instance
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000)


def compare_indexes(vectors: np.ndarray, queries: np.ndarray, kinds: tuple[str, ...], n_latency: int = 200) -> list[dict]:
    """Builds each candidate whose kind is in `kinds` (same build for same structure) and measures it."""
    faiss.cvar.distance_compute_blas_threshold = NO_BLAS_BELOW
    exact = exact_top_k(queries, vectors, 10)
    built: dict[str, tuple[faiss.Index, float]] = {}
    rows = []
    for cfg in CANDIDATES:
        if cfg.kind not in kinds:
            continue
        factory = factory_string(cfg, len(vectors))
        if factory not in built:
            faiss.omp_set_num_threads(2)
            started = time.perf_counter()
            built[factory] = (build_index(vectors, dataclasses.replace(cfg, min_recall_at_10=0.0)), time.perf_counter() - started)
            LOG.info("built %s over %d vectors in %.1f s", factory, len(vectors), built[factory][1])
        index, build_s = built[factory]
        if cfg.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = cfg.nprobe
        if cfg.kind == "hnsw":
            index.hnsw.efSearch = cfg.ef_search
        faiss.omp_set_num_threads(2)
        _, found = index.search(queries, 10)
        recall = float(np.mean([len(np.intersect1d(f, e)) for f, e in zip(found, exact)]) / 10)
        row = {
            "kind": cfg.kind, "factory": factory, "nprobe": cfg.nprobe if cfg.kind == "ivf" else None,
            "ef_search": cfg.ef_search if cfg.kind == "hnsw" else None, "build_s": build_s,
            "memory_mb": faiss.serialize_index(index).size / 2**20, "recall_at_10": recall,
            "p50_ms_one_query": _single_query_ms(index, queries[:n_latency]),
        }
        LOG.info("%-14s nprobe=%s ef=%s recall@10 %.4f, %.3f ms per query, %.0f MB", factory, row["nprobe"], row["ef_search"],
                 recall, row["p50_ms_one_query"], row["memory_mb"])
        rows.append(row)
    return rows
