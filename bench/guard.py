"""What the HTTP guard costs: HTTP request latency with and without it, on the same repository.

    python -m bench.guard --repository model_repository [--requests 500]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def measure(repository: Path, guard: bool, requests: int, users: list[int]) -> tuple[float, float]:
    """(p50, p99) in ms of HTTP requests for `users` on a fresh server."""
    from client.scenarios import free_config
    from client.client import RetrievalClient
    from ensemble.server import TritonServer

    log = Path(tempfile.mkdtemp(prefix="guard-bench-")) / "tritonserver.log"
    with TritonServer(repository, free_config(http_guard=guard), log_path=log) as server:
        with RetrievalClient(server.http_url, "http") as client:
            for _ in range(50):
                client.recommend(users, top_k=10)
            latencies = []
            for _ in range(requests):
                started = time.perf_counter()
                client.recommend(users, top_k=10)
                latencies.append((time.perf_counter() - started) * 1e3)
    latencies.sort()
    return statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]


def main(argv=None) -> int:
    from common.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m bench.guard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    for guard in (False, True, False, True):  # alternated: this machine's speed drifts
        p50, p99 = measure(args.repository, guard, args.requests, [1, 2])
        print(f"HTTP, 2 users, top 10, {'with' if guard else 'without'} the guard: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
