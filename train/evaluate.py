"""Full-catalogue evaluation: Recall, NDCG and MRR at K over every item, for the model and baselines.

Every method ranks the same catalogue (the items of the training split) for the same users, with
the same exclusions (items the user clicked in training). Held-out positives whose item is not
in the catalogue stay in the denominator: no method can retrieve them, and none is excused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

LOG = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], np.ndarray]  # user rows [c] -> scores [c, n_items]


@dataclass(frozen=True)
class EvalSet:
    """Users to evaluate, with what to find and what to leave out.

    Attributes:
        user_rows: [n] rows into the users table (the query tower's inputs).
        positives: [n, n_items] CSR, held-out positive items per user (catalogue rows).
        n_positives: [n] distinct held-out positives per user, out-of-catalogue items included.
        seen: [n, n_items] CSR, training positives per user, excluded from every ranking.
    """

    user_rows: np.ndarray
    positives: sp.csr_matrix
    n_positives: np.ndarray
    seen: sp.csr_matrix

    @property
    def n_users(self) -> int:
        return len(self.user_rows)

    def subset(self, mask: np.ndarray) -> "EvalSet":
        return EvalSet(self.user_rows[mask], self.positives[mask], self.n_positives[mask], self.seen[mask])


def interactions_matrix(user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """[n_users, n_items] CSR of interaction counts; rows with item_row < 0 are dropped."""
    keep = item_rows >= 0
    data = np.ones(int(keep.sum()), dtype=np.float32)
    m = sp.csr_matrix((data, (user_rows[keep], item_rows[keep])), shape=(n_users, n_items))
    m.sum_duplicates()
    return m


def build_eval_set(
    train_users: np.ndarray, train_items: np.ndarray, valid_users: np.ndarray, valid_items: np.ndarray, n_users: int, n_items: int
) -> EvalSet:
    """Builds the evaluation set from positives given as (user row, item row) pairs.

    Item rows of -1 are held-out positives outside the catalogue. Users without a held-out
    positive are not evaluated.
    """
    seen_all = interactions_matrix(train_users, train_items, n_users, n_items)
    pairs = np.unique(np.stack([valid_users, valid_items], axis=1), axis=0)
    users = np.unique(pairs[:, 0])
    pos_row = np.searchsorted(users, pairs[:, 0])
    n_positives = np.bincount(pos_row, minlength=len(users))
    positives = interactions_matrix(pos_row, pairs[:, 1], len(users), n_items)
    positives.data[:] = 1.0
    return EvalSet(users, positives, n_positives, seen_all[users])


def top_k(scorer: Scorer, data: EvalSet, k: int, chunk: int = 512) -> np.ndarray:
    """[n, k] catalogue rows of the best k unseen items per user, best first."""
    k = min(k, data.positives.shape[1])
    out = np.empty((data.n_users, k), dtype=np.int64)
    for start in range(0, data.n_users, chunk):
        stop = min(start + chunk, data.n_users)
        scores = np.array(scorer(data.user_rows[start:stop]), dtype=np.float64, copy=True)
        seen = data.seen[start:stop].tocoo()
        scores[seen.row, seen.col] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start:stop] = np.take_along_axis(part, order, axis=1)
    return out


def rank_metrics(ranked: np.ndarray, data: EvalSet, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K, NDCG@K and MRR@K averaged over users, from ranked catalogue rows [n, >= max(ks)]."""
    hits = np.zeros(ranked.shape, dtype=bool)
    for i in range(data.n_users):
        lo, hi = data.positives.indptr[i], data.positives.indptr[i + 1]
        hits[i] = np.isin(ranked[i], data.positives.indices[lo:hi])
    discounts = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), ranked.shape[1])
    out = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = float(np.mean(h.sum(axis=1) / data.n_positives))
        ideal = np.array([discounts[: min(n, k)].sum() for n in data.n_positives])
        out[f"ndcg@{k}"] = float(np.mean((h * discounts[:k]).sum(axis=1) / ideal))
        out[f"mrr@{k}"] = float(np.mean(np.where(first < k, 1.0 / (first + 1), 0.0)))
    return out


def recall_curve(ranked: np.ndarray, data: EvalSet) -> list[float]:
    """Recall@K for K = 1..ranked.shape[1]."""
    hits = np.zeros(ranked.shape, dtype=bool)
    for i in range(data.n_users):
        lo, hi = data.positives.indptr[i], data.positives.indptr[i + 1]
        hits[i] = np.isin(ranked[i], data.positives.indices[lo:hi])
    return (np.cumsum(hits, axis=1) / data.n_positives[:, None]).mean(axis=0).tolist()


def evaluate_methods(scorers: dict[str, Scorer], data: EvalSet, ks: tuple[int, ...]) -> dict:
    """Ranks the catalogue with every scorer and returns the metrics table and Recall@K curves."""
    table, curves = {}, {}
    kmax = max(ks)
    for name, scorer in scorers.items():
        ranked = top_k(scorer, data, kmax)
        table[name] = rank_metrics(ranked, data, ks)
        curves[name] = recall_curve(ranked, data)
        LOG.info("%-10s %s", name, "  ".join(f"{m}={v:.4f}" for m, v in table[name].items() if m.endswith(f"@{ks[0]}")))
    return {"n_users": data.n_users, "n_items": int(data.positives.shape[1]), "ks": list(ks), "methods": table, "recall_curves": curves}


# ----- baselines ---------------------------------------------------------------------------------


def embedding_scorer(queries: np.ndarray, items: np.ndarray) -> Scorer:
    """Dot products between query rows [n_users, d] and item rows [n_items, d]."""
    return lambda rows: queries[rows] @ items.T


def random_scorer(n_items: int, seed: int) -> Scorer:
    rng = np.random.default_rng(seed)
    return lambda rows: rng.random((len(rows), n_items))


def popularity_scorer(train_counts: sp.csr_matrix) -> Scorer:
    """Ranks by training positives per item, the same list for everyone."""
    pop = np.asarray(train_counts.sum(axis=0)).ravel().astype(np.float64)
    return lambda rows: np.broadcast_to(pop, (len(rows), len(pop)))


def als_scorer(train_counts: sp.csr_matrix, factors: int, regularization: float, alpha: float, iterations: int, seed: int) -> Scorer:
    """Matrix factorization with implicit's ALS (CPU), on the training positives."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads fight them
        model = AlternatingLeastSquares(
            factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
            random_state=seed, calculate_training_loss=False,
        )
        model.fit(train_counts.tocsr().astype(np.float32), show_progress=False)
    return embedding_scorer(np.asarray(model.user_factors), np.asarray(model.item_factors))


def tuned_als_scorer(train_counts: sp.csr_matrix, tune: EvalSet, seed: int, k: int = 10) -> tuple[Scorer, dict]:
    """ALS with its confidence weight and factors picked on the tuning users (a fair baseline)."""
    best, best_params, best_recall = None, {}, -1.0
    grid = [(f, r, a) for f in (32, 64) for r in (0.01, 0.1) for a in (1.0, 10.0, 40.0)]
    for factors, regularization, alpha in grid:
        params = dict(factors=factors, regularization=regularization, alpha=alpha, iterations=15)
        scorer = als_scorer(train_counts, seed=seed, **params)
        recall = rank_metrics(top_k(scorer, tune, k), tune, (k,))[f"recall@{k}"]
        if recall > best_recall:
            best, best_params, best_recall = scorer, params, recall
    LOG.info("ALS tuned on %d users: %s (recall@%d %.4f)", tune.n_users, best_params, k, best_recall)
    return best, best_params


def split_tune_eval(data: EvalSet, seed: int) -> tuple[EvalSet, EvalSet]:
    """Halves the evaluation users: one half tunes (early stopping, ALS), the other is reported."""
    rng = np.random.default_rng(seed)
    tune = np.zeros(data.n_users, dtype=bool)
    tune[rng.permutation(data.n_users)[: data.n_users // 2]] = True
    return data.subset(tune), data.subset(~tune)


# ----- report ------------------------------------------------------------------------------------


def verdicts(report: dict, k: int = 10) -> list[str]:
    """One line per baseline saying whether the two-tower model beats it at Recall@k."""
    methods = report["methods"]
    if "two_tower" not in methods:
        return []
    ours = methods["two_tower"][f"recall@{k}"]
    lines = []
    for name, row in methods.items():
        if name == "two_tower":
            continue
        theirs = row[f"recall@{k}"]
        ratio = ours / theirs if theirs > 0 else float("inf")
        word = "BEATS" if ours > theirs else "LOSES TO"
        if name == "oracle":
            word = "reaches"
        lines.append(f"two_tower {word} {name}: recall@{k} {ours:.4f} vs {theirs:.4f} ({ratio:.2f}x)")
    return lines


def format_table(report: dict) -> str:
    """The metrics table as markdown."""
    ks = report["ks"]
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr")]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in report["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def save_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Writes metrics.json, metrics.md and recall_at_k.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "metrics.json", "md": out_dir / "metrics.md", "png": out_dir / "recall_at_k.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    losses = [line for line in verdicts(report) if "LOSES TO" in line]
    banner = "".join(f"**WARNING: {line}**\n\n" for line in losses)
    paths["md"].write_text(banner + format_table(report) + "\n\n" + "\n".join(verdicts(report)) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in report["recall_curves"].items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K (items retrieved, full catalogue)")
    ax.set_ylabel("Recall@K")
    ax.set_title(f"{report['n_users']} users, {report['n_items']} items")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
