"""The faults of `make chaos` as scenarios: each runs one fault on a supervised server under the
probe's client loop and returns its figures with a verdict against the bounds (see client.chaos)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from client import faults
from common import contract
from common.config import ServeConfig

LOG = logging.getLogger(__name__)
TOP_K = 5


@dataclass(frozen=True)
class Bounds:
    """What each fault may cost (seconds)."""

    recovery_s: float = 30.0  # a dead stub or server: until good answers resume
    redis_recovery_s: float = 5.0  # after Redis answers again
    slowest_request_s: float = 2.0  # while Redis is frozen (the store timeout is 0.5 s)
    ready_while_failing_s: float = 3.5  # one canary timeout (2 s) + interval + polling + the client's reconnect
    stub_growth_mb: float = 32.0  # our model's process over the refused large requests, after warm-up
    server_growth_mb: float = 150.0  # tritonserver's gRPC front end keeps buffers at a high-water mark


def free_config(**overrides) -> ServeConfig:
    """Free ports, and a canary every 0.5 s so that faults show quickly."""
    from ensemble.server import free_serve_config

    return free_serve_config(**{"canary_interval_s": 0.5, **overrides})


@dataclass
class Context:
    repository: Path
    artifacts: Path
    out: Path
    short: bool
    bounds: Bounds
    users: list
    expected: np.ndarray

    @property
    def outage_s(self) -> float:
        return 2.0 if self.short else 8.0


def make_context(repository: Path, artifacts: Path, out: Path, short: bool) -> Context:
    from ensemble.loader import load_model_in_process

    users = pd.read_parquet(artifacts / contract.ARTIFACT_USER_FEATURES).iloc[:, 0].to_numpy()[:8].astype(int).tolist()
    executor = load_model_in_process(repository)
    answer = executor.execute([({contract.INPUT_USER_ID: np.array(users, np.int64).reshape(-1, 1)}, {"top_k": TOP_K})])[0]
    return Context(Path(repository), Path(artifacts), Path(out), short, Bounds(), users, answer[contract.OUTPUT_ITEM_IDS])


def _probe(ctx: Context, sup) -> faults.Probe:
    return faults.Probe(sup.server.grpc_url, f"{sup.health_url}/ready", ctx.users, ctx.expected, TOP_K)


def _settle(probe: faults.Probe, sup, deadline_s: float, min_s: float = 3.0) -> None:
    """Waits at least `min_s` (a fault takes a moment to show), then until the supervisor says
    ready and the loop has had good answers for a second since its last failure (or the deadline)."""
    started = time.monotonic()
    end = started + deadline_s
    while time.monotonic() < end:
        failures = [r[0] for r in probe.requests if not r[1]]
        settled = probe.requests and probe.requests[-1][1] and (not failures or probe.requests[-1][0] > failures[-1] + 1.0)
        if time.monotonic() - started >= min_s and settled and sup.state.ready:
            return
        time.sleep(0.2)


def _verdict(name: str, figures: dict, problems: list[str]) -> dict:
    figures = {"fault": name, **figures, "problems": problems, "passed": not problems}
    LOG.info("%s: %s", name, "passed" if not problems else "FAILED: " + "; ".join(problems))
    return figures


def _recovery_checks(figures: dict, bounds: Bounds, limit_s: float, must_fail: bool = True) -> list[str]:
    problems = []
    if figures["wrong_answers"]:
        problems.append(f"{figures['wrong_answers']} wrong answers")
    if must_fail and figures["seconds_until_good_answers"] is None:
        problems.append("good answers never resumed")
    elif (figures["seconds_until_good_answers"] or 0) > limit_s:
        problems.append(f"good answers resumed after {figures['seconds_until_good_answers']} s, bound {limit_s} s")
    if figures["ready_while_failing_s"] > bounds.ready_while_failing_s:
        problems.append(f"readiness said ready for {figures['ready_while_failing_s']} s while requests failed")
    if figures["ready_at_end"] is False:
        problems.append("not ready at the end")
    return problems


# -- faults on the plain supervised server ---------------------------------------------------


def hostile_http(ctx: Context, sup) -> dict:
    pid, restarts = sup.server.process.pid, sup.state.restarts
    outcomes, problems = {}, []
    with _probe(ctx, sup) as probe:
        started = time.monotonic()
        for name, body, headers in faults.hostile_http_requests(ctx.users[0]):
            status, text = faults.send_raw_http(sup.server.http_url, f"/v2/models/{contract.MODEL_NAME}/infer", body, headers)
            outcomes[name] = f"{status} {text[:120]}"
            if not 400 <= status < 500:
                problems.append(f"{name}: HTTP {status}")
        line = faults.claim_huge_body(sup.server.http_url)
        outcomes["content_length_10GB"] = line
        if " 413 " not in line:
            problems.append(f"content_length_10GB: {line}")
        time.sleep(1.0)
    figures = probe.report(started)
    if sup.server.process.pid != pid or sup.state.restarts != restarts:
        problems.append("tritonserver was restarted")
    problems += _recovery_checks(figures, ctx.bounds, 0.0, must_fail=False)
    if figures["failed"]:
        problems.append(f"{figures['failed']} good requests failed")
    return _verdict("hostile_http", {**figures, "outcomes": outcomes}, problems)


def refused_memory(ctx: Context, sup) -> dict:
    import tritonclient.grpc as grpcclient

    from client.bad_requests import corpus, send

    serve = ServeConfig()
    case = next(c for c in corpus(serve.max_batch_size, serve.max_top_k, serve.max_exclude, "x", ctx.users[0]) if c.name == "huge_payload")
    raw = grpcclient.InferenceServerClient(sup.server.grpc_url)
    n = 20 if ctx.short else 100
    try:
        for _ in range(20 if ctx.short else 40):  # warm the allocators, gRPC's buffers and the shared-memory pool
            send(grpcclient, raw, contract.MODEL_NAME, case)
        before = faults.rss_mb(sup.server.process.pid)
        for _ in range(n):
            error = send(grpcclient, raw, contract.MODEL_NAME, case)
            assert error is not None and "over the maximum" in str(error), error
        after = faults.rss_mb(sup.server.process.pid)
    finally:
        raw.close()
    server_growth, stub_growth = after[0] - before[0], after[1] - before[1]
    figures = {"requests": n, "request_mb": 16, "server_mb": [round(before[0]), round(after[0])], "stubs_mb": [round(before[1]), round(after[1])]}
    problems = []
    if stub_growth > ctx.bounds.stub_growth_mb:
        problems.append(f"the model's process grew {stub_growth:.0f} MB over {n} refused requests")
    if server_growth > ctx.bounds.server_growth_mb:
        problems.append(f"tritonserver grew {server_growth:.0f} MB over {n} refused requests")
    return _verdict("refused_memory", figures, problems)


def _process_fault(name: str, ctx: Context, sup, act) -> dict:
    restarts = sup.state.restarts
    with _probe(ctx, sup) as probe:
        time.sleep(1.0)
        started = time.monotonic()
        detail = act()
        _settle(probe, sup, ctx.bounds.recovery_s + 5)
        time.sleep(1.0)
    figures = {**probe.report(started), "restarts": sup.state.restarts - restarts, "detail": detail}
    problems = _recovery_checks(figures, ctx.bounds, ctx.bounds.recovery_s)
    return _verdict(name, figures, problems)


def grpc_stub_killer(ctx: Context, sup) -> dict:
    return _process_fault("grpc_stub_killer", ctx, sup, lambda: faults.grpc_model_killer(sup.server.grpc_url, ctx.users[0]))


def kill_stub(ctx: Context, sup) -> dict:
    def act():
        stubs = faults.stub_pids(sup.server.process.pid)
        for pid in stubs:
            faults.kill9(pid)
        return f"killed stub(s) {stubs}"
    return _process_fault("kill_stub", ctx, sup, act)


def _signal_tritonserver(name: str, ctx: Context, sup, sig: signal.Signals) -> dict:
    def act():
        pid = sup.server.process.pid
        os.kill(pid, sig)
        return f"sent {sig.name} to tritonserver {pid}"
    return _process_fault(name, ctx, sup, act)


def kill_tritonserver(ctx: Context, sup) -> dict:
    return _signal_tritonserver("kill_tritonserver", ctx, sup, signal.SIGKILL)


def freeze_tritonserver(ctx: Context, sup) -> dict:
    # A hung server: the supervisor's restart SIGKILLs it (SIGKILL ends a stopped process too).
    return _signal_tritonserver("freeze_tritonserver", ctx, sup, signal.SIGSTOP)


# -- Redis -------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server on a free loopback port, with a data folder so a restart keeps its keys."""

    def __init__(self, folder: Path):
        from ensemble.server import free_port

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> "RedisServer":
        import redis

        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.folder)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on {self.url}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _redis_fault(name: str, ctx: Context, sup, act, restore, expect: str) -> dict:
    with _probe(ctx, sup) as probe:
        time.sleep(1.0)
        started = time.monotonic()
        act()
        time.sleep(ctx.outage_s)
        back = time.monotonic()
        restore()
        _settle(probe, sup, ctx.bounds.redis_recovery_s + 5, min_s=0.5)
        time.sleep(1.0)
    figures = probe.report(started)
    after_back = [r for r in probe.requests if r[0] >= back]
    resumed = next((r[0] - back for r in after_back if r[1] and not any(not x[1] for x in after_back if x[0] > r[0])), None)
    # Requests are recorded when they end: the longest gap between two endings is the longest request.
    slowest = max((b[0] - a[0] for a, b in zip(probe.requests, probe.requests[1:]) if started <= a[0] <= back), default=0.0)
    figures.update({"outage_s": ctx.outage_s, "seconds_after_redis_back": None if resumed is None else round(resumed, 2),
                    "slowest_request_s": round(slowest, 2)})
    problems = _recovery_checks(figures, ctx.bounds, ctx.outage_s + ctx.bounds.redis_recovery_s + 1)
    if resumed is None or resumed > ctx.bounds.redis_recovery_s:
        problems.append(f"good answers {resumed} s after Redis was back, bound {ctx.bounds.redis_recovery_s} s")
    if not figures["failed"]:
        problems.append("no request failed while the store was out: something answered without it")
    if not all(expect in e for e in figures["errors"]):
        problems.append(f"errors without '{expect}': {figures['errors']}")
    if slowest > ctx.bounds.slowest_request_s:
        problems.append(f"a request took {slowest:.1f} s while the store was out")
    if sup.state.restarts:
        problems.append("tritonserver was restarted for a feature-store fault")
    return _verdict(name, figures, problems)


def redis_faults(ctx: Context, sup, redis_server: RedisServer, rematerialize) -> list[dict]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    results = []

    def stop():
        client.save()
        redis_server.stop()

    results.append(_redis_fault("redis_stopped", ctx, sup, stop, redis_server.start, "feature store unavailable: cannot reach"))
    results.append(_redis_fault("redis_frozen", ctx, sup, lambda: os.kill(redis_server.process.pid, signal.SIGSTOP),
                                lambda: os.kill(redis_server.process.pid, signal.SIGCONT), "did not answer within"))
    results.append(_redis_fault("redis_flushed", ctx, sup, lambda: redis.Redis.from_url(redis_server.url).flushall(),
                                rematerialize, "flushed, or never materialized"))
    return results


# -- deploys and artifacts -----------------------------------------------------------------------


def failed_deploy(ctx: Context, sup, repo: Path) -> dict:
    import faiss

    from common.errors import ArtifactError, ServerError
    from ensemble import deploy
    from ensemble.build import record_version_files

    bad_copy = deploy.add_version(repo, ctx.artifacts)
    index = repo / contract.MODEL_NAME / str(bad_copy) / "ensemble" / contract.ARTIFACT_INDEX
    data = bytearray(index.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # other bytes, same size
    index.write_bytes(bytes(data))
    cannot_load = deploy.add_version(repo, ctx.artifacts)
    folder = repo / contract.MODEL_NAME / str(cannot_load)
    faiss.write_index(faiss.IndexFlatIP(faiss.read_index(str(folder / "ensemble" / contract.ARTIFACT_INDEX)).d),
                      str(folder / "ensemble" / contract.ARTIFACT_INDEX))
    record_version_files(folder, json.loads((folder / contract.MANIFEST).read_text()))
    config_before = (repo / contract.MODEL_NAME / "config.pbtxt").read_text()
    outcomes, problems = {}, []
    with _probe(ctx, sup) as probe:
        time.sleep(1.0)
        started = time.monotonic()
        for version, error in ((bad_copy, ArtifactError), (cannot_load, ServerError)):
            try:
                deploy.activate(repo, version, sup.server.grpc_url)
                problems.append(f"version {version} was activated")
            except error as e:
                outcomes[f"version_{version}"] = str(e)[:300]
        outcomes["activate_served"] = "no-op" if deploy.activate(repo, 1, sup.server.grpc_url) is False else "switched"
        time.sleep(2.0)
    figures = {**probe.report(started), "outcomes": outcomes}
    if (repo / contract.MODEL_NAME / "config.pbtxt").read_text() != config_before:
        problems.append("config.pbtxt changed")
    if figures["failed"]:
        problems.append(f"{figures['failed']} requests failed")
    if outcomes.get("activate_served") != "no-op":
        problems.append("activating the served version was not a no-op")
    if figures["not_ready_s"] > 0:
        problems.append(f"readiness was false for {figures['not_ready_s']} s")
    problems += _recovery_checks(figures, ctx.bounds, 0.0, must_fail=False)
    return _verdict("failed_deploy", figures, problems)


def corrupted_artifact(ctx: Context) -> dict:
    from common.errors import ArtifactError, ServerError
    from ensemble.loader import load_model_in_process
    from ensemble.server import TritonServer

    repo = ctx.out / "corrupted_repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(ctx.repository, repo)
    index = repo / contract.MODEL_NAME / "1" / "ensemble" / contract.ARTIFACT_INDEX
    data = bytearray(index.read_bytes())
    data[-64:] = bytes(b ^ 0x5A for b in data[-64:])
    index.write_bytes(bytes(data))
    problems, outcomes = [], {}
    try:
        load_model_in_process(repo)
        problems.append("loaded in-process")
    except ArtifactError as e:
        outcomes["in_process"] = str(e)
    started = time.monotonic()
    log = ctx.out / "corrupted_tritonserver.log"
    server = TritonServer(repo, free_config(http_guard=False), log_path=log)
    try:
        server.start().wait_ready(120)
        problems.append("tritonserver served the corrupted repository")
    except ServerError:
        outcomes["server_refused_after_s"] = round(time.monotonic() - started, 1)
    finally:
        server.close()
    named = f"{index} does not match its sha256"
    if named not in outcomes.get("in_process", "") or named not in log.read_text(errors="replace"):
        problems.append("the corrupted file is not named in the error")
    shutil.rmtree(repo, ignore_errors=True)
    return _verdict("corrupted_artifact", {"outcomes": outcomes}, problems)
