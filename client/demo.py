"""The end of `make demo`: start the real server, ask it for a few users over gRPC and HTTP, stop.

Exits non-zero when the answers are malformed, differ between protocols, or the model is not
READY in the server's own model list.
"""

from __future__ import annotations

import argparse
import os
import secrets
import logging
import time
from pathlib import Path

import numpy as np

from common import contract
from common.cli import run_cli
from common.config import ServeConfig
from common.errors import ClientError

LOG = logging.getLogger(__name__)
DEMO_USERS = (11, 42, 7, 987654321)  # the last one was never seen in training


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.demo", description=__doc__)
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--artifacts", required=True, type=Path, help="for the catalogue check")
    parser.add_argument("--host", default=contract.DEFAULT_HOST)
    parser.add_argument("--http-port", type=int, default=contract.DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=contract.DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=contract.DEFAULT_METRICS_PORT)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--log", type=Path, help="write the server log here (default: stdout)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from client.client import RetrievalClient
    from ensemble.server import TritonServer

    args = parse_args(argv)
    # The model list is a restricted API: the demo's server and client share a key made for the run
    # (or the caller's $RETRIEVAL_ADMIN_KEY).
    os.environ.setdefault(contract.ADMIN_KEY_ENV, secrets.token_hex(16))
    cfg = ServeConfig(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    catalogue = np.load(args.artifacts / contract.ARTIFACT_ITEM_IDS)
    started = time.perf_counter()
    with TritonServer(args.repository, cfg, log_path=args.log) as server:
        LOG.info("tritonserver ready in %.1f s (pid %d)", time.perf_counter() - started, server.process.pid)
        answers = {}
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with RetrievalClient(url, protocol) as client:
                index = client.repository_index()
                t0 = time.perf_counter()
                recs = client.recommend(list(DEMO_USERS), top_k=args.top_k)
                latency_ms = (time.perf_counter() - t0) * 1000
            recs.check(args.top_k, catalogue)
            answers[protocol] = recs
            print(f"\n== {protocol} {url}: {len(DEMO_USERS)} users in one request, {latency_ms:.1f} ms; model list {index}")
            for row in recs.as_dicts():
                flag = "  (unknown user)" if row["unknown_user"] else ""
                print(f"user {row['user_id']}{flag}")
                print(f"  item_ids {row['item_ids']}")
                print(f"  scores   {[round(s, 4) for s in row['scores']]}")
            if not any(m["name"] == contract.MODEL_NAME and m.get("state") == "READY" for m in index):
                raise ClientError(f"model {contract.MODEL_NAME!r} is not READY in the server's list: {index}")
        g, h = answers["grpc"], answers["http"]
        if not (np.array_equal(g.item_ids, h.item_ids) and np.allclose(g.scores, h.scores, atol=1e-6)):
            raise ClientError("gRPC and HTTP answers differ")
        print(f"\ngRPC and HTTP agree for users {list(DEMO_USERS)}; unknown users flagged: {g.unknown_user.tolist()}")
    LOG.info("server stopped")
    return 0


if __name__ == "__main__":
    run_cli(main)
