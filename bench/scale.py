"""A copy of an artifacts folder whose catalogue is scaled up with synthetic item vectors.

The trained catalogue has a few thousand items; serving speed matters at millions. Items beyond
the trained ones are synthetic, drawn to look like trained ones (`synthetic_catalogue`: a Gaussian
mixture fitted to the trained vectors, unit norm), each with a fresh raw id and the features of a
trained item of its mixture cell. The index is rebuilt over all of them with the usual recall
check against exact search, measured with real user queries.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from common import contract
from common.config import IndexConfig
from common.manifest import REQUIRED_FILES, file_digests, read_manifest
from train.index import build_checked_index, exact_top_k

LOG = logging.getLogger(__name__)


MIXTURE_COMPONENTS = 8  # spherical k-means cells fitted on the trained vectors
COVARIANCE_SHRINK = 64  # pseudo-rows of the pooled within-cell covariance mixed into each cell's own
GENERATE_CHUNK = 500_000


def fit_mixture(real: np.ndarray, components: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(weights [c], means [c, d], Cholesky factors [c, d, d], cell per trained row [n]) of a Gaussian mixture.

    Each cell is a spherical k-means cell of the trained vectors, with its own mean and its own
    covariance shrunk towards the pooled within-cell covariance (a few dozen rows in 64 dimensions give
    a singular estimate).
    """
    real = np.ascontiguousarray(real, dtype=np.float32)
    n, dim = real.shape
    components = max(1, min(components, n // 4))
    kmeans = faiss.Kmeans(dim, components, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(real)
    cell = kmeans.index.search(real, 1)[1][:, 0]
    weights, means = np.bincount(cell, minlength=components).astype(np.float64), np.zeros((components, dim))
    scatter = np.zeros((components, dim, dim))
    for c in range(components):  # a loop over cells, not items
        rows = real[cell == c].astype(np.float64)
        means[c] = rows.mean(axis=0) if len(rows) else real.mean(axis=0)
        scatter[c] = (rows - means[c]).T @ (rows - means[c])
    pooled = scatter.sum(axis=0) / max(n - components, 1)  # the within-cell covariance shared by all cells
    factors = np.zeros((components, dim, dim))
    for c in range(components):
        cov = (scatter[c] + COVARIANCE_SHRINK * pooled) / (max(weights[c] - 1, 0) + COVARIANCE_SHRINK)
        factors[c] = np.linalg.cholesky(cov + 1e-9 * np.eye(dim))
    return weights / weights.sum(), means, factors, cell


def synthetic_catalogue(real: np.ndarray, n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """([n_items, d] vectors whose first rows are `real`, [n_items - len(real)] feature-source rows).

    Rows beyond the trained ones are drawn from a Gaussian mixture fitted to the trained vectors
    (`fit_mixture`), then scaled to unit norm as the trained ones are (the item tower's output is
    L2-normalized). What it preserves: the norm (all 1), the share of items per k-means cell, each
    cell's mean and covariance (so the covariance spectrum: the top eigenvalues within about 5% of
    the trained ones at the default data). What it does not: fine structure below a cell, such as
    near-duplicate items; the synthetic vectors' nearest neighbour is a little farther than a
    trained vector's (`neighbour_cosines`), which makes approximate search harder, not easier.
    Each synthetic row takes the features of a random trained item of its cell (its source).
    """
    rng = np.random.default_rng(seed)
    extra = max(0, n_items - len(real))
    out = np.empty((len(real) + extra, real.shape[1]), np.float32)
    out[: len(real)] = real
    source = np.empty(extra, np.int64)
    if not extra:
        return out, source
    weights, means, factors, cell = fit_mixture(real, MIXTURE_COMPONENTS, seed)
    members = [np.flatnonzero(cell == c) for c in range(len(weights))]
    for start in range(0, extra, GENERATE_CHUNK):
        n = min(GENERATE_CHUNK, extra - start)
        drawn = rng.choice(len(weights), size=n, p=weights)
        block = np.empty((n, real.shape[1]), np.float32)
        for c in np.unique(drawn):  # a loop over mixture cells (8), not over items
            rows = np.flatnonzero(drawn == c)
            block[rows] = means[c] + rng.standard_normal((len(rows), real.shape[1])) @ factors[c].T
            source[start + rows] = members[c][rng.integers(0, len(members[c]), len(rows))]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[len(real) + start : len(real) + start + n] = block
    return out, source


def neighbour_cosines(real: np.ndarray, synthetic: np.ndarray, n: int, seed: int) -> dict:
    """Nearest-neighbour cosine percentiles and covariance spectra of `n` trained vs `n` synthetic vectors.

    Equal sample sizes, so the two neighbour distributions compare like with like.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in (("trained", real), ("synthetic", synthetic)):
        v = v[rng.choice(len(v), size=min(n, len(v)), replace=False)].astype(np.float64)
        gram = v @ v.T
        np.fill_diagonal(gram, -np.inf)
        out[name] = {
            "nn_cosine_p5_p50_p95": [float(x) for x in np.percentile(gram.max(axis=1), [5, 50, 95])],
            "top_eigenvalues": [float(x) for x in np.linalg.eigvalsh(np.cov(v.T))[::-1][:4]],
            "norm_mean": float(np.linalg.norm(v, axis=1).mean()),
        }
    return out


def user_queries(artifacts: Path, work: Path, n: int, seed: int) -> np.ndarray:
    """Query embeddings of real training users, from the compiled tower (as served)."""
    from ensemble.ops.tower import NumpyTower

    with np.load(artifacts / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        tower = NumpyTower({k: arrays[k] for k in arrays.files})
    users = pd.read_parquet(work / "etl" / "users_encoded.parquet")
    users = users.sample(min(n, len(users)), random_state=seed)
    return tower.embed({c: users[c].to_numpy() for c in users.columns})


def scale_artifacts(artifacts: Path, work: Path, out: Path, n_items: int, index: IndexConfig, seed: int = 0) -> dict:
    """Writes the scaled artifacts folder and returns what was done (for the report).

    The answer also holds "exact_top10": [recall_sample, 10] exact neighbours of the user queries
    (`user_queries(artifacts, work, index.recall_sample, seed)`), which a caller pops to reuse.
    """
    manifest = read_manifest(artifacts)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(artifacts, out, ignore=shutil.ignore_patterns(contract.ARTIFACT_INDEX, contract.ARTIFACT_ITEM_EMBEDDINGS))
    real = np.load(artifacts / contract.ARTIFACT_ITEM_EMBEDDINGS)
    started = time.perf_counter()
    vectors, source = synthetic_catalogue(real, n_items, seed)
    check = neighbour_cosines(real, vectors[len(real):], min(len(real), 2000), seed) if len(source) else {}
    LOG.info("scaled catalogue: %d synthetic vectors drawn in %.1f s; nearest-neighbour cosine p5/p50/p95 trained %s, synthetic %s",
             len(source), time.perf_counter() - started, _fmt(check, "trained"), _fmt(check, "synthetic"))
    ids = np.load(artifacts / contract.ARTIFACT_ITEM_IDS)
    new_ids = np.concatenate([ids, ids.max() + 1 + np.arange(len(source), dtype=np.int64)])
    np.save(out / contract.ARTIFACT_ITEM_EMBEDDINGS, vectors)
    np.save(out / contract.ARTIFACT_ITEM_IDS, new_ids)
    features = pd.read_parquet(artifacts / contract.ARTIFACT_ITEM_FEATURES)
    copies = features.iloc[source].assign(**{features.columns[0]: new_ids[len(ids):]})
    pd.concat([features, copies], ignore_index=True).to_parquet(out / contract.ARTIFACT_ITEM_FEATURES, index=False)
    queries = user_queries(artifacts, work, index.recall_sample, seed)
    started = time.perf_counter()
    exact = exact_top_k(queries, vectors, 10)  # kept for the index comparison over the same queries
    LOG.info("scaled catalogue: exact top-10 of %d queries over %d items in %.1f s", len(queries), len(vectors), time.perf_counter() - started)
    built, report = build_checked_index(vectors, queries, index, exact)
    faiss.write_index(built, str(out / contract.ARTIFACT_INDEX))
    del built, vectors
    generator = {"kind": "gaussian_mixture", "components": MIXTURE_COMPONENTS, "covariance_shrink": COVARIANCE_SHRINK}
    manifest["counts"]["items"] = len(new_ids)
    manifest["index"] = report.__dict__
    manifest["scaled"] = {"real_items": len(real), "synthetic_items": len(source), "generator": generator, "seed": seed}
    manifest["files"] = file_digests(out, REQUIRED_FILES)  # the rewritten files, checked again on load
    (out / contract.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    LOG.info("scaled catalogue: %d trained + %d synthetic items, index %s", len(real), len(source), report.factory)
    return {"real_items": len(real), "synthetic_items": len(source), "generator": generator, "check": check, "index": report.__dict__,
            "exact_top10": exact}


def _fmt(check: dict, name: str) -> str:
    return "/".join(f"{v:.3f}" for v in check[name]["nn_cosine_p5_p50_p95"]) if check else "-"
