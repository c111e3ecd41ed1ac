"""`make bench`: our ensemble, the Merlin reference (stock, and given our index and batching), Triton's floor
and the in-process path, side by side; above 1M items, our ensemble at 1M items too, for the scaling ratio.

    python -m bench --artifacts build/artifacts --work build/work --out build/bench --items 1000000
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
from pathlib import Path

import numpy as np

from common.cli import run_cli
from common.config import IndexConfig, ServeConfig

LOG = logging.getLogger(__name__)

BASELINE_ITEMS = 1_000_000  # the catalogue the scaling ratio and the reference rows are measured at


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, type=Path, help="trained artifacts (make train)")
    parser.add_argument("--work", required=True, type=Path, help="the training work folder (for user queries)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report and the scaled repositories")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size to serve")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated perf_analyzer concurrencies")
    parser.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times ours, ours at the baseline catalogue and Triton's floor are measured together (ratio targets per round)")
    parser.add_argument("--index-kinds", default="flat,ivf,ivf_sq,ivf_pq,hnsw",
                        help="index kinds to compare (empty: skip); kinds too slow to build at the size are skipped")
    parser.add_argument("--baseline-items", type=int, default=BASELINE_ITEMS,
                        help="catalogue of the reference rows and of the scaling ratio (ours runs at both sizes when --items is larger)")
    parser.add_argument("--recall-queries", type=int, default=300, help="user queries for recall@10 against exact search")
    parser.add_argument("--tools", type=Path, default=Path(".tools/perf_analyzer"), help="where perf_analyzer is unpacked")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from bench import indexes, reference, report, scale, systems, train_speed, trivial
    from common.errors import ConfigError
    from common.manifest import artifacts_config, read_manifest
    from ensemble.build import build_repository

    args = parse_args(argv)
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    manifest = read_manifest(args.artifacts)
    cfg = artifacts_config(manifest)
    if cfg.train.history_length:
        raise ConfigError(
            f"{args.artifacts} was trained with a history input (train.history_length {cfg.train.history_length}); the stock "
            "Merlin reference this benchmark compares with has no way to feed it. Benchmark an export trained with "
            "--set train.history_length=0 (make bench trains one into BENCH_ARTIFACTS when it is missing)")

    index_cfg = IndexConfig(recall_sample=args.recall_queries)
    baseline_items = min(args.items, args.baseline_items)
    scaled = out / "artifacts_scaled"
    catalogue = scale.scale_artifacts(args.artifacts, args.work, scaled, args.items, index_cfg, seed=args.seed)
    exact = catalogue.pop("exact_top10")
    # The stock reference rows run at the baseline size: stock setup_faiss over 10M vectors needs about
    # 9 GB to build and its IVF32 scans 2.5M vectors a query. Ours runs at both sizes for the ratio.
    baseline = scaled
    if args.items > baseline_items:
        baseline = out / "artifacts_baseline"
        catalogue["baseline"] = scale.scale_artifacts(args.artifacts, args.work, baseline, baseline_items, index_cfg, seed=args.seed)
        catalogue["baseline"].pop("exact_top10")
    kinds = tuple(k for k in args.index_kinds.split(",") if k)
    index_rows = []
    if kinds:
        vectors = np.load(scaled / "item_embeddings.npy")
        queries = scale.user_queries(args.artifacts, args.work, args.recall_queries, args.seed)
        index_rows = indexes.compare_indexes(vectors, queries, kinds, served=(scaled / "items.faiss", catalogue["index"]), exact=exact)
        del vectors

    names = ("ours", "ours_baseline", "reference", "reference_our_index", "reference_our_index_batched", "trivial")
    repos = {name: out / f"repo_{name}" for name in names}
    for path in repos.values():
        shutil.rmtree(path, ignore_errors=True)
    build_repository(scaled, repos["ours"])
    if baseline != scaled:
        build_repository(baseline, repos["ours_baseline"])
    scratch = out / "reference_scratch"
    reference.build_reference_repository(baseline, repos["reference"], scratch, cfg.data)
    reference.build_reference_repository(baseline, repos["reference_our_index"], scratch, cfg.data, index_path=baseline / "items.faiss")
    reference.build_reference_repository(baseline, repos["reference_our_index_batched"], scratch, cfg.data,
                                         index_path=baseline / "items.faiss", max_batch_size=ServeConfig().max_batch_size)
    trivial.build_trivial_repository(repos["trivial"])
    catalogue["served_search"] = indexes.served_recall(
        repos["ours"], scale.user_queries(args.artifacts, args.work, args.recall_queries, args.seed), exact)

    n_rows = 1000
    ours_rows, ours_shapes = systems.our_inputs(args.artifacts, n_rows, args.seed)
    ref_rows, ref_shapes = systems.reference_inputs(args.artifacts, n_rows, args.seed)
    perf = out / "perf"

    # The machine's speed drifts by up to 1.7x within minutes: ours, ours at the baseline catalogue
    # and Triton's floor are served together and measured in rounds, each round every system at
    # every concurrency back to back, with the in-process path of the c=1 target timed in the same
    # round, and the ratio targets are taken round by round. The stock references come last.
    paired = {"ours": (repos["ours"], "retrieval"), "trivial": (repos["trivial"], trivial.MODEL)}
    if baseline != scaled:
        paired["ours_baseline"] = (repos["ours_baseline"], "retrieval")
    local = {"in_process_baseline" if baseline != scaled else "in_process":
             systems.InProcess(repos["ours_baseline" if baseline != scaled else "ours"], args.artifacts, 3000, args.seed)}
    results = systems.sweep_servers(paired, ours_rows, ours_shapes, concurrencies, args.tools, perf, args.measurement_ms,
                                    rounds=args.rounds, local=local)
    del local  # the 1M executor, before the 10M one loads
    if baseline != scaled:
        results["in_process"] = systems.in_process(repos["ours"], args.artifacts, 3000, args.seed)
    for name in ("reference", "reference_our_index", "reference_our_index_batched"):
        results[name] = systems.sweep_server(name, repos[name], reference.MODEL, ref_rows, ref_shapes, concurrencies, args.tools, perf,
                                             args.measurement_ms)
    training = {"ours": train_speed.ours_from_manifest(manifest), "seed": train_speed.seed_fit_examples_per_s(args.work / "etl")}
    full = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "catalogue": catalogue, "indexes": index_rows, "systems": results, "training": training,
        "settings": {"concurrency": concurrencies, "measurement_ms": args.measurement_ms, "items": args.items,
                     "baseline_items": baseline_items, "rounds": args.rounds},
    }
    paths = report.save(full, out)
    print(paths["md"].read_text())
    LOG.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    run_cli(main)
