"""Hostile history cases against a real redis-server, found in review: each one a bug that was fixed."""

import json

import numpy as np
import pytest

from common import contract
from common.errors import FeatureStoreError

pytestmark = pytest.mark.integration

NS = "hostile"


@pytest.fixture
def store(redis_url):
    import redis

    from ensemble.redis_store import RedisFeatureStore

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.set(f"{NS}:meta", json.dumps({"features": ["f"], "users": 3, "history_length": 3}))
    for user in (3, 4, 5):
        client.set(f"{NS}:u:{user}", np.array([user], "<i8").tobytes())
        client.set(f"{NS}:h:{user}", np.array([10 * user, 10 * user + 1], "<i8").tobytes())
    yield client, RedisFeatureStore(redis_url, NS, ("f",), history_length=3)
    client.flushdb()


def test_a_history_key_that_is_not_whole_int64_ids_is_refused_by_name_never_mixed_into_other_users(store):
    """12 bytes under one user's key was an internal error for the whole batch, and with a second such
    key in the batch (24 bytes together) the two users silently got each other's bytes as histories."""
    client, feature_store = store
    assert feature_store.get(np.array([3, 4]))[0][contract.INPUT_HISTORY].tolist() == [[30, 31, -1], [40, 41, -1]]
    client.set(f"{NS}:h:3", b"abcdefghijkl")
    client.set(f"{NS}:h:5", b"abcdefghijkl")
    for users in ([3], [3, 5], [4, 3, 5]):
        with pytest.raises(FeatureStoreError, match=rf"{NS}:h:3 holds 12 bytes, not whole int64 item ids"):
            feature_store.get(np.array(users))
    assert feature_store.get(np.array([4]))[0][contract.INPUT_HISTORY].tolist() == [[40, 41, -1]]


def test_a_feature_key_of_the_wrong_length_is_refused_by_name(store):
    client, feature_store = store
    client.set(f"{NS}:u:4", b"abcd")
    with pytest.raises(FeatureStoreError, match=rf"{NS}:u:4 holds 4 bytes, expected 8 \(1 int64 features\)"):
        feature_store.get(np.array([3, 4]))


def test_append_click_to_a_corrupted_history_key_appends_nothing_and_says_so(store, redis_url):
    from ensemble.redis_store import append_click

    client, _ = store
    client.set(f"{NS}:h:3", b"abcdefghijkl")
    with pytest.raises(FeatureStoreError, match=rf"{NS}:h:3 holds 12 bytes, not whole int64 item ids; nothing was appended"):
        append_click(redis_url, NS, 3, [7])
    assert client.get(f"{NS}:h:3") == b"abcdefghijkl"
    assert append_click(redis_url, NS, 4, [7]).tolist() == [40, 41, 7]


def test_a_server_whose_namespace_is_not_materialized_yet_loads_and_answers_unavailable_until_it_is(
        hist_trained, redis_url, tmp_path):
    """README: "A server whose namespace is missing loads, answers UNAVAILABLE ... and is not ready until
    `materialize` runs". The warm-up at load ran users through the store and failed the load instead
    (tritonserver exited, the supervisor restarted it in a loop)."""
    import dataclasses

    import redis

    from common.manifest import artifacts_config, read_manifest
    from ensemble.__main__ import main
    from ensemble.build import build_repository
    from ensemble.loader import load_model_in_process

    redis.Redis.from_url(redis_url).flushdb()
    cfg = artifacts_config(read_manifest(hist_trained["artifacts"]))
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, feature_store=redis_url))
    repository = build_repository(hist_trained["artifacts"], tmp_path / "repo", cfg=cfg)
    executor = load_model_in_process(repository)
    request = [({contract.INPUT_USER_ID: np.array([[1]], np.int64)}, {"top_k": 3})]
    with pytest.raises(FeatureStoreError, match=r"holds no features under .* \(flushed, or never materialized"):
        executor.execute(request)
    assert main(["materialize", "--artifacts", str(hist_trained["artifacts"]), "--redis", redis_url]) == 0
    assert executor.execute(request)[0][contract.OUTPUT_ITEM_IDS].shape == (1, 3)
