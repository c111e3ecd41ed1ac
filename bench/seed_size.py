"""Serving at the seed's size: the trained catalogue, every user and every click, embedded and in Redis.

    python -m bench.seed_size --artifacts build/scale/artifacts --out build/scale/serving

For the artifacts of `make train CONFIG=configs/aliccp-scale.yaml` (about 200,000 users, 490,000
trained items, 4 million training clicks) it measures, on the real catalogue (no synthetic padding):
the repository build, the in-process load (seconds, RSS, the query cache's note) and one-user requests in-process; then
tritonserver's readiness, memory (server plus stubs) and perf_analyzer at concurrency 1, with the
user features embedded and with them in a Redis of its own (materialize seconds too). Writes
`seed_size.json` and `seed_size.md` into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import psutil

from common.cli import run_cli

LOG = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.seed_size", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, type=Path, help="trained artifacts (the seed-size preset's)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the repositories and the report")
    parser.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--requests", type=int, default=2000, help="in-process one-user requests timed")
    parser.add_argument("--tools", type=Path, default=Path(".tools/perf_analyzer"), help="where perf_analyzer is unpacked")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis-backed run")
    return parser.parse_args(argv)


def _timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def main(argv=None) -> int:
    from bench import systems
    from client.scenarios import RedisServer
    from common.manifest import artifacts_config, read_manifest
    from ensemble.build import build_repository
    from ensemble.loader import load_model_in_process, store_namespace
    from ensemble.redis_store import materialize

    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(args.artifacts)
    cfg = artifacts_config(manifest)
    report = {"counts": manifest["counts"], "index": {k: manifest["index"][k] for k in ("kind", "factory", "recall_at_10", "bytes")}}

    repo = out / "repo_embedded"
    shutil.rmtree(repo, ignore_errors=True)
    _, report["build_s"] = _timed(build_repository, args.artifacts, repo, cfg=cfg)
    rss_before = psutil.Process().memory_info().rss / 2**20
    executor, report["in_process_load_s"] = _timed(load_model_in_process, repo)
    report["in_process_load_rss_mb"] = psutil.Process().memory_info().rss / 2**20 - rss_before  # what the loaded model holds
    report["query_cache"] = {"embedded": executor.cache_note}
    del executor
    report["in_process"] = systems.in_process(repo, args.artifacts, args.requests, 0)
    LOG.info("in-process: p50 %.2f ms (%s; query cache %s)", report["in_process"]["p50_ms"],
             ", ".join(f"{k} {v:.3f}" for k, v in report["in_process"]["stage_ms"].items()), report["in_process"]["query_cache"])

    rows, shapes = systems.our_inputs(args.artifacts, 1000, 0)
    report["embedded"] = systems.sweep_server("seed_embedded", repo, "retrieval", rows, shapes, [1], args.tools, out / "perf", args.measurement_ms)

    if not args.no_redis:
        redis = RedisServer(out).start()
        try:
            cols = manifest["columns"]
            n, report["materialize_s"] = _timed(materialize, redis.url, store_namespace(manifest), args.artifacts / "user_features.parquet",
                                                 cols["user_id"], tuple(cols["user_features"]), history_length=cfg.train.history_length)
            report["materialized_users"] = n
            redis_repo = out / "repo_redis"
            shutil.rmtree(redis_repo, ignore_errors=True)
            redis_cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, feature_store=redis.url))
            build_repository(args.artifacts, redis_repo, cfg=redis_cfg)
            report["query_cache"]["redis"] = load_model_in_process(redis_repo).cache_note
            report["redis"] = systems.sweep_server("seed_redis", redis_repo, "retrieval", rows, shapes, [1], args.tools, out / "perf",
                                                   args.measurement_ms)
        finally:
            redis.stop()

    (out / "seed_size.json").write_text(json.dumps(report, indent=2, default=str))
    text = format_report(report)
    (out / "seed_size.md").write_text(text + "\n")
    print(text)
    return 0


def format_report(report: dict) -> str:
    """The seed-size serving table as markdown (the Redis column is empty when it was skipped)."""
    def row(label: str, embedded: str, redis: str = "") -> str:
        return f"| {label} | {embedded} | {redis} |"

    def server(key: str, fmt: str) -> tuple[str, str]:
        return tuple(fmt.format(**_server_figures(report[k])) if k in report else "" for k in ("embedded", "redis"))

    c, index = report["counts"], report["index"]
    lines = [
        f"Catalogue {c['items']:,} trained items, {c['users']:,} users, {c['train_positives']:,} training clicks; "
        f"index {index['factory']} (recall@10 {index['recall_at_10']:.3f}, {index['bytes'] / 2**20:,.0f} MiB).",
        "",
        "| measure | embedded user features | Redis user features |",
        "|---|---|---|",
        row("repository build", f"{report['build_s']:.1f} s"),
        row("in-process load", f"{report['in_process_load_s']:.1f} s, +{report['in_process_load_rss_mb']:,.0f} MiB"),
        row("in-process p50, one user per request", f"{report['in_process']['p50_ms']:.2f} ms"),
        row("query cache (stored users' queries, at load)", *(report["query_cache"].get(k, "") for k in ("embedded", "redis"))),
    ]
    if "redis" in report:
        lines.append(row("materialize into Redis", "", f"{report['materialize_s']:.1f} s ({report['materialized_users']:,} users)"))
    lines += [
        row("tritonserver ready", *server("ready", "{ready_s:.1f} s")),
        row("server + stubs RSS", *server("rss", "{rss_mb:,.0f} MiB")),
        row("c=1 p50 / p99 (perf_analyzer, gRPC)", *server("p50", "{p50_ms:.2f} / {p99_ms:.2f} ms")),
        row("c=1 throughput", *server("throughput", "{throughput:,.0f} infer/s")),
    ]
    return "\n".join(lines)


def _server_figures(result: dict) -> dict:
    first = result["sweep"][0]
    return {"ready_s": result["ready_s"], "rss_mb": result["memory_mb"]["total"], "p50_ms": first["p50_ms"],
            "p99_ms": first["p99_ms"], "throughput": first["throughput"]}


if __name__ == "__main__":
    run_cli(main)
