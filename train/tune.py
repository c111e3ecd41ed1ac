"""`make tune`: a small, bounded search over what matters for in-batch softmax retrieval.

Trials train the two-tower model on the training split and score it on the tuning users only
(`eval.tune_fraction` of the users with held-out positives; the reported users are never
looked at). Trial 0 is the configuration as given; the others draw settings from `SPACE`
(seeded, no repeats) until `trials` or `budget_s` is spent. The best trial's configuration is
written as YAML, ready for `make train CONFIG=...`, with a table of every trial beside it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from common.config import PipelineConfig, load_config

LOG = logging.getLogger(__name__)

# Setting -> values tried. Temperature and the logQ weight shape the in-batch softmax; the
# masking rates train the rows of new users; the embedding size and learning rate set capacity
# and pace; the history length how much of a user's past the query pools (epochs are chosen by
# early stopping on the tuning users within each trial).
SPACE: dict[str, tuple] = {
    "train.temperature": (0.03, 0.05, 0.1, 0.2),
    "train.logq_correction": (0.0, 0.5, 1.0),
    "train.embedding_dim": (16, 32, 64),
    "train.learning_rate": (0.002, 0.005, 0.01),
    "train.mask_user_id": (0.0, 0.1, 0.2),
    "train.mask_features": (0.0, 0.05, 0.1),
    "train.dropout": (0.0, 0.2),
    "train.history_length": (0, 10, 20, 50),
}


def draw_trials(n: int, seed: int) -> list[dict[str, object]]:
    """Trial 0 changes nothing; the rest are distinct seeded draws from SPACE."""
    rng = np.random.default_rng(seed)
    trials, seen = [{}], set()
    combos = 1
    for values in SPACE.values():
        combos *= len(values)
    for _ in itertools.count():
        if len(trials) >= min(n, combos + 1):
            break
        pick = {name: values[rng.integers(len(values))] for name, values in SPACE.items()}
        key = tuple(sorted(pick.items()))
        if key not in seen:
            seen.add(key)
            trials.append(pick)
    return trials


def _overrides(trial: dict[str, object]) -> list[str]:
    return [f"{name}={value}" for name, value in trial.items()]


def run_tuning(cfg: PipelineConfig, work_dir: str | Path, out_path: str | Path, trials: int = 8, budget_s: float = 1800.0,
               seed: int = 0) -> dict:
    """Runs the search and writes the chosen configuration to `out_path` (and a report beside it).

    Returns:
        {"trials": [{"settings", "tune_recall@k", "best_epoch", "seconds"}], "best": index, "config": path}.
    """
    from train import etl as etl_stage
    from train.data import prepare_data
    from train.fit import load_tables, train_two_tower
    from train.pipeline import DATA_DIR, ETL_DIR, evaluation_users

    work, out = Path(work_dir), Path(out_path)
    paths = prepare_data(cfg.data, work / DATA_DIR)
    etl_stage.run_etl(cfg.data, paths["train"], paths["valid"], work / ETL_DIR)
    tables = load_tables(work / ETL_DIR, cfg.data)
    tune, _ = evaluation_users(cfg, tables)
    k = cfg.train.eval_ks[0]
    results, started = [], time.perf_counter()
    for i, trial in enumerate(draw_trials(trials, seed)):
        if i >= 2 and time.perf_counter() - started > budget_s:
            LOG.warning("tuning stopped by its %.0f s budget after %d trials", budget_s, i)
            break
        trial_cfg = load_config(overrides=_overrides(trial), base=cfg, environ={})
        t = time.perf_counter()
        result = train_two_tower(trial_cfg.train, cfg.data, work / ETL_DIR, tables, tune)
        recall = max(h[f"tune_recall@{k}"] for h in result.history)
        results.append({"settings": trial, f"tune_recall@{k}": recall, "best_epoch": result.best_epoch,
                        "seconds": time.perf_counter() - t})
        LOG.info("trial %d/%d: tuning recall@%d %.4f (%s)", i + 1, trials, k, recall, trial or "as configured")
        del result
    best = int(np.argmax([r[f"tune_recall@{k}"] for r in results]))
    chosen = load_config(overrides=_overrides(results[best]["settings"]), base=cfg, environ={})
    body = {s: v for s, v in chosen.to_dict().items() if s != "serve"}
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Chosen by `make tune` on {tune.n_users} tuning users: trial {best + 1} of {len(results)}, "
              f"tuning recall@{k} {results[best][f'tune_recall@{k}']:.4f} (trial 1, as configured: {results[0][f'tune_recall@{k}']:.4f}).\n")
    out.write_text(header + yaml.safe_dump(json.loads(json.dumps(body)), sort_keys=False))
    report = {"tuning_users": tune.n_users, "trials": results, "best": best, "config": str(out)}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"| trial | tuning recall@{k} | best epoch | seconds | settings |", "|---|---|---|---|---|"]
    for i, r in enumerate(results):
        mark = " **chosen**" if i == best else ""
        lines.append(f"| {i + 1}{mark} | {r[f'tune_recall@{k}']:.4f} | {r['best_epoch']} | {r['seconds']:.0f} | "
                     f"{', '.join(f'{n}={v}' for n, v in r['settings'].items()) or 'as configured'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    LOG.info("tuning: chose trial %d (tuning recall@%d %.4f vs %.4f as configured); wrote %s\n%s", best + 1, k,
             results[best][f"tune_recall@{k}"], results[0][f"tune_recall@{k}"], out, "\n".join(lines))
    return report
