"""FAISS inner-product indexes over item embeddings, and their recall against exact search."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import faiss
import numpy as np

from common.config import IndexConfig
from common.errors import ConfigError, IndexQualityError
from ensemble.ops.search import TIE_MARGIN, hnsw_quantizer, ivf_of

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexReport:
    """How an index was built and how well it answers.

    Attributes:
        kind: flat, ivf, ivf_sq, ivf_pq or hnsw.
        factory: the FAISS index_factory string.
        build_s: seconds to train and fill the index.
        search_params: nprobe / k_factor / ef_search the index is served with.
        bytes: size of the serialized index.
        recall_at_10: mean share of the exact top-10 that the index returns, over sample queries.
        recall_se: the standard error of that mean (the spread of per-query recall / sqrt(queries)).
        n_items: vectors in the index.
        dim: vector size.
    """

    kind: str
    factory: str
    build_s: float
    search_params: dict
    bytes: int
    recall_at_10: float
    recall_se: float
    n_items: int
    dim: int


def factory_string(cfg: IndexConfig, n_items: int, dim: int) -> str:
    """The index_factory description for the configured kind, catalogue size and vector size."""
    kind = cfg.resolved_kind(n_items)
    if kind == "flat":
        return "Flat"
    if kind == "ivf":
        return f"IVF{ivf_cells(cfg, n_items)},Flat"
    if kind == "ivf_sq":
        return f"IVF{ivf_cells(cfg, n_items)},{cfg.sq_type}"
    if kind == "ivf_pq":
        # Refine(...) is FAISS 1.8's factory syntax; the IndexRefine it writes also reads and
        # searches on 1.7.2 (the Merlin container's), where ensemble.ops.search opens it.
        refine = "" if cfg.refine == "none" else f",Refine({cfg.refine})"
        # "fsr": the codes quantize each vector's offset from its cell centroid (by_residual);
        # FAISS 1.7.2 parses and reads it too.
        residual = "r" if cfg.pq_residual else ""
        cells = ivf_cells(cfg, n_items)
        quantizer = "_HNSW32" if cfg.pq_hnsw_cells and cells >= cfg.pq_hnsw_cells else ""
        return f"IVF{cells}{quantizer},PQ{pq_codes(cfg, dim)}x4fs{residual}{refine}"
    return f"HNSW{cfg.hnsw_m},Flat"


def ivf_cells(cfg: IndexConfig, n_items: int) -> int:
    """IVF cells for the configured kind; IVF-PQ's 0 is the smallest power of two >= sqrt(n_items)."""
    kind = cfg.resolved_kind(n_items)
    nlist = {"ivf_sq": cfg.sq_nlist, "ivf_pq": cfg.pq_nlist}.get(kind, cfg.nlist)
    if kind == "ivf_pq" and nlist == 0:
        nlist = 1 << math.ceil(math.log2(max(1.0, math.sqrt(n_items))))
    # k-means wants about 39 points per centroid; fewer gives FAISS warnings and poor cells.
    return max(1, min(nlist, n_items // 39))


def pq_codes(cfg: IndexConfig, dim: int) -> int:
    """IVF-PQ sub-quantizers: index.pq_m, or one per dimension when it is 0.

    Raises:
        ConfigError: pq_m does not divide the embedding size.
    """
    m = cfg.pq_m or dim
    if dim % m:
        raise ConfigError(f"index.pq_m={m} must divide the embedding size {dim}")
    return m


def training_sample(vectors: np.ndarray, n_cells: int, per_cell: int, seed: int = 0) -> np.ndarray:
    """A seeded sample of `per_cell` rows per IVF cell (all rows when there are fewer), in row order."""
    n = min(len(vectors), n_cells * per_cell)
    if n == len(vectors):
        return vectors
    return vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), size=n, replace=False))]


def build_index(vectors: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """Builds an inner-product index whose labels are the rows of `vectors`.

    IVF kinds train k-means (and the scalar quantizer) on a sample of `train_points_per_cell`
    vectors per cell, then add the catalogue `add_chunk` rows at a time.

    Args:
        vectors: [n_items, dim] float32 item embeddings.
    """
    n, dim = vectors.shape
    index = faiss.index_factory(dim, factory_string(cfg, n, dim), faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = cfg.ef_construction
    ivf = ivf_of(index)
    if not index.is_trained:
        sample = vectors if ivf is None else training_sample(vectors, ivf.nlist, cfg.train_points_per_cell)
        started = time.perf_counter()
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        LOG.info("index: trained %s on %d vectors in %.1f s", type(index).__name__, len(sample), time.perf_counter() - started)
    chunk = cfg.add_chunk if ivf is not None else n
    for start in range(0, n, chunk):
        index.add(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32))
    configure_search(index, cfg)
    return index


def search_params(index: faiss.Index) -> dict:
    """The index's search-time knobs, to set again after loading (FAISS does not keep efSearch)."""
    ivf = ivf_of(index)
    params = {}
    if ivf is not None:
        params["nprobe"] = int(ivf.nprobe)
    if isinstance(index, faiss.IndexRefine):
        params["k_factor"] = float(index.k_factor)
    if isinstance(index, faiss.IndexHNSW):
        params["ef_search"] = int(index.hnsw.efSearch)
    quantizer = hnsw_quantizer(index)
    if quantizer is not None:
        params["quantizer_ef_search"] = int(quantizer.hnsw.efSearch)
    return params


def configure_search(index: faiss.Index, cfg: IndexConfig) -> None:
    """Sets the configured nprobe / k_factor / efSearch on a built index."""
    ivf = ivf_of(index)
    if ivf is not None:
        coded = faiss.downcast_index(ivf)
        nprobe = (cfg.sq_nprobe if isinstance(coded, faiss.IndexIVFScalarQuantizer)
                  else cfg.pq_nprobe if isinstance(coded, faiss.IndexIVFPQFastScan) else cfg.nprobe)
        ivf.nprobe = min(nprobe, ivf.nlist)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = cfg.refine_k_factor
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search
    quantizer = hnsw_quantizer(index)
    if quantizer is not None:
        quantizer.hnsw.efSearch = cfg.pq_quantizer_ef


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 256, block: int = 262_144) -> np.ndarray:
    """[n, k] rows of the k largest inner products per query, by numpy (the oracle for tests).

    Scores are computed `chunk` queries by `block` items at a time (a 10M catalogue's scores do
    not fit in memory at once); each block's top-k is kept and the candidates are ranked at the end.
    """
    k = min(k, len(vectors))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        rows, scores = [], []
        for lo in range(0, len(vectors), block):
            s = q @ vectors[lo : lo + block].T
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            rows.append(part + lo)
            scores.append(np.take_along_axis(s, part, axis=1))
        rows, scores = np.concatenate(rows, axis=1), np.concatenate(scores, axis=1)
        order = np.lexsort((rows, -scores), axis=1)[:, :k]  # best first, ties by catalogue row
        out[start : start + chunk] = np.take_along_axis(rows, order, axis=1)
    return out


def recall_against_exact(index: faiss.Index, queries: np.ndarray, vectors: np.ndarray, k: int = 10,
                         exact: np.ndarray | None = None) -> float:
    """Mean |index top-k ∩ exact top-k| / k over the queries (`exact`: exact_top_k's answer, if known).

    The index is searched k + TIE_MARGIN deep, as served (`SearchItems`), and its first k kept: an
    IndexRefine re-ranks k_factor times the depth it is asked for, so this is the served recall.
    """
    return float(np.mean(recall_per_query(index, queries, vectors, k, exact)))


def recall_per_query(index: faiss.Index, queries: np.ndarray, vectors: np.ndarray, k: int = 10,
                     exact: np.ndarray | None = None) -> np.ndarray:
    """Each query's |index top-k ∩ exact top-k| / k, searched as `recall_against_exact` says."""
    k = min(k, len(vectors))
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(len(vectors), k + TIE_MARGIN))
    exact = exact_top_k(queries, vectors, k) if exact is None else exact[:, :k]
    return overlap_share(found[:, :k], exact)


def overlap_share(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Each row's |found ∩ exact| / exact's width ([n, k] each, any ids)."""
    return np.array([len(np.intersect1d(f, e)) for f, e in zip(found, exact)], dtype=np.float64) / exact.shape[1]


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of `values` (0 for fewer than two)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def wider_probe(nprobe: int, nlist: int) -> int:
    """The next probe width "auto" tries: half as wide again (16, 24, 36, 54, ...), at most nlist.

    Steps of 1.5x rather than 2x: the search costs about what it scans, and doubling past the
    floor scanned up to a third more cells than the floor needed (1M items: 32 cells where 24 held it).
    """
    return min(nlist, max(nprobe + 1, (3 * nprobe + 1) // 2))


def narrowest_probe(ivf, floor: float, per_query: np.ndarray, measure) -> np.ndarray:
    """Sets `ivf.nprobe` to the narrowest width that holds `floor`, never narrower than the
    configured one it starts from; returns its per-query recalls.

    A width holds the floor when its mean recall, less one standard error, is at least the floor:
    the sample also decides the width, and without the margin the narrowest width sat on the floor
    (10M items: 0.9500 over 300 queries at 37 cells, as likely below 0.95 as above on other queries).
    Widens by half (`wider_probe`) until a width holds, then bisects between the last width that
    fell short and the first that held (recall grows with the probe). At 10M items the widening
    alone stopped at 54 cells (0.969) where 40 held the floor (0.955): 20% of the search's time.

    Args:
        ivf: the IVF index, searched at its current nprobe.
        per_query: the queries' recalls at the current nprobe.
        measure: () -> the queries' recalls at the nprobe then set.
    """
    def holds(recalls: np.ndarray) -> bool:
        return float(np.mean(recalls)) - standard_error(recalls) >= floor

    def measured() -> np.ndarray:
        recalls = measure()
        LOG.info("auto index: nprobe %d gives recall@10 %.4f +- %.4f", ivf.nprobe, np.mean(recalls), standard_error(recalls))
        return recalls

    short = None
    while not holds(per_query) and ivf.nprobe < ivf.nlist:
        short = ivf.nprobe
        ivf.nprobe = wider_probe(ivf.nprobe, ivf.nlist)
        per_query = measured()
    if not holds(per_query) or short is None:
        return per_query
    held, held_recalls = ivf.nprobe, per_query
    while held - short > 1:
        ivf.nprobe = (short + held) // 2
        per_query = measured()
        if holds(per_query):
            held, held_recalls = ivf.nprobe, per_query
        else:
            short = ivf.nprobe
    ivf.nprobe = held
    return held_recalls


def build_checked_index(vectors: np.ndarray, queries: np.ndarray, cfg: IndexConfig,
                        exact: np.ndarray | None = None) -> tuple[faiss.Index, IndexReport]:
    """Builds the configured index, measures its recall@10 and fails below the floor.

    Args:
        vectors: [n_items, dim] item embeddings.
        queries: [n, dim] realistic queries (user embeddings) to measure recall with.
        exact: [n, >=10] exact_top_k of those queries, when the caller has it already.

    Raises:
        IndexQualityError: recall@10 against exact search is below cfg.min_recall_at_10.
    """
    started = time.perf_counter()
    index = build_index(vectors, cfg)
    build_s = time.perf_counter() - started
    sample = queries[: cfg.recall_sample]
    started = time.perf_counter()
    exact = exact_top_k(sample, vectors, 10) if exact is None else exact[: len(sample)]
    LOG.info("index: exact top-10 of %d queries over %d items in %.1f s", len(sample), len(vectors), time.perf_counter() - started)
    per_query = recall_per_query(index, sample, vectors, 10, exact)
    ivf = ivf_of(index)
    if cfg.kind == "auto" and ivf is not None:  # an explicit setting is kept (and checked below)
        per_query = narrowest_probe(ivf, cfg.min_recall_at_10, per_query, lambda: recall_per_query(index, sample, vectors, 10, exact))
    recall, recall_se = float(np.mean(per_query)), standard_error(per_query)
    report = IndexReport(
        kind=cfg.resolved_kind(len(vectors)), factory=factory_string(cfg, *vectors.shape), build_s=build_s, search_params=search_params(index),
        bytes=int(faiss.serialize_index(index).size), recall_at_10=recall, recall_se=recall_se,
        n_items=int(index.ntotal), dim=int(vectors.shape[1]),
    )
    LOG.info("index %s: %d x %d built in %.2f s, recall@10 vs exact %.4f +- %.4f (%d queries)", report.factory, report.n_items,
             report.dim, build_s, recall, recall_se, len(sample))
    if recall < cfg.min_recall_at_10:
        raise IndexQualityError(
            f"index {report.factory} has recall@10 {recall:.4f} against exact search, below the floor "
            f"index.min_recall_at_10={cfg.min_recall_at_10}; raise nprobe/ef_search or use kind=flat"
        )
    return index, report
