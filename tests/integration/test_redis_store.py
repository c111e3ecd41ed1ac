"""The Redis-backed user lookup (a real redis-server on loopback) equals the embedded one."""

import dataclasses
import time

import numpy as np
import pandas as pd
import pytest

from common import contract
from common.errors import FeatureStoreError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_repository(trained, redis_url, tmp_path_factory):
    from common.manifest import artifacts_config, read_manifest
    from ensemble.build import build_repository
    from ensemble.loader import store_namespace
    from ensemble.redis_store import materialize

    manifest = read_manifest(trained["artifacts"])
    data = trained["cfg"].data
    materialize(redis_url, store_namespace(manifest), trained["artifacts"] / contract.ARTIFACT_USER_FEATURES, data.user_id, data.user_features)
    cfg = artifacts_config(manifest)
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, feature_store=redis_url))
    return build_repository(trained["artifacts"], tmp_path_factory.mktemp("redis_repo") / "repo", cfg=cfg)


def _requests(trained):
    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:40]
    ids = np.append(users, [10**9, 10**9 + 1]).reshape(-1, 1).astype(np.int64)
    age = np.full((len(ids), 1), -1, np.int64)
    age[-1] = 2  # a new user's feature sent in the request
    return [({contract.INPUT_USER_ID: ids, "user_age": age}, {"top_k": 7})]


def test_redis_lookup_equals_embedded_in_process(redis_repository, executor, trained):
    from ensemble.loader import load_model_in_process
    from ensemble.redis_store import RedisFeatureStore

    with_redis = load_model_in_process(redis_repository)
    lookup = next(n.op for n in with_redis.runner.nodes if type(n.op).__name__ == "LookupUserFeatures")
    assert isinstance(lookup._store, RedisFeatureStore)
    # Redis rows can change while the model serves: no query is computed ahead of its request
    assert with_redis.cache is None and executor.cache is not None
    assert with_redis.cache_note == "off: the feature store is shared (Redis): its rows can change while the model serves"
    ours, embedded = with_redis.execute(_requests(trained))[0], executor.execute(_requests(trained))[0]
    for name in (contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN):
        np.testing.assert_array_equal(ours[name], embedded[name])


def test_redis_backed_server_answers_like_the_embedded_one(redis_repository, executor, trained, tmp_path):
    from client.client import RetrievalClient
    from ensemble.server import TritonServer
    from tests.integration.conftest import free_serve_config

    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:10].tolist() + [10**9]
    expected = executor.execute([({contract.INPUT_USER_ID: np.array(users, np.int64).reshape(-1, 1)}, {"top_k": 5})])[0]
    with TritonServer(redis_repository, free_serve_config(), log_path=tmp_path / "log.txt") as server:
        with RetrievalClient(server.grpc_url) as client:
            recs = client.recommend(users, top_k=5)
    np.testing.assert_array_equal(recs.item_ids, expected[contract.OUTPUT_ITEM_IDS])
    assert recs.unknown_user.tolist() == [False] * 10 + [True]


def test_a_namespace_never_materialized_fails_each_call_clearly(redis_url):
    from ensemble.redis_store import RedisFeatureStore

    store = RedisFeatureStore(redis_url, "retrieval:nope", ("user_age",))  # loads: readiness says the rest
    with pytest.raises(FeatureStoreError, match=r"holds no features under retrieval:nope \(flushed, or never materialized"):
        store.get(np.array([1, 2]))


def test_an_unreachable_store_fails_within_its_timeout(redis_url):
    from ensemble.redis_store import RedisFeatureStore
    from ensemble.server import free_port

    store = RedisFeatureStore(f"redis://127.0.0.1:{free_port()}/0", "retrieval:nope", ("user_age",), timeout_s=0.2)
    with pytest.raises(FeatureStoreError, match=r"cannot reach redis://127\.0\.0\.1:\d+/0: Error 111 connecting"):
        store.get(np.array([1]))


def test_a_frozen_store_answers_unavailable_within_its_timeout(redis_url, redis_repository, trained):
    """SIGSTOP leaves the socket open and silent: the call must give up after timeout_s."""
    import os
    import signal

    from common.manifest import read_manifest
    from ensemble.loader import store_namespace
    from ensemble.redis_store import RedisFeatureStore

    manifest = read_manifest(trained["artifacts"])
    store = RedisFeatureStore(redis_url, store_namespace(manifest), tuple(trained["cfg"].data.user_features), timeout_s=0.3)
    store.get(np.array([1]))
    pid = int(__import__("redis").Redis.from_url(redis_url).info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(FeatureStoreError, match=r"did not answer within 0.3 s"):
            store.get(np.array([1]))
        assert time.monotonic() - started < 1.5
    finally:
        os.kill(pid, signal.SIGCONT)
    store.get(np.array([1]))  # the same store answers again once Redis does
