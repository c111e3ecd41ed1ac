"""FAISS inner-product indexes over item embeddings, and their recall against exact search."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np

from common.config import IndexConfig
from common.errors import IndexQualityError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexReport:
    """How an index was built and how well it answers.

    Attributes:
        kind: flat, ivf or hnsw.
        factory: the FAISS index_factory string.
        build_s: seconds to train and fill the index.
        search_params: nprobe / ef_search the index is served with.
        bytes: size of the serialized index.
        recall_at_10: mean share of the exact top-10 that the index returns, over sample queries.
        n_items: vectors in the index.
        dim: vector size.
    """

    kind: str
    factory: str
    build_s: float
    search_params: dict
    bytes: int
    recall_at_10: float
    n_items: int
    dim: int


def factory_string(cfg: IndexConfig, n_items: int) -> str:
    """The index_factory description for the configured kind and catalogue size."""
    kind = cfg.resolved_kind(n_items)
    if kind == "flat":
        return "Flat"
    if kind == "ivf":
        return f"IVF{ivf_cells(cfg, n_items)},Flat"
    return f"HNSW{cfg.hnsw_m},Flat"


def ivf_cells(cfg: IndexConfig, n_items: int) -> int:
    # k-means wants about 39 points per centroid; fewer gives FAISS warnings and poor cells.
    return max(1, min(cfg.nlist, n_items // 39))


def build_index(vectors: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """Builds an inner-product index whose labels are the rows of `vectors`.

    Args:
        vectors: [n_items, dim] float32 item embeddings.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index = faiss.index_factory(dim, factory_string(cfg, n), faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = cfg.ef_construction
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    configure_search(index, cfg)
    return index


def search_params(index: faiss.Index) -> dict:
    """The index's search-time knobs, to set again after loading (FAISS does not keep efSearch)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nprobe": int(ivf.nprobe)}
    if isinstance(index, faiss.IndexHNSW):
        return {"ef_search": int(index.hnsw.efSearch)}
    return {}


def configure_search(index: faiss.Index, cfg: IndexConfig) -> None:
    """Sets the configured nprobe / efSearch on a built index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(cfg.nprobe, ivf.nlist)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """[n, k] rows of the k largest inner products per query, by numpy (the oracle for tests)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ vectors.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def recall_against_exact(index: faiss.Index, queries: np.ndarray, vectors: np.ndarray, k: int = 10) -> float:
    """Mean |index top-k ∩ exact top-k| / k over the queries."""
    k = min(k, len(vectors))
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    exact = exact_top_k(queries, vectors, k)
    hits = [len(np.intersect1d(f, e)) for f, e in zip(found, exact)]
    return float(np.mean(hits) / k)


def build_checked_index(vectors: np.ndarray, queries: np.ndarray, cfg: IndexConfig) -> tuple[faiss.Index, IndexReport]:
    """Builds the configured index, measures its recall@10 and fails below the floor.

    Args:
        vectors: [n_items, dim] item embeddings.
        queries: [n, dim] realistic queries (user embeddings) to measure recall with.

    Raises:
        IndexQualityError: recall@10 against exact search is below cfg.min_recall_at_10.
    """
    started = time.perf_counter()
    index = build_index(vectors, cfg)
    build_s = time.perf_counter() - started
    sample = queries[: cfg.recall_sample]
    recall = recall_against_exact(index, sample, vectors, 10)
    ivf = faiss.try_extract_index_ivf(index)
    # kind="auto" widens the probe until the floor is met; an explicit setting is kept (and checked).
    while cfg.kind == "auto" and ivf is not None and recall < cfg.min_recall_at_10 and ivf.nprobe < ivf.nlist:
        ivf.nprobe = min(ivf.nlist, 2 * ivf.nprobe)
        recall = recall_against_exact(index, sample, vectors, 10)
        LOG.info("auto index: nprobe %d gives recall@10 %.4f", ivf.nprobe, recall)
    report = IndexReport(
        kind=cfg.resolved_kind(len(vectors)), factory=factory_string(cfg, len(vectors)), build_s=build_s, search_params=search_params(index),
        bytes=int(faiss.serialize_index(index).size), recall_at_10=recall,
        n_items=int(index.ntotal), dim=int(vectors.shape[1]),
    )
    LOG.info("index %s: %d x %d built in %.2f s, recall@10 vs exact %.4f", report.factory, report.n_items, report.dim, build_s, recall)
    if recall < cfg.min_recall_at_10:
        raise IndexQualityError(
            f"index {report.factory} has recall@10 {recall:.4f} against exact search, below the floor "
            f"index.min_recall_at_10={cfg.min_recall_at_10}; raise nprobe/ef_search or use kind=flat"
        )
    return index, report
