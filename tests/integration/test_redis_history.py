"""Histories in the Redis store (a real redis-server on loopback): materialize, lookup, append-click."""

import concurrent.futures as cf
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import contract
from common.errors import ArtifactError, FeatureStoreError

pytestmark = pytest.mark.integration

PAD = contract.HISTORY_PAD
H = contract.INPUT_HISTORY


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Four users: one with more history than N = 3, one with none, one with a null list, one with one id."""
    path = tmp_path_factory.mktemp("users") / contract.ARTIFACT_USER_FEATURES
    pq.write_table(pa.table({"user_id": pa.array([30, 10, 20, 40], pa.int64()), "user_age": pa.array([3, 1, 2, 4], pa.int64()),
                             H: pa.array([[7, 8, 9, 10], [], None, [5]], pa.list_(pa.int64()))}), path)
    return path


def _materialized(redis_url, table, namespace, history_length=3):
    from ensemble.redis_store import RedisFeatureStore, materialize

    assert materialize(redis_url, namespace, table, "user_id", ("user_age",), history_length=history_length) == 4
    return RedisFeatureStore(redis_url, namespace, ("user_age",), history_length=history_length)


def test_materialized_histories_equal_the_embedded_ones(redis_url, table):
    from ensemble.feature_store import ParquetFeatureStore

    redis_store = _materialized(redis_url, table, "retrieval:hist-equal")
    embedded = ParquetFeatureStore(table, "user_id", ("user_age",), history_length=3)
    ids = np.array([10, 20, 30, 40, 99, 30])
    (ours, found), (theirs, their_found) = redis_store.get(ids), embedded.get(ids)
    assert found.tolist() == their_found.tolist() == [True, True, True, True, False, True]
    for name in ("user_age", H):
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert ours[H].tolist()[2] == [8, 9, 10]  # the latest 3 of user 30's 4
    raw = __import__("redis").Redis.from_url(redis_url)
    assert json.loads(raw.get("retrieval:hist-equal:meta"))["history_length"] == 3
    assert np.frombuffer(raw.get("retrieval:hist-equal:h:40"), "<i8").tolist() == [5]


def test_a_click_is_appended_and_the_latest_n_kept(redis_url, table):
    from ensemble.redis_store import append_click

    store = _materialized(redis_url, table, "retrieval:hist-append")
    # user 30 holds 8 9 10: + 11 -> 9 10 11; + 12 13 -> 11 12 13.
    assert append_click(redis_url, "retrieval:hist-append", 30, [11]).tolist() == [9, 10, 11]
    assert append_click(redis_url, "retrieval:hist-append", 30, [12, 13]).tolist() == [11, 12, 13]
    assert append_click(redis_url, "retrieval:hist-append", 10, [4]).tolist() == [4]  # an empty history grows
    # A user training never saw: their clicks are served while they stay unknown.
    assert append_click(redis_url, "retrieval:hist-append", 777, [1, 2, 3, 4, 5]).tolist() == [3, 4, 5]
    features, found = store.get(np.array([30, 10, 777]))
    assert features[H].tolist() == [[11, 12, 13], [4, PAD, PAD], [3, 4, 5]]
    assert found.tolist() == [True, True, False]
    with pytest.raises(ArtifactError, match=exactly("item id -1 is the history's padding, not an item; nothing was appended")):
        append_click(redis_url, "retrieval:hist-append", 30, [14, PAD])
    assert store.get(np.array([30]))[0][H].tolist() == [[11, 12, 13]]


def test_concurrent_clicks_are_none_lost(redis_url, table):
    """8 writers x 25 clicks into one history of 200: the script appends and trims atomically, so
    all 200 arrive, each writer's in its own order."""
    from ensemble.redis_store import append_click

    _materialized(redis_url, table, "retrieval:hist-race", history_length=200)

    def writer(w):
        for i in range(25):
            append_click(redis_url, "retrieval:hist-race", 10, [1000 * w + i])

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    stored = append_click(redis_url, "retrieval:hist-race", 10, [])
    assert sorted(stored.tolist()) == sorted(1000 * w + i for w in range(8) for i in range(25))
    for w in range(8):
        mine = [v for v in stored.tolist() if v // 1000 == w]
        assert mine == sorted(mine)


def test_appending_where_there_is_no_history_fails_clearly(redis_url, table):
    from ensemble.redis_store import append_click

    _materialized(redis_url, table, "retrieval:no-hist", history_length=0)
    with pytest.raises(ArtifactError, match=exactly(
            f"the export under retrieval:no-hist in {redis_url} has no history input (train.history_length 0); "
            "there is no history to append to")):
        append_click(redis_url, "retrieval:no-hist", 10, [1])
    with pytest.raises(FeatureStoreError, match=exactly(
            f"{redis_url} holds no features under retrieval:never (flushed, or never materialized: "
            "run `python -m ensemble materialize`)")):
        append_click(redis_url, "retrieval:never", 10, [1])


def test_a_store_materialized_with_another_history_length_is_refused(redis_url, table):
    from ensemble.redis_store import RedisFeatureStore

    _materialized(redis_url, table, "retrieval:hist-five", history_length=5)
    with pytest.raises(ArtifactError, match=exactly(f"{redis_url} retrieval:hist-five holds histories of 5 items, the model takes 3")):
        RedisFeatureStore(redis_url, "retrieval:hist-five", ("user_age",), history_length=3)  # the model does not load


def test_a_flushed_store_with_histories_is_noticed_on_the_next_request(redis_url, table):
    store = _materialized(redis_url, table, "retrieval:hist-flush")
    store.get(np.array([10]))
    raw = __import__("redis").Redis.from_url(redis_url)
    raw.delete(*raw.keys("retrieval:hist-flush:*"))
    with pytest.raises(FeatureStoreError, match=r"holds no features under retrieval:hist-flush \(flushed, or never materialized"):
        store.get(np.array([10]))
