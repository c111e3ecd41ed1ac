"""Full-catalogue evaluation: Recall, NDCG and MRR at K over every item, for the model and baselines.

Every method ranks the same catalogue (the items of the training split) for the same users, with
the same exclusions (items the user clicked in training). Held-out positives whose item is not
in the catalogue stay in the denominator: no method can retrieve them, and none is excused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from common.progress import progress_bar

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


BLOCK_ELEMENTS = 1 << 26  # scores held at once by `top_k` (float32: 256 MiB), whatever the catalogue size


def _best_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, k] column indices of each row's k largest scores, best first (ties: lower index first).

    TensorFlow's top_k is a partial sort on every core; numpy's argpartition sorts on one and
    needs an int64 copy of the whole block.
    """
    import tensorflow as tf

    return tf.math.top_k(scores, k=k, sorted=True).indices.numpy().astype(np.int64)


def top_k(scorer: Scorer, data: EvalSet, k: int, chunk: int | None = None, desc: str = "") -> np.ndarray:
    """[n, k] catalogue rows of the best k unseen items per user, best first.

    Scores are float32 and scored in blocks of at most BLOCK_ELEMENTS, so memory does not grow
    with the number of users and stays bounded at any catalogue size.
    """
    n_items = data.positives.shape[1]
    k = min(k, n_items)
    chunk = chunk or max(1, min(1024, BLOCK_ELEMENTS // max(n_items, 1)))
    out = np.empty((data.n_users, k), dtype=np.int64)
    with progress_bar(data.n_users * n_items, f"ranking {desc}".strip(), "scores", min_total=1 << 32) as bar:
        for start in range(0, data.n_users, chunk):
            stop = min(start + chunk, data.n_users)
            scores = np.asarray(scorer(data.user_rows[start:stop]), dtype=np.float32)
            if not (scores.flags.owndata and scores.flags.writeable):
                scores = scores.copy()  # never write into a scorer's own array
            seen = data.seen[start:stop].tocoo()
            scores[seen.row, seen.col] = -np.inf
            out[start:stop] = _best_k(scores, k)
            bar.update((stop - start) * n_items)
    return out


def _hits(ranked: np.ndarray, data: EvalSet) -> np.ndarray:
    """[n, k] whether each ranked item is one of the user's held-out positives (no per-user loop)."""
    n_items = np.int64(data.positives.shape[1])
    pos = data.positives.tocoo()
    held = np.sort(pos.row.astype(np.int64) * n_items + pos.col)
    keys = np.arange(len(ranked), dtype=np.int64)[:, None] * n_items + ranked
    at = np.minimum(np.searchsorted(held, keys), max(len(held) - 1, 0))
    return (held[at] == keys) if len(held) else np.zeros(ranked.shape, dtype=bool)


def per_user_metrics(ranked: np.ndarray, data: EvalSet, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Recall@K, NDCG@K and MRR@K per user ([n] each) from ranked catalogue rows [n, >= max(ks)]."""
    hits = _hits(ranked, data)
    discounts = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    ideal_cum = np.cumsum(discounts)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), ranked.shape[1])
    out = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = h.sum(axis=1) / data.n_positives
        ideal = ideal_cum[np.minimum(data.n_positives, k) - 1]
        out[f"ndcg@{k}"] = (h * discounts[:k]).sum(axis=1) / ideal
        out[f"mrr@{k}"] = np.where(first < k, 1.0 / (first + 1), 0.0)
    return out


def rank_metrics(ranked: np.ndarray, data: EvalSet, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K, NDCG@K and MRR@K averaged over users, from ranked catalogue rows [n, >= max(ks)]."""
    return {name: float(values.mean()) for name, values in per_user_metrics(ranked, data, ks).items()}


def recall_curve(ranked: np.ndarray, data: EvalSet) -> list[float]:
    """Recall@K for K = 1..ranked.shape[1]."""
    return (np.cumsum(_hits(ranked, data), axis=1) / data.n_positives[:, None]).mean(axis=0).tolist()


def paired_bootstrap(diff: np.ndarray, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of per-user differences, users resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, (1 << 24) // max(len(diff), 1))
    for start in range(0, resamples, step):
        size = min(step, resamples - start)
        means[start : start + size] = diff[rng.integers(0, len(diff), (size, len(diff)))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def evaluate_methods(
    scorers: dict[str, Scorer | Sequence[Scorer]],
    data: EvalSet,
    ks: tuple[int, ...],
    reference: str = "two_tower",
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Ranks the catalogue with every scorer (one per seed) and compares each with `reference`.

    Args:
        scorers: method -> a scorer, or one scorer per seed (the table shows their mean).
        data: the reported users.
        ks: cut-offs.
        reference: the method every other is compared with, user by user.
        bootstrap: resamples of the paired bootstrap.
        confidence: coverage of its intervals.
        seed: the bootstrap's seed.

    Returns:
        n_users, n_items, ks, methods (name -> metric -> mean over seeds), per_seed (name ->
        one metrics dict per seed), recall_curves (mean over seeds), and comparisons (method ->
        metric -> reference minus method: diff, lo, hi, ratio, verdict).
    """
    table, per_seed, curves, per_user = {}, {}, {}, {}
    kmax = max(ks)
    for name, scorer in scorers.items():
        runs = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer]
        seeds_metrics, seeds_curves = [], []
        for i, run in enumerate(runs):
            ranked = top_k(run, data, kmax, desc=f"{name} seed {i + 1}/{len(runs)}")
            values = per_user_metrics(ranked, data, ks)
            seeds_metrics.append(values)
            seeds_curves.append(recall_curve(ranked, data))
        per_user[name] = {m: np.mean([v[m] for v in seeds_metrics], axis=0) for m in seeds_metrics[0]}
        table[name] = {m: float(v.mean()) for m, v in per_user[name].items()}
        per_seed[name] = [{m: float(v.mean()) for m, v in values.items()} for values in seeds_metrics]
        curves[name] = np.mean(seeds_curves, axis=0).tolist()
        LOG.info("%-10s %s (%d seed%s)", name, "  ".join(f"{m}={v:.4f}" for m, v in table[name].items() if m.endswith(f"@{ks[0]}")),
                 len(runs), "s" if len(runs) > 1 else "")
    comparisons = {}
    if reference in per_user:
        for name in per_user:
            if name == reference:
                continue
            comparisons[name] = {}
            for metric in (f"recall@{ks[0]}", f"ndcg@{ks[0]}"):
                diff = per_user[reference][metric] - per_user[name][metric]
                lo, hi = paired_bootstrap(diff, bootstrap, confidence, seed)
                ours, theirs = table[reference][metric], table[name][metric]
                word = "reaches" if name == "oracle" else "BEATS" if lo > 0 else "LOSES TO" if hi < 0 else "TIES"
                comparisons[name][metric] = {
                    "diff": float(diff.mean()), "lo": lo, "hi": hi, "confidence": confidence,
                    "ratio": ours / theirs if theirs > 0 else float("inf"), "verdict": word,
                }
    return {
        "n_users": data.n_users, "n_items": int(data.positives.shape[1]), "ks": list(ks), "methods": table,
        "per_seed": per_seed, "recall_curves": curves, "reference": reference, "comparisons": comparisons,
    }


# ----- baselines ---------------------------------------------------------------------------------


def embedding_scorer(queries: np.ndarray, items: np.ndarray) -> Scorer:
    """Dot products between query rows [n_users, d] and item rows [n_items, d]."""
    return lambda rows: queries[rows] @ items.T


def random_scorer(n_items: int, seed: int) -> Scorer:
    rng = np.random.default_rng(seed)
    return lambda rows: rng.random((len(rows), n_items), dtype=np.float32)


def popularity_scorer(train_counts: sp.csr_matrix) -> Scorer:
    """Ranks by training positives per item, the same list for everyone."""
    pop = np.asarray(train_counts.sum(axis=0)).ravel().astype(np.float64)
    return lambda rows: np.broadcast_to(pop, (len(rows), len(pop)))


def als_scorer(train_counts: sp.csr_matrix, factors: int, regularization: float, alpha: float, iterations: int, seed: int) -> Scorer:
    """Matrix factorization with implicit's ALS (CPU), on the training positives."""
    model = fit_als(train_counts, factors, regularization, alpha, iterations, seed)
    return embedding_scorer(np.asarray(model.user_factors), np.asarray(model.item_factors))


def fit_als(train_counts: sp.csr_matrix, factors: int, regularization: float, alpha: float, iterations: int, seed: int):
    """implicit's AlternatingLeastSquares (CPU) fitted on the training positives."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads fight them
        model = AlternatingLeastSquares(
            factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
            random_state=seed, calculate_training_loss=False,
        )
        model.fit(train_counts.tocsr().astype(np.float32), show_progress=False)
    return model


# The ALS grid, likeliest settings first (a time budget may stop it early): (factors, regularization, alpha).
ALS_GRID = (
    (64, 0.1, 10.0), (64, 0.01, 1.0), (32, 0.1, 10.0), (64, 0.1, 40.0), (32, 0.01, 1.0), (64, 0.01, 10.0),
    (32, 0.1, 40.0), (64, 0.1, 1.0), (32, 0.01, 10.0), (64, 0.01, 40.0), (32, 0.1, 1.0), (32, 0.01, 40.0),
)
ALS_ITERATIONS = 15


def tuned_als_scorer(train_counts: sp.csr_matrix, tune: EvalSet, seed: int, k: int = 10, budget_s: float = float("inf")) -> tuple[Scorer, dict]:
    """ALS with its confidence weight and factors picked on the tuning users (a fair baseline).

    Settings are tried in ALS_GRID's order until the grid or `budget_s` is spent (one always runs).
    """
    best, best_params, best_recall = None, {}, -1.0
    started = time.perf_counter()
    tried = 0
    for factors, regularization, alpha in ALS_GRID:
        if tried and time.perf_counter() - started > budget_s:
            LOG.warning("ALS tuning stopped by its %.0f s budget after %d of %d settings", budget_s, tried, len(ALS_GRID))
            break
        params = dict(factors=factors, regularization=regularization, alpha=alpha, iterations=ALS_ITERATIONS)
        scorer = als_scorer(train_counts, seed=seed, **params)
        recall = rank_metrics(top_k(scorer, tune, k), tune, (k,))[f"recall@{k}"]
        tried += 1
        if recall > best_recall:
            best, best_params, best_recall = scorer, params, recall
    LOG.info("ALS tuned on %d users in %.0f s (%d settings): %s (recall@%d %.4f)",
             tune.n_users, time.perf_counter() - started, tried, best_params, k, best_recall)
    return best, {**best_params, "settings_tried": tried}


def split_tune_eval(data: EvalSet, seed: int, tune_fraction: float = 0.5, max_tune: int | None = None,
                    max_report: int | None = None) -> tuple[EvalSet, EvalSet]:
    """Splits the evaluation users into disjoint tuning and reported users, each a seeded sample.

    A `tune_fraction` share tunes (early stopping, ALS), at most `max_tune` of them; the rest are
    reported, at most `max_report` of them.
    """
    order = np.random.default_rng(seed).permutation(data.n_users)
    n_tune = int(data.n_users * tune_fraction)
    tune_rows, report_rows = order[:n_tune][:max_tune], order[n_tune:][:max_report]
    tune = np.zeros(data.n_users, dtype=bool)
    report = np.zeros(data.n_users, dtype=bool)
    tune[tune_rows] = True
    report[report_rows] = True
    return data.subset(tune), data.subset(report)


# ----- report ------------------------------------------------------------------------------------


def verdicts(report: dict, k: int | None = None) -> list[str]:
    """One line per baseline: does the two-tower model beat it at Recall@k, with the interval.

    BEATS / LOSES TO only when the paired bootstrap interval excludes zero; TIES otherwise.
    """
    methods, reference = report["methods"], report.get("reference", "two_tower")
    if reference not in methods:
        return []
    k = k or report["ks"][0]
    metric = f"recall@{k}"
    ours = methods[reference][metric]
    lines = []
    for name, row in methods.items():
        if name == reference:
            continue
        theirs = row[metric]
        c = report.get("comparisons", {}).get(name, {}).get(metric)
        if c is None:  # a report without intervals (written before they existed)
            word = "reaches" if name == "oracle" else "BEATS" if ours > theirs else "LOSES TO"
            ratio = ours / theirs if theirs > 0 else float("inf")
            lines.append(f"{reference} {word} {name}: {metric} {ours:.4f} vs {theirs:.4f} ({ratio:.2f}x)")
            continue
        lines.append(
            f"{reference} {c['verdict']} {name}: {metric} {ours:.4f} vs {theirs:.4f} ({c['ratio']:.2f}x; difference "
            f"{c['diff']:+.4f}, {c['confidence']:.0%} interval {c['lo']:+.4f} to {c['hi']:+.4f})"
        )
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
    cold = ""
    for key in ("cold_start", "cold_start_history"):
        if key in report:
            c = report[key]
            cold += (f"\n## Cold start: {c['n_users']} users kept out of training, history: {c.get('history', 'none')}\n\n"
                     + format_table(c) + "\n\n" + "\n".join(verdicts(c)) + "\n")
    paths["md"].write_text(banner + format_table(report) + "\n\n" + "\n".join(verdicts(report)) + "\n" + cold)
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
