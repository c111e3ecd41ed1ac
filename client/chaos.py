"""`make chaos`: faults under a client loop on a supervised server, each with its measured recovery.

Loopback only, bounded, stops by itself. For every fault it reports requests sent, failed and
answered wrongly, the seconds until good answers resumed, how long readiness said "ready" while
requests failed, and fails when a bound is broken or an answer changed:

  hostile_http        requests that crash tritonserver 2.51's HTTP front end: refused, no restart
  refused_memory      refused 16 MB requests: tritonserver and stub memory stay flat
  grpc_stub_killer    a gRPC request that kills the Python-backend stub: the supervisor recovers
  kill_stub           kill -9 of the stub
  kill_tritonserver   kill -9 of tritonserver
  freeze_tritonserver SIGSTOP of tritonserver (a hung server: Triton's own health never answers)
  redis_stopped       Redis down, then back with its data
  redis_frozen        Redis SIGSTOPped (answers nothing), then SIGCONT
  redis_flushed       Redis loses the export's keys, then they are materialized again
  failed_deploy       a corrupted version and a version that cannot load, under load
  corrupted_artifact  an index overwritten with other bytes of the same size

    python -m client.chaos --repository model_repository --artifacts build/artifacts --out build/chaos [--short]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from client.scenarios import (RedisServer, make_context, corrupted_artifact, failed_deploy, free_config, freeze_tritonserver,
                              grpc_stub_killer, hostile_http, kill_stub, kill_tritonserver, redis_faults, refused_memory)
from common import contract

LOG = logging.getLogger(__name__)


# -- the run -------------------------------------------------------------------------------------


def run_chaos(repository: Path, artifacts: Path, out: Path, short: bool = False) -> dict:
    """Runs every fault; writes chaos.json and chaos.md under `out`; returns the report."""
    from common.manifest import artifacts_config, read_manifest
    from ensemble.build import build_repository
    from ensemble.loader import store_namespace
    from ensemble.redis_store import materialize
    from ensemble.server import TritonServer
    from ensemble.supervisor import SupervisorThread

    out.mkdir(parents=True, exist_ok=True)
    ctx = make_context(repository, artifacts, out, short)
    results = []
    cfg = free_config()
    with SupervisorThread(TritonServer(repository, cfg, log_path=out / "tritonserver.log"), cfg) as sup:
        results += [hostile_http(ctx, sup), refused_memory(ctx, sup)]
        results += [grpc_stub_killer(ctx, sup), kill_stub(ctx, sup), kill_tritonserver(ctx, sup), freeze_tritonserver(ctx, sup)]

    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="chaos-redis-"))).start()
    try:
        manifest = read_manifest(artifacts)
        base = artifacts_config(manifest)
        cols = manifest["columns"]

        def rematerialize():
            materialize(redis_server.url, store_namespace(manifest), artifacts / contract.ARTIFACT_USER_FEATURES,
                        cols["user_id"], tuple(cols["user_features"]), history_length=base.train.history_length)

        rematerialize()
        redis_repo = build_repository(artifacts, out / "redis_repository", overwrite=True, cfg=dataclasses.replace(
            base, serve=dataclasses.replace(base.serve, feature_store=redis_server.url)))
        cfg = free_config()
        with SupervisorThread(TritonServer(redis_repo, cfg, log_path=out / "tritonserver-redis.log"), cfg) as sup:
            results += redis_faults(ctx, sup, redis_server, rematerialize)
    finally:
        redis_server.stop()
        shutil.rmtree(redis_server.folder, ignore_errors=True)

    from ensemble.server import ADMIN_KEY_ENV

    deploy_repo = out / "deploy_repository"
    shutil.rmtree(deploy_repo, ignore_errors=True)
    shutil.copytree(repository, deploy_repo)
    os.environ.setdefault(ADMIN_KEY_ENV, "chaos-" + os.urandom(8).hex())
    cfg = free_config()
    with SupervisorThread(TritonServer(deploy_repo, cfg, log_path=out / "tritonserver-deploy.log", model_control="explicit"), cfg) as sup:
        results.append(failed_deploy(ctx, sup, deploy_repo))
    shutil.rmtree(deploy_repo, ignore_errors=True)
    results.append(corrupted_artifact(ctx))

    report = {"short": short, "bounds": dataclasses.asdict(ctx.bounds), "faults": results, "passed": all(r["passed"] for r in results)}
    (out / "chaos.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "chaos.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["| fault | requests | failed | wrong | s until good answers | ready while failing (s) | verdict |", "|---|---|---|---|---|---|---|"]
    for r in report["faults"]:
        lines.append(f"| {r['fault']} | {r.get('requests', '')} | {r.get('failed', '')} | {r.get('wrong_answers', '')} | "
                     f"{r.get('seconds_until_good_answers', '')} | {r.get('ready_while_failing_s', '')} | "
                     f"{'passed' if r['passed'] else 'FAILED: ' + '; '.join(r['problems'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from common.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m client.chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--short", action="store_true", help="short outages (the form `make test` runs)")
    args = parser.parse_args(argv)
    setup_logging()
    report = run_chaos(args.repository, args.artifacts, args.out, args.short)
    print(markdown(report))
    print(f"report: {args.out / 'chaos.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
