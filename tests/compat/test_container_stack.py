"""One exported repository, two stacks: our pinned one (Python 3.11, tritonserver 2.51, FAISS 1.8)
and the Merlin 23.08 container's (Python 3.10, the 2.36 server closest to its Triton 23.06, whose
Python backend has no error codes and no histograms, FAISS 1.7.2, protobuf 3.20 in pure Python,
no redis-py). The repository the main environment exported must load and answer the same on both.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest

from client.bad_requests import corpus, send
from common import contract
from ensemble.metrics import FLUSH_INTERVAL_S

pytestmark = [pytest.mark.integration, pytest.mark.compat]

CONTAINER_ENV = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}  # as the Merlin container sets it


@pytest.fixture(scope="module")
def container_server(repository, compat_python, tmp_path_factory):
    from ensemble.server import TritonServer
    from ensemble.stack import ServerStack
    from tests.integration.conftest import free_serve_config

    stack = ServerStack.of_python(compat_python)
    assert stack.version == "3.10", stack
    log = tmp_path_factory.mktemp("compat") / "tritonserver-2.36.log"
    with TritonServer(repository, free_serve_config(), log_path=log, stack=stack, extra_env=CONTAINER_ENV) as server:
        yield server
    assert "2.36.0" in log.read_text(), "not the 2.36 server"


@pytest.fixture(scope="module")
def users(trained):
    known = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:12].tolist()
    return known + [10**9]


def test_the_container_stack_is_what_the_container_holds(compat_python):
    code = ("import sys, faiss, numpy, tensorflow, google.protobuf, importlib.util as u; "
            "print(sys.version_info[:2], faiss.__version__, numpy.__version__, tensorflow.__version__, "
            "google.protobuf.__version__, u.find_spec('redis') is None, hasattr(faiss, 'SearchParametersIVF'))")
    out = subprocess.run([str(compat_python), "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip().splitlines()[-1] == "(3, 10) 1.7.2 1.22.4 2.12.0 3.20.3 True False"


def test_ready_and_the_canary_passes(container_server, repository, trained):
    from pathlib import Path

    from ensemble.health import canary, canary_user

    assert container_server.is_ready()
    user, known, new_user = canary_user(repository)  # a stored user (from the cache), then one the export lacks (the whole path)
    result = canary(container_server.http_url, user, known, 10.0, cold_user_id=new_user)
    assert result.ok and f", new user {new_user} -> item " in result.detail, result
    # the query cache is built on this stack too (numpy 1.22, Python 3.10): answers below equal the main server's
    stored = len(pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES))
    assert f"query cache: on, {stored:,} users, " in Path(container_server.log_path).read_text(errors="replace")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_answers_equal_the_main_servers(container_server, server, users, protocol):
    """Known users, a new user with features, exclusions and exclude_seen: same ids, scores within 1e-6."""
    from client.client import RetrievalClient

    def ask(srv):
        url = srv.grpc_url if protocol == "grpc" else srv.http_url
        with RetrievalClient(url, protocol) as client:
            plain = client.recommend(users, top_k=20)
            excluded = client.recommend(users, top_k=20, exclude=[r[:5].tolist() for r in plain.item_ids], exclude_seen=True)
            new = client.recommend([10**9 + 7], top_k=20, features={"user_age": [2], "user_gender": [1]})
            return plain, excluded, new

    for ours, theirs in zip(ask(server), ask(container_server)):
        np.testing.assert_array_equal(theirs.item_ids, ours.item_ids)
        np.testing.assert_allclose(theirs.scores, ours.scores, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(theirs.unknown_user, ours.unknown_user)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_bad_request_gets_its_own_message(container_server, users, protocol, executor):
    """The 23.06 backend has no error codes: our messages arrive whole (as INTERNAL, not INVALID_ARG)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from common.config import ServeConfig

    serve = ServeConfig()
    module = grpcclient if protocol == "grpc" else httpclient
    raw = module.InferenceServerClient(container_server.grpc_url if protocol == "grpc" else container_server.http_url)
    try:
        for case in corpus(serve.max_batch_size, serve.max_top_k, serve.max_exclude, "user_age", int(users[0]), executor.n_items):
            error = send(module, raw, contract.MODEL_NAME, case)
            assert error is not None, f"{case.name} was answered"
            assert re.search(case.expected(protocol, stack="23.06"), str(error)), f"{case.name}: {error}"
    finally:
        raw.close()


def test_metric_families_degrade_to_counters(container_server):
    from client.client import RetrievalClient

    with RetrievalClient(container_server.grpc_url) as client:
        client.recommend([1, 2], top_k=3)
    # The model sends its metrics from a background thread every FLUSH_INTERVAL_S.
    deadline = time.monotonic() + 25 * FLUSH_INTERVAL_S
    while True:
        with urllib.request.urlopen(container_server.metrics_url, timeout=10) as r:
            text = r.read().decode()
        if re.search(r'^retrieval_stage_seconds_count\{.*stage="search".*\} [1-9]', text, re.M) or time.monotonic() > deadline:
            break
        time.sleep(FLUSH_INTERVAL_S / 4)
    assert re.search(r'^retrieval_requests_total\{.*outcome="ok".*\} [1-9]', text, re.M)
    for family in ("retrieval_stage_seconds_sum", "retrieval_stage_seconds_count", "retrieval_batch_users_sum", "retrieval_batch_users_count"):
        assert re.search(rf"^# TYPE {family} counter$", text, re.M), family
    assert not re.search(r"^# TYPE retrieval_stage_seconds histogram$", text, re.M)
    assert re.search(r'^retrieval_stage_seconds_count\{.*stage="search".*\} [1-9]', text, re.M)


def test_a_redis_feature_store_without_redis_py_fails_the_load_in_one_line(trained, compat_python, tmp_path):
    import dataclasses

    from common.errors import ServerError
    from common.manifest import artifacts_config, read_manifest
    from ensemble.build import build_repository
    from ensemble.server import TritonServer
    from ensemble.stack import ServerStack
    from tests.integration.conftest import free_serve_config

    cfg = artifacts_config(read_manifest(trained["artifacts"]))
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, feature_store="redis://127.0.0.1:1/0"))
    repo = build_repository(trained["artifacts"], tmp_path / "repo", cfg=cfg)
    server = TritonServer(repo, free_serve_config(), log_path=tmp_path / "log.txt", stack=ServerStack.of_python(compat_python),
                          extra_env=CONTAINER_ENV)
    with pytest.raises(ServerError, match="exited with code"):
        server.start().wait_ready(120)
    server.close()
    assert re.search(r"retrieval model cannot load: feature_store 'redis://127\.0\.0\.1:1/0' needs the redis-py package, "
                     r"which this Python does not have; install it in the server's environment \(pip install redis==5\.0\.8\)",
                     (tmp_path / "log.txt").read_text())



CACHE_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1] + "/retrieval/1/code")
import numpy as np
from common import contract
from ensemble.loader import load_executor
from ensemble.request import Limits

params, max_batch = json.loads(sys.argv[2]), int(sys.argv[3])
ensemble_dir = sys.argv[1] + "/retrieval/1/ensemble"
cached = load_executor(ensemble_dir, Limits.from_parameters(params, max_batch), params=params)
uncached = load_executor(ensemble_dir, Limits.from_parameters(params, max_batch), params={**params, "query_cache_mb": "0"})
ids = cached.cache.user_ids
start, requests, equal, hits = 0, 0, 0, 0
while start < len(ids):
    n = 1 + requests % 7
    request = [({contract.INPUT_USER_ID: np.append(ids[start:start + n], 10**12).reshape(-1, 1)}, {"top_k": 10})]
    a, b = cached.execute(request)[0], uncached.execute(request)[0]
    hits += cached.last.cached_users
    equal += all(np.array_equal(a[k], b[k]) for k in (contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN))
    requests += 1
    start += n
print(sys.version_info[:2], np.__version__, uncached.cache_note, "cached", hits, "of", len(ids), "equal", equal, "of", requests)
"""


def test_the_query_cache_answers_bit_for_bit_on_this_stack(repository, compat_python):
    """numpy 1.22.4 and the container's BLAS: every stored user's answer (beside an unknown user in
    each request) with the cache equals the one without, bit for bit, in-process on that stack."""
    import json
    import os

    from ensemble.loader import model_parameters

    params, max_batch = model_parameters(repository / contract.MODEL_NAME, 1)
    run = subprocess.run([str(compat_python), "-c", CACHE_CHECK, str(repository), json.dumps(params), str(max_batch)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **CONTAINER_ENV})
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"\(3, 10\) 1\.22\.4 off: serve\.query_cache_mb is 0 cached (\d+) of (\d+) equal (\d+) of (\d+)", last)
    assert match, last
    cached, users, equal, requests = map(int, match.groups())
    assert cached == users > 0 and equal == requests > 0, last
