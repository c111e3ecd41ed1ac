"""CLI of serving: `python -m ensemble build ...` writes the model repository, `serve` runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import contract
from common.cli import add_config_args, config_from_args, int64, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="export the Triton model repository from an artifacts folder")
    build.add_argument("--artifacts", required=True, type=Path, help="output of `python -m train run`")
    build.add_argument("--repository", required=True, type=Path, help="model repository folder to write")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty --repository")
    add_config_args(build)
    serve = sub.add_parser("serve", help="run tritonserver on a model repository in the foreground")
    serve.add_argument("--repository", required=True, type=Path, help="model repository folder")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--metrics-port", type=int)
    serve.add_argument("--health-port", type=int, help="the supervisor's /live and /ready (default 8003)")
    serve.add_argument("--no-supervise", action="store_true",
                       help="run tritonserver alone: no restart on a crash, no canary readiness (for debugging)")
    serve.add_argument("--model-control", choices=("none", "explicit"), default="none",
                       help="explicit turns on Triton's load/unload API (for `deploy`); off by default")
    add_config_args(serve)
    health = sub.add_parser("health", help="send one canary request through the model; exit 0 when it answers")
    health.add_argument("--url", default=f"127.0.0.1:{contract.DEFAULT_HTTP_PORT}", help="Triton's HTTP host:port")
    health.add_argument("--repository", type=Path, help="ask for the users this repository names (a stored user, known, "
                        "then one it does not store), as the supervisor does; instead of the three flags below")
    health.add_argument("--user-id", type=int, default=0, help="the user to ask for")
    health.add_argument("--known", action="store_true", help="the user is known: an unknown_user answer fails the check")
    health.add_argument("--new-user-id", type=int, help="a user the export does not store, asked next: its request runs "
                        "the lookup, transform and tower even where stored users' queries are cached")
    health.add_argument("--timeout-s", type=float, default=5.0)
    mat = sub.add_parser("materialize", help="write an export's user features to a shared Redis feature store")
    mat.add_argument("--artifacts", required=True, type=Path)
    mat.add_argument("--redis", required=True, help="redis://host:port/db")
    click = sub.add_parser(
        "append-click", help="append clicks to a user's history in the Redis feature store (no retraining)",
        description="Appends item ids to a user's stored history in the shared Redis store (the latest "
                    "train.history_length kept, atomically); the next request for that user sees them. The "
                    "embedded store is the exported table itself, fixed per version (its sha256 is checked at "
                    "load): with it, send recent clicks in the request's history_item_ids instead.")
    click.add_argument("--artifacts", required=True, type=Path, help="the export being served (its manifest names the namespace)")
    click.add_argument("--redis", required=True, help="redis://host:port/db, as given to materialize")
    click.add_argument("--user", required=True, type=int64, help="raw user id")
    click.add_argument("--item", required=True, type=int64, nargs="+", help="raw item ids, oldest first")
    for name, text in (("deploy", "add the artifacts as the next version and switch the running server to it"),
                       ("rollback", "switch the running server back to the previous version"),
                       ("activate", "switch the running server to a given version")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--repository", required=True, type=Path)
        p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address (it must run with --model-control explicit)")
        if name == "deploy":
            p.add_argument("--artifacts", required=True, type=Path)
        if name == "activate":
            p.add_argument("--version", required=True, type=int)
    return parser.parse_args(argv)


def _manifest_only(folder: Path) -> dict:
    import json

    from common.errors import ArtifactError

    path = folder / contract.MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} cannot be read: {e}") from None


def _history_length(manifest: dict) -> int:
    from common.manifest import artifacts_config

    return artifacts_config(manifest).train.history_length


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "health":
        from ensemble.health import canary, canary_user

        if args.repository and not (args.repository / contract.MODEL_NAME / "config.pbtxt").is_file():
            print(f"not ready: {args.repository / contract.MODEL_NAME / 'config.pbtxt'} does not exist; pass the served model repository")
            return 2
        user, known, new_user = canary_user(args.repository) if args.repository else (args.user_id, args.known, args.new_user_id)
        result = canary(args.url, user, known, args.timeout_s, cold_user_id=new_user)
        print(f"{'ready' if result.ok else 'not ready'} ({result.kind}): {result.detail}")
        return 0 if result.ok else 1
    if args.command == "build":
        from common.manifest import artifacts_config, read_manifest
        from ensemble.build import build_repository

        # The artifacts' own data/train/index settings, today's serve settings; then the flags.
        base = artifacts_config(read_manifest(args.artifacts))
        build_repository(args.artifacts, args.repository, overwrite=args.overwrite, cfg=config_from_args(args, base=base))
        return 0
    if args.command == "materialize":
        from common.manifest import read_manifest
        from ensemble.loader import store_namespace
        from ensemble.redis_store import materialize

        manifest = read_manifest(args.artifacts)
        cols = manifest["columns"]
        n = materialize(args.redis, store_namespace(manifest), args.artifacts / contract.ARTIFACT_USER_FEATURES,
                        cols["user_id"], tuple(cols["user_features"]), history_length=_history_length(manifest))
        print(f"materialized {n} users under {store_namespace(manifest)} in {args.redis}")
        return 0
    if args.command == "append-click":
        from ensemble.redis_store import append_click, store_namespace

        # The manifest alone: a click must be cheap, and materialize checked the files (a 1.5 GB index
        # takes seconds to hash; ensemble.loader would import the whole serving stack).
        manifest = _manifest_only(args.artifacts)
        history = append_click(args.redis, store_namespace(manifest), args.user, args.item)
        print(f"user {args.user}: history now {history.tolist()} (latest {_history_length(manifest)} kept)")
        return 0
    if args.command in ("deploy", "rollback", "activate"):
        from ensemble import deploy

        if args.command == "deploy":
            version = deploy.deploy(args.repository, args.artifacts, args.url)
        elif args.command == "rollback":
            version = deploy.rollback(args.repository, args.url)
        elif not deploy.activate(args.repository, args.version, args.url):
            print(f"version {args.version} of {args.repository} is already being served; nothing changed")
            return 0
        else:
            version = args.version
        print(f"serving version {version} of {args.repository}")
        return 0
    flags = {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port, "metrics_port": args.metrics_port,
             "health_port": args.health_port}
    cfg = config_from_args(args, [f"serve.{k}={v}" for k, v in flags.items() if v is not None])
    from ensemble.server import serve_forever

    return serve_forever(args.repository, cfg.serve, args.model_control, supervise=not args.no_supervise)


if __name__ == "__main__":
    run_cli(main)
