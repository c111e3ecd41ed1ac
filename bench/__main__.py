"""`make bench`: our ensemble, the Merlin reference, Triton's floor and the in-process path, side by side.

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
from common.config import IndexConfig

LOG = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, type=Path, help="trained artifacts (make train)")
    parser.add_argument("--work", required=True, type=Path, help="the training work folder (for user queries)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report and the scaled repositories")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size to serve")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated perf_analyzer concurrencies")
    parser.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--index-kinds", default="flat,ivf,hnsw", help="index kinds to compare (empty: skip)")
    parser.add_argument("--tools", type=Path, default=Path(".tools/perf_analyzer"), help="where perf_analyzer is unpacked")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from bench import indexes, reference, report, scale, systems, train_speed, trivial
    from common.manifest import artifacts_config, read_manifest
    from ensemble.build import build_repository

    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    manifest = read_manifest(args.artifacts)
    cfg = artifacts_config(manifest)

    scaled = out / "artifacts_scaled"
    catalogue = scale.scale_artifacts(args.artifacts, args.work, scaled, args.items, IndexConfig(), seed=args.seed)
    kinds = tuple(k for k in args.index_kinds.split(",") if k)
    index_rows = []
    if kinds:
        vectors = np.load(scaled / "item_embeddings.npy")
        queries = scale.user_queries(args.artifacts, args.work, 500, args.seed)
        index_rows = indexes.compare_indexes(vectors, queries, kinds)
        del vectors

    repos = {name: out / f"repo_{name}" for name in ("ours", "reference", "trivial")}
    for path in repos.values():
        shutil.rmtree(path, ignore_errors=True)
    build_repository(scaled, repos["ours"])
    reference.build_reference_repository(scaled, repos["reference"], out / "reference_scratch", cfg.data)
    trivial.build_trivial_repository(repos["trivial"])

    n_rows = 1000
    ours_rows, ours_shapes = systems.our_inputs(args.artifacts, n_rows, args.seed)
    ref_rows, ref_shapes = systems.reference_inputs(args.artifacts, n_rows, args.seed)
    results = {
        "trivial": systems.sweep_server("trivial", repos["trivial"], trivial.MODEL, ours_rows, ours_shapes, concurrencies,
                                        args.tools, out / "perf", args.measurement_ms),
        "ours": systems.sweep_server("ours", repos["ours"], "retrieval", ours_rows, ours_shapes, concurrencies,
                                     args.tools, out / "perf", args.measurement_ms),
        "reference": systems.sweep_server("reference", repos["reference"], reference.MODEL, ref_rows, ref_shapes, concurrencies,
                                          args.tools, out / "perf", args.measurement_ms),
        "in_process": systems.in_process(repos["ours"], args.artifacts, 3000, args.seed),
    }
    training = {"ours": train_speed.ours_from_manifest(manifest), "seed": train_speed.seed_fit_examples_per_s(args.work / "etl")}
    full = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "catalogue": catalogue, "indexes": index_rows, "systems": results, "training": training,
        "settings": {"concurrency": concurrencies, "measurement_ms": args.measurement_ms, "items": args.items},
    }
    paths = report.save(full, out)
    print(paths["md"].read_text())
    LOG.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    run_cli(main)
