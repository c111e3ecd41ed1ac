"""`make soak`: a bounded mixed load of good and bad requests, checked answer by answer.

Reports errors on good requests (must be 0), answers that change for the same question (must be
0), bad requests that were answered (must be 0), and the memory of tritonserver and its Python
stubs sampled over time (must stay flat), as JSON and a plot. Exits 1 when any check fails.

    python -m client.soak --repository model_repository --artifacts build/artifacts --out build/soak
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from common import contract
from common.cli import run_cli
from common.config import ServeConfig

LOG = logging.getLogger(__name__)
MAX_GROWTH_MB = 50.0  # tolerated growth of total RSS between the first and last quarter


@dataclass
class Tally:
    """Counters shared by the load threads (guarded by `lock`)."""

    good: int = 0
    good_errors: int = 0
    with_history: int = 0  # good requests that sent histories (a history model only)
    bad: int = 0
    bad_answered: int = 0
    bad_wrong_message: int = 0
    changed_answers: int = 0
    latencies_ms: list = field(default_factory=list)
    examples: list = field(default_factory=list)
    answers: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)


def memory_mb(server_pid: int) -> dict[str, float]:
    """RSS of tritonserver and of each Python-backend stub under it, in MB."""
    server = psutil.Process(server_pid)
    out = {"tritonserver": server.memory_info().rss / 2**20}
    for child in server.children(recursive=True):
        try:
            if "triton_python_backend_stub" in child.name():
                out[f"stub_{child.pid}"] = child.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    out["total"] = sum(out.values())
    return out


def _worker(url: str, users: np.ndarray, catalogue: np.ndarray, deadline: float, bad_fraction: float, cases, tally: Tally, seed: int,
            history: bool = False) -> None:
    import tritonclient.grpc as grpc_module

    from client.bad_requests import send
    from client.client import RetrievalClient

    rng = random.Random(seed)
    raw = grpc_module.InferenceServerClient(url)
    with RetrievalClient(url, "grpc") as client:
        while time.monotonic() < deadline:
            if rng.random() < bad_fraction:
                case = rng.choice(cases)
                error = send(grpc_module, raw, contract.MODEL_NAME, case)
                with tally.lock:
                    tally.bad += 1
                    if error is None:
                        tally.bad_answered += 1
                        tally.note(f"bad request {case.name} was answered")
                    elif not re.search(case.expected("grpc"), str(error)):
                        tally.bad_wrong_message += 1
                        tally.note(f"bad request {case.name}: unexpected message {error}")
                continue
            batch = [int(u) for u in rng.sample(list(users), rng.randint(1, 8))]
            k = rng.choice((5, 10, 20))
            with_exclusions = rng.random() < 0.3
            seen = rng.random() < 0.2
            # Exclusions depend on the user only, so the same question always gets the same answer.
            exclude = [[int(catalogue[u % len(catalogue)]), int(catalogue[(7 * u) % len(catalogue)])] for u in batch] if with_exclusions else None
            # A history model also gets recent clicks, 1 to 3 of them per user (the user alone decides
            # which), so dynamic batches mix histories of several widths with none.
            with_history = history and rng.random() < 0.3
            sent = [[int(catalogue[(3 * u + j) % len(catalogue)]) for j in range(1 + u % 3)] for u in batch] if with_history else None
            started = time.perf_counter()
            try:
                recs = client.recommend(batch, top_k=k, exclude=exclude, exclude_seen=seen, history=sent)
                recs.check(k)
            except Exception as e:  # noqa: BLE001 - every failure of a good request counts
                with tally.lock:
                    tally.good += 1
                    tally.good_errors += 1
                    tally.note(f"good request failed: {e}")
                continue
            elapsed = (time.perf_counter() - started) * 1000
            with tally.lock:
                tally.good += 1
                tally.with_history += with_history
                tally.latencies_ms.append(elapsed)
                for u, row, scores in zip(batch, recs.item_ids, recs.scores):
                    key = (u, k, with_exclusions, seen, with_history)
                    first = tally.answers.setdefault(key, (row, scores))
                    if not np.array_equal(first[0], row):
                        tally.changed_answers += 1
                        at = np.flatnonzero(first[0] != row)
                        tally.note(f"answer changed for user {u}, k={k}, exclusions={with_exclusions}, seen={seen}: "
                                   f"at {at.tolist()} {first[0][at].tolist()} {first[1][at].tolist()} -> {row[at].tolist()} {scores[at].tolist()}")
    raw.close()


def run_soak(url: str, server_pid: int, artifacts: Path, duration_s: float, concurrency: int,
             bad_fraction: float = 0.1, sample_every_s: float = 2.0, seed: int = 0) -> dict:
    """Drives a running server and returns the report (see the module docstring)."""
    from client.bad_requests import corpus, history_corpus
    from common.config import MAX_HISTORY
    from common.manifest import artifacts_config

    users = pd.read_parquet(artifacts / contract.ARTIFACT_USER_FEATURES)
    feature = users.columns[1]
    user_ids = users.iloc[:, 0].to_numpy()
    catalogue = np.load(artifacts / contract.ARTIFACT_ITEM_IDS)
    manifest = json.loads((artifacts / contract.MANIFEST).read_text())
    serve = manifest["config"]["serve"]
    cases = [c for c in corpus(serve["max_batch_size"], serve["max_top_k"], serve["max_exclude"], feature, int(user_ids[0]), len(catalogue))
             if c.name != "huge_payload"]  # 16 MB each: tested elsewhere, too heavy for a loop
    history = artifacts_config(manifest).train.history_length
    cases += [c for c in history_corpus(history, MAX_HISTORY, int(user_ids[0])) if c.name != "history_huge_payload"]
    tally = Tally()
    started = time.monotonic()
    deadline = started + duration_s
    threads = [threading.Thread(target=_worker, args=(url, user_ids, catalogue, deadline, bad_fraction, cases, tally, seed + i, history > 0),
                                daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    samples, last_log, last_good = [], started, 0
    while any(t.is_alive() for t in threads):
        now = time.monotonic()
        samples.append({"t_s": now - started, "good": tally.good, **memory_mb(server_pid)})
        if now - last_log >= 10:
            rate = (tally.good - last_good) / (now - last_log)
            LOG.info("%4.0f s: %d good (%.0f/s), %d errors on good, %d bad, %d changed answers, RSS %.0f MB",
                     now - started, tally.good, rate, tally.good_errors, tally.bad, tally.changed_answers, samples[-1]["total"])
            last_log, last_good = now, tally.good
        time.sleep(sample_every_s)
    for t in threads:
        t.join()
    total = np.array([s["total"] for s in samples])
    quarter = max(1, len(total) // 4)
    growth = float(total[-quarter:].mean() - total[:quarter].mean())
    lat = np.array(tally.latencies_ms) if tally.latencies_ms else np.zeros(1)
    report = {
        "duration_s": duration_s, "concurrency": concurrency, "bad_fraction": bad_fraction,
        "good_requests": tally.good, "errors_on_good": tally.good_errors, "requests_with_history": tally.with_history,
        "bad_requests": tally.bad, "bad_answered": tally.bad_answered, "bad_unexpected_message": tally.bad_wrong_message,
        "changed_answers": tally.changed_answers, "distinct_questions": len(tally.answers),
        "good_per_s": tally.good / duration_s,
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99))},
        "memory_mb": {"first_quarter": float(total[:quarter].mean()), "last_quarter": float(total[-quarter:].mean()),
                      "growth": growth, "max": float(total.max()), "flat": growth < MAX_GROWTH_MB},
        "examples": tally.examples,
        "samples": samples,
    }
    report["passed"] = bool(tally.good_errors == 0 and tally.changed_answers == 0 and tally.bad_answered == 0
                            and tally.bad_wrong_message == 0 and report["memory_mb"]["flat"] and tally.good > 0)
    return report


def save(report: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "soak.json", "png": out / "soak.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    samples = report["samples"]
    t = [s["t_s"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key in [k for k in samples[0] if k == "tritonserver" or k.startswith("stub_") or k == "total"]:
        ax1.plot(t, [s.get(key, np.nan) for s in samples], label=key)
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    good = np.array([s["good"] for s in samples], dtype=float)
    rate = np.diff(good) / np.maximum(np.diff(t), 1e-9)
    ax2.plot(t[1:], rate)
    ax2.set_ylabel("good requests/s")
    ax2.set_xlabel("seconds")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"soak: concurrency {report['concurrency']}, {report['good_requests']} good, "
                 f"{report['errors_on_good']} errors, {report['changed_answers']} changed answers")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--artifacts", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for soak.json and soak.png")
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--grpc-port", type=int, default=contract.DEFAULT_GRPC_PORT)
    parser.add_argument("--http-port", type=int, default=contract.DEFAULT_HTTP_PORT)
    parser.add_argument("--metrics-port", type=int, default=contract.DEFAULT_METRICS_PORT)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from ensemble.server import TritonServer

    args = parse_args(argv)
    cfg = ServeConfig(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    args.out.mkdir(parents=True, exist_ok=True)
    with TritonServer(args.repository, cfg, log_path=args.out / "tritonserver.log") as server:
        LOG.info("soak: %.0f s at concurrency %d against %s", args.duration_s, args.concurrency, server.grpc_url)
        report = run_soak(server.grpc_url, server.process.pid, args.artifacts, args.duration_s, args.concurrency, args.bad_fraction)
    paths = save(report, args.out)
    summary = {k: report[k] for k in ("good_requests", "errors_on_good", "changed_answers", "bad_requests", "bad_answered",
                                      "bad_unexpected_message", "good_per_s", "latency_ms", "passed")}
    summary["memory_mb"] = {k: v for k, v in report["memory_mb"].items()}
    print(json.dumps(summary, indent=2))
    LOG.info("wrote %s and %s", paths["json"], paths["png"])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    run_cli(main)
