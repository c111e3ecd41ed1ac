"""CLI of the training job: `python -m train run --work DIR --out DIR` (see --help)."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import add_config_args, config_from_args, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="data -> ETL -> training -> evaluation -> export")
    run.add_argument("--work", required=True, type=Path, help="folder for raw splits and ETL output")
    run.add_argument("--out", required=True, type=Path, help="artifacts folder to write")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_config_args(run)
    ev = sub.add_parser("evaluate", help="full-catalogue evaluation of exported artifacts against the baselines")
    ev.add_argument("--work", required=True, type=Path, help="the training work folder (splits, ETL output)")
    ev.add_argument("--artifacts", required=True, type=Path, help="artifacts folder to evaluate")
    ev.add_argument("--out", type=Path, help="folder for metrics.json/.md/.png (default: the artifacts folder)")
    tu = sub.add_parser("tune", help="bounded search on the tuning users; writes the chosen config as YAML")
    tu.add_argument("--work", required=True, type=Path, help="folder for raw splits and ETL output")
    tu.add_argument("--out", required=True, type=Path, help="YAML file to write the chosen configuration to")
    tu.add_argument("--trials", type=int, default=8, help="trials, the configuration as given first (default 8)")
    tu.add_argument("--budget-s", type=float, default=1800.0, help="no new trial starts after this many seconds (default 1800)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the settings drawn")
    add_config_args(tu)
    ml = sub.add_parser("fetch-movielens", help="MovieLens-100k (from the recbole wheel on PyPI) as declared-dataset files")
    ml.add_argument("--out", required=True, type=Path, help="folder for interactions.csv, users.csv, items.csv")
    data = sub.add_parser("data", help="only write the raw train/valid splits")
    data.add_argument("--out", required=True, type=Path, help="folder for train.parquet and valid.parquet")
    add_config_args(data)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "evaluate":
        from train.pipeline import evaluate_artifacts

        evaluate_artifacts(args.work, args.artifacts, args.out)
        return 0
    if args.command == "fetch-movielens":
        from train.movielens import fetch_movielens

        fetch_movielens(args.out)
        return 0
    cfg = config_from_args(args)
    if args.command == "tune":
        from train.tune import run_tuning

        run_tuning(cfg, args.work, args.out, args.trials, args.budget_s, args.seed)
        return 0
    if args.command == "data":
        from train.data import prepare_data

        prepare_data(cfg.data, args.out)
        return 0
    from train.pipeline import run_training

    run_training(cfg, args.work, args.out, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
