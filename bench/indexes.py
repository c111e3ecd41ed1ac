"""Index choices at the benchmark's scale: build time, memory, recall@10 against exact, latency."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import faiss
import numpy as np

from common.config import IndexConfig, ServeConfig
from ensemble.ops.search import NO_BLAS_BELOW, TIE_MARGIN, ivf_of
from train.index import (build_index, configure_search, exact_top_k, factory_string, overlap_share, recall_against_exact,
                         standard_error)

LOG = logging.getLogger(__name__)

# Build and search settings come from IndexConfig's defaults (efConstruction 200 as served); only
# the probe widths vary. Flat, IVF-Flat and HNSW are skipped above SLOW_KIND_MAX_ITEMS: at 10M
# items Flat answers in about 200 ms a query, IVF-Flat and HNSW hold 2.6 and 5 GB, and HNSW32
# takes over half an hour to build on 2 cores.
SLOW_KIND_MAX_ITEMS = 2_000_000
CANDIDATES = (
    IndexConfig(kind="flat"),
    IndexConfig(kind="ivf", nprobe=8),
    IndexConfig(kind="ivf", nprobe=16),
    IndexConfig(kind="ivf", nprobe=32),
    IndexConfig(kind="ivf_sq", sq_nprobe=32),
    IndexConfig(kind="ivf_sq", sq_nprobe=64),
    IndexConfig(kind="ivf_sq", sq_nprobe=128),
    IndexConfig(kind="ivf_pq", pq_nprobe=32),
    IndexConfig(kind="ivf_pq", pq_nprobe=64, refine_k_factor=8),
    IndexConfig(kind="ivf_pq", pq_nprobe=64),
    IndexConfig(kind="ivf_pq", pq_nprobe=128),
    # a 4-bit code per pair of dimensions, 512 x k re-ranked (with plain codes, the default before last)
    IndexConfig(kind="ivf_pq", pq_nlist=4096, pq_nprobe=64, pq_m=32, refine_k_factor=512),
    IndexConfig(kind="hnsw", ef_search=64),
    IndexConfig(kind="hnsw", ef_search=128),
)


def _single_query_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> float:
    faiss.omp_set_num_threads(ServeConfig().threads)  # as served: serve.threads' default, k + TIE_MARGIN deep
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None], k + TIE_MARGIN)
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000)


def candidates(kinds: tuple[str, ...], n_items: int, dim: int) -> list[IndexConfig]:
    """The candidate settings of the asked kinds that are worth building at n_items (and fit the vector size)."""
    chosen = [c for c in CANDIDATES if c.kind in kinds and (c.kind in ("ivf_sq", "ivf_pq") or n_items <= SLOW_KIND_MAX_ITEMS)
              and (c.kind != "ivf_pq" or not c.pq_m or dim % c.pq_m == 0)]
    skipped = sorted({c.kind for c in CANDIDATES if c.kind in kinds} - {c.kind for c in chosen})
    if skipped:
        LOG.info("index choices: %s skipped at %d items (over %d)", ", ".join(skipped), n_items, SLOW_KIND_MAX_ITEMS)
    return chosen


def compare_indexes(vectors: np.ndarray, queries: np.ndarray, kinds: tuple[str, ...], n_latency: int = 200,
                    served: tuple[Path, dict] | None = None, exact: np.ndarray | None = None) -> list[dict]:
    """Builds each candidate whose kind is in `kinds` (same build for same structure) and measures it.

    Args:
        vectors: [n_items, dim] the catalogue.
        queries: [n, dim] user queries.
        served: (index file, its IndexReport as a dict): the served index, reused for the
            candidates of the same structure instead of being built again.
        exact: [n, 10] exact_top_k of the queries, when known (10M items: minutes to recompute).
    """
    faiss.cvar.distance_compute_blas_threshold = NO_BLAS_BELOW
    started = time.perf_counter()
    exact = exact_top_k(queries, vectors, 10) if exact is None else exact
    LOG.info("index choices: exact top-10 of %d queries over %d items in %.1f s", len(queries), len(vectors), time.perf_counter() - started)
    built: dict[str, tuple[faiss.Index, float]] = {}
    if served is not None:
        built[served[1]["factory"]] = (faiss.read_index(str(served[0])), served[1]["build_s"])
    rows = []
    for cfg in candidates(kinds, *vectors.shape):
        factory = factory_string(cfg, *vectors.shape)
        if factory not in built:
            faiss.omp_set_num_threads(2)
            started = time.perf_counter()
            built[factory] = (build_index(vectors, dataclasses.replace(cfg, min_recall_at_10=0.0)), time.perf_counter() - started)
            LOG.info("index choices: built %s over %d vectors in %.1f s", factory, len(vectors), built[factory][1])
        index, build_s = built[factory]
        configure_search(index, cfg)  # the candidate's probe, re-ranking and graph widths (an index may serve several)
        nprobe = ivf_of(index).nprobe if ivf_of(index) is not None else None
        faiss.omp_set_num_threads(2)
        recall = recall_against_exact(index, queries, vectors, 10, exact)
        row = {
            "kind": cfg.kind, "factory": factory, "nprobe": nprobe,
            "k_factor": cfg.refine_k_factor if isinstance(index, faiss.IndexRefine) else None,
            "ef_construction": cfg.ef_construction if cfg.kind == "hnsw" else None,
            "ef_search": cfg.ef_search if cfg.kind == "hnsw" else None, "build_s": build_s,
            "memory_mb": faiss.serialize_index(index).size / 2**20, "recall_at_10": recall,
            "p50_ms_one_query": _single_query_ms(index, queries[:n_latency]),
        }
        LOG.info("index choices: %-14s nprobe=%s ef=%s recall@10 %.4f, %.3f ms per query, %.0f MB", factory, row["nprobe"],
                 row["ef_search"], recall, row["p50_ms_one_query"], row["memory_mb"])
        rows.append(row)
    return rows


def served_recall(repository: Path, queries: np.ndarray, exact: np.ndarray) -> dict:
    """Recall@10 of the served model's own search, one query a call as at concurrency 1.

    The model is loaded in-process from its repository with its serve settings (threads, the
    probe split), so this is the search a request gets, which at 10M items is not the index's
    own `search` (ensemble.ops.probe_split); `exact` holds catalogue rows.
    """
    from ensemble.loader import load_model_in_process
    from ensemble.ops.search import SearchItems

    executor = load_model_in_process(repository)
    op = next(node.op for node in executor.runner.nodes if isinstance(node.op, SearchItems))
    expected = op._item_ids[exact[:, :10]]
    found = np.concatenate([op.search(q[None], np.array([10]))[0] for q in queries])
    per_query = overlap_share(found, expected)
    result = {"recall_at_10": float(per_query.mean()), "recall_se": standard_error(per_query), "search": op.describe()}
    LOG.info("served search: recall@10 %.4f (standard error %.4f) over %d queries; %s", result["recall_at_10"], result["recall_se"],
             len(per_query), result["search"])
    return result
