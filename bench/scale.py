"""A copy of an artifacts folder whose catalogue is scaled up with synthetic item vectors.

The trained catalogue has a few thousand items; serving speed matters at a million. Items beyond
the trained ones are synthetic: each is a trained item's embedding plus Gaussian noise of norm
`noise` (cosine about 0.86 to its source at the default), renormalized, with a fresh raw id and
its source's features. The index is rebuilt over all of them with the usual recall check
against exact search, measured with real user queries.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from common import contract
from common.config import IndexConfig
from common.manifest import REQUIRED_FILES, file_digests, read_manifest
from train.index import build_checked_index

LOG = logging.getLogger(__name__)


def synthetic_catalogue(real: np.ndarray, n_items: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """([n_items, d] unit vectors whose first rows are `real`, [n_items - len(real)] source rows)."""
    rng = np.random.default_rng(seed)
    extra = max(0, n_items - len(real))
    source = rng.integers(0, len(real), extra)
    out = np.empty((len(real) + extra, real.shape[1]), np.float32)
    out[: len(real)] = real
    for start in range(0, extra, 200_000):
        rows = source[start : start + 200_000]
        v = real[rows] + rng.standard_normal((len(rows), real.shape[1]), dtype=np.float32) * (noise / np.sqrt(real.shape[1]))
        out[len(real) + start : len(real) + start + len(rows)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, source


def user_queries(artifacts: Path, work: Path, n: int, seed: int) -> np.ndarray:
    """Query embeddings of real training users, from the compiled tower (as served)."""
    from ensemble.ops.tower import NumpyTower

    with np.load(artifacts / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        tower = NumpyTower({k: arrays[k] for k in arrays.files})
    users = pd.read_parquet(work / "etl" / "users_encoded.parquet")
    users = users.sample(min(n, len(users)), random_state=seed)
    return tower.embed({c: users[c].to_numpy() for c in users.columns})


def scale_artifacts(artifacts: Path, work: Path, out: Path, n_items: int, index: IndexConfig,
                    noise: float = 0.6, seed: int = 0) -> dict:
    """Writes the scaled artifacts folder and returns what was done (for the report)."""
    manifest = read_manifest(artifacts)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(artifacts, out, ignore=shutil.ignore_patterns(contract.ARTIFACT_INDEX, contract.ARTIFACT_ITEM_EMBEDDINGS))
    real = np.load(artifacts / contract.ARTIFACT_ITEM_EMBEDDINGS)
    vectors, source = synthetic_catalogue(real, n_items, noise, seed)
    ids = np.load(artifacts / contract.ARTIFACT_ITEM_IDS)
    new_ids = np.concatenate([ids, ids.max() + 1 + np.arange(len(source), dtype=np.int64)])
    np.save(out / contract.ARTIFACT_ITEM_EMBEDDINGS, vectors)
    np.save(out / contract.ARTIFACT_ITEM_IDS, new_ids)
    features = pd.read_parquet(artifacts / contract.ARTIFACT_ITEM_FEATURES)
    copies = features.iloc[source].assign(**{features.columns[0]: new_ids[len(ids):]})
    pd.concat([features, copies], ignore_index=True).to_parquet(out / contract.ARTIFACT_ITEM_FEATURES, index=False)
    built, report = build_checked_index(vectors, user_queries(artifacts, work, index.recall_sample, seed), index)
    faiss.write_index(built, str(out / contract.ARTIFACT_INDEX))
    manifest["counts"]["items"] = len(vectors)
    manifest["index"] = report.__dict__
    manifest["scaled"] = {"real_items": len(real), "synthetic_items": len(source), "noise": noise, "seed": seed}
    manifest["files"] = file_digests(out, REQUIRED_FILES)  # the rewritten files, checked again on load
    (out / contract.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    LOG.info("scaled catalogue: %d trained + %d synthetic items, index %s", len(real), len(source), report.factory)
    return {"real_items": len(real), "synthetic_items": len(source), "noise": noise, "index": report.__dict__}
