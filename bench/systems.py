"""Runs each system on a real server (or in-process) and measures it the same way."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from client.perf import _Unstable, ensure_perf_analyzer, run_perf, write_input_data
from client.soak import memory_mb
from common import contract
from common.config import ServeConfig

LOG = logging.getLogger(__name__)

UNSTABLE_BAND_PERCENT = 300  # the last try's stability band, after perf_analyzer's 30% and 100% failed


def model_stats(http_url: str) -> dict[str, dict]:
    """Triton's /v2/models/stats as milliseconds per inference: queue and compute stages."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"]
    out = {}
    for model in stats:
        inference = model["inference_stats"]
        count = max(int(model["inference_count"]), 1)
        out[model["name"]] = {
            "inference_count": int(model["inference_count"]),
            "execution_count": int(model["execution_count"]),
            **{f"{stage}_ms": int(inference[stage]["ns"]) / count / 1e6 for stage in ("queue", "compute_input", "compute_infer", "compute_output")},
        }
    return out


def stats_between(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """`model_stats` over the requests served between two readings (ms per inference)."""
    out = {}
    for model, a in after.items():
        b = before.get(model, {"inference_count": 0, "execution_count": 0})
        n = a["inference_count"] - b["inference_count"]
        out[model] = {"inference_count": n, "execution_count": a["execution_count"] - b["execution_count"]}
        for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
            key = f"{stage}_ms"
            total = a[key] * a["inference_count"] - b.get(key, 0.0) * b["inference_count"]
            out[model][key] = total / n if n else 0.0
    return out


def measure(name: str, binary: Path, env: dict, model: str, url: str, concurrency: int, inputs: Path, measurement_ms: int,
            batch_size: int = 1) -> dict | None:
    """One perf_analyzer measurement as a row, or None when no window was stable enough to report."""
    unstable = False
    try:
        result = run_perf(binary, env, model, url, concurrency, inputs, measurement_ms=measurement_ms, batch_size=batch_size)
    except _Unstable:
        # The shared machine can swing more than 2x between windows (load 10 on 2 cores seen):
        # one more try over 10 windows that accepts that spread, flagged in the report.
        unstable = True
        try:
            result = run_perf(binary, env, model, url, concurrency, inputs, measurement_ms=2 * measurement_ms,
                              batch_size=batch_size, max_trials=10, stability=UNSTABLE_BAND_PERCENT)
        except _Unstable:
            LOG.warning("%-13s c=%-2d no window within %d%% of the others; left out", name, concurrency, UNSTABLE_BAND_PERCENT)
            return None
    LOG.info("%-13s c=%-2d %8.1f infer/s  p50 %.2f ms  p99 %.2f ms%s", name, concurrency, result.throughput, result.p50_ms,
             result.p99_ms, " (unstable: windows differed by over 2x)" if unstable else "")
    return {**result.as_dict(), "unstable": unstable}


def median_row(rows: list[dict]) -> dict:
    """The per-field median of one concurrency's rows over the rounds (unstable if any round was)."""
    out = {k: float(np.median([r[k] for r in rows])) for k, v in rows[0].items() if isinstance(v, float)}
    return {**rows[0], **out, "unstable": any(r.get("unstable") for r in rows)}


def sweep_servers(servers: dict[str, tuple[Path, str]], input_rows: list[dict], shapes: dict, concurrencies, tools: Path,
                  workdir: Path, measurement_ms: int, rounds: int = 1, batch_size: int = 1,
                  local: dict[str, InProcess] | None = None) -> dict[str, dict]:
    """Serves every repository at once and measures them in rounds, each concurrency on each server back to back.

    The machine's speed drifts by up to 1.7x within minutes, so a ratio of two systems' figures is
    only fair when both were measured together: each round holds one measurement of every system
    at every concurrency, taken seconds apart, and ratio targets are computed round by round.

    Args:
        servers: name -> (model repository, model to measure).
        rounds: how many times the whole grid is measured.
        local: name -> our request path without a server, timed back to back in each round right after
            every server's first concurrency, and once more (with its after-idle figure) after the rounds.

    Returns:
        name -> {"sweep": the median row per concurrency, "rounds": each round's rows, "memory_mb":
        RSS after the rounds, "memory_idle_mb": RSS before them, "ready_s": seconds to ready,
        "stats": Triton's per-model stats over the rounds}; for a `local` name, `InProcess.measure()`
        with "rounds": each round's `InProcess.back_to_back()`.
    """
    import contextlib

    from ensemble.server import TritonServer, free_port

    binary, env = ensure_perf_analyzer(tools)
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = write_input_data(workdir / f"{'_'.join(servers)}_input.json", input_rows, shapes)
    out: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        up = {}
        for name, (repository, model) in servers.items():
            ports = sorted({free_port() for _ in range(6)})[:3]
            cfg = ServeConfig(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], ready_timeout_s=600)
            started = time.perf_counter()
            server = stack.enter_context(TritonServer(repository, cfg, log_path=workdir / f"{name}_server.log", model=model))
            up[name] = (server, model)
            out[name] = {"ready_s": time.perf_counter() - started, "rounds": []}
        for name, (server, _) in up.items():
            out[name]["memory_idle_mb"] = memory_mb(server.process.pid)
            out[name]["before"] = model_stats(server.http_url)
        for i in range(rounds):
            if rounds > 1:
                LOG.info("round %d of %d: %s at concurrency %s", i + 1, rounds, ", ".join(up), ",".join(map(str, concurrencies)))
            grid = {name: [] for name in up}
            for c in concurrencies:
                for name, (server, model) in up.items():
                    row = measure(name, binary, env, model, server.grpc_url, c, inputs, measurement_ms, batch_size)
                    if row is not None:
                        grid[name].append(row)
                if c == concurrencies[0]:
                    for name, path in (local or {}).items():
                        out.setdefault(name, {"rounds": []})["rounds"].append(path.back_to_back())
                        LOG.info("%-13s in-process p50 %.3f ms", name, out[name]["rounds"][-1]["p50_ms"])
            for name in up:
                out[name]["rounds"].append(grid[name])
        for name, (server, _) in up.items():
            out[name]["memory_mb"] = memory_mb(server.process.pid)
            out[name]["stats"] = stats_between(out[name].pop("before"), model_stats(server.http_url))
    for name, path in (local or {}).items():
        out[name] = {**path.measure(), "rounds": out.get(name, {"rounds": []})["rounds"]}
    for name in servers:
        system = out[name]
        rows = [r for one in system["rounds"] for r in one]
        system["sweep"] = [median_row([r for r in rows if r["concurrency"] == c]) for c in concurrencies
                           if any(r["concurrency"] == c for r in rows)]
    return out


def sweep_server(name: str, repository: Path, model: str, input_rows: list[dict], shapes: dict, concurrencies, tools: Path,
                 workdir: Path, measurement_ms: int, batch_size: int = 1) -> dict:
    """Starts tritonserver on a repository, runs perf_analyzer at each concurrency, reads stats and RSS."""
    return sweep_servers({name: (repository, model)}, input_rows, shapes, concurrencies, tools, workdir, measurement_ms,
                         batch_size=batch_size)[name]


def our_inputs(artifacts: Path, n: int, seed: int) -> tuple[list[dict], dict]:
    """perf_analyzer rows for our model: real user ids, one per request."""
    users = pd.read_parquet(artifacts / contract.ARTIFACT_USER_FEATURES).sample(n, replace=True, random_state=seed)
    return [{contract.INPUT_USER_ID: [int(u)]} for u in users.iloc[:, 0]], {contract.INPUT_USER_ID: [1]}


def reference_inputs(artifacts: Path, n: int, seed: int) -> tuple[list[dict], dict]:
    """perf_analyzer rows for the reference: the same users' raw features (it has no lookup)."""
    users = pd.read_parquet(artifacts / contract.ARTIFACT_USER_FEATURES).sample(n, replace=True, random_state=seed)
    rows = [{c: [int(v)] for c, v in row.items()} for row in users.to_dict("records")]
    return rows, {c: [1] for c in users.columns}


class InProcess:
    """Our request path with no server, loaded once: one user per request, sequential."""

    def __init__(self, repository: Path, artifacts: Path, n_requests: int, seed: int):
        from ensemble.loader import load_model_in_process

        self.executor = load_model_in_process(repository)
        users = pd.read_parquet(artifacts / contract.ARTIFACT_USER_FEATURES).iloc[:, 0].sample(n_requests, replace=True, random_state=seed)
        self.requests = [[({contract.INPUT_USER_ID: np.array([[u]], np.int64)}, {})] for u in users]
        for r in self.requests[:100]:
            self.executor.execute(r)

    def timed(self, idle_s: float = 0.0) -> tuple[np.ndarray, float, dict]:
        """(ms per request, seconds in all, ms per request by stage), `idle_s` of sleep before each."""
        self.executor.runner.timings_s.clear()
        times = []
        started = time.perf_counter()
        for r in self.requests:
            if idle_s:
                time.sleep(idle_s)
            t = time.perf_counter()
            self.executor.execute(r)
            times.append(time.perf_counter() - t)
        stages = {k: v / len(self.requests) * 1000 for k, v in self.executor.runner.timings_s.items()}
        return np.array(times) * 1000, time.perf_counter() - started, stages

    def back_to_back(self) -> dict:
        """The figure the targets use: throughput, p50/p95/p99 and stages, requests back to back."""
        ms, total, stage_ms = self.timed()
        return {"throughput": len(self.requests) / total, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                "p99_ms": float(np.percentile(ms, 99)), "stage_ms": stage_ms, "query_cache": self.executor.cache_note}

    def measure(self, idle_ms: float = 1.0) -> dict:
        """Timed twice: back to back, and again with `idle_ms` of sleep before each request, the
        cadence a server sees at concurrency 1. After a sleep the same request runs about half as
        slow again on this machine (every stage alike: the CPU wakes cold), which is part of what
        separates the server's compute time from the back-to-back figure."""
        idle, _, idle_stage_ms = self.timed(idle_ms / 1000)
        return {**self.back_to_back(), "idle_ms": idle_ms, "p50_after_idle_ms": float(np.percentile(idle, 50)),
                "stage_after_idle_ms": idle_stage_ms}


def in_process(repository: Path, artifacts: Path, n_requests: int, seed: int, idle_ms: float = 1.0) -> dict:
    """`InProcess(...).measure(idle_ms)`: our request path with no server, back to back and after idle."""
    return InProcess(repository, artifacts, n_requests, seed).measure(idle_ms)
