"""ensemble.query_cache: stored users' queries computed at load answer exactly as the full path does."""

import re

import numpy as np
import pandas as pd
import pytest

from common import contract
from ensemble.graph import GraphRunner
from ensemble.query_cache import why_not
from ensemble.request import merge, parse_request


def load(repository, query_cache_mb: float | None):
    """The repository's model in-process with query_cache_mb set (None: the parameter absent)."""
    from ensemble.loader import load_executor, model_parameters
    from ensemble.request import Limits

    params, max_batch = model_parameters(repository / contract.MODEL_NAME, 1)
    params = {k: v for k, v in params.items() if k != "query_cache_mb"}
    if query_cache_mb is not None:
        params["query_cache_mb"] = str(query_cache_mb)
    return load_executor(repository / contract.MODEL_NAME / "1" / "ensemble", Limits.from_parameters(params, max_batch), params=params)


@pytest.fixture(scope="module")
def uncached(repository):
    return load(repository, 0)


@pytest.fixture(scope="module")
def stored(trained):
    return pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES)


def test_the_served_model_builds_its_cache_for_every_stored_user(executor, stored):
    assert executor.cache is not None
    assert executor.cache_note.startswith(f"on, {len(stored):,} users, ")
    np.testing.assert_array_equal(executor.cache.user_ids, np.sort(stored.user_id.to_numpy()))
    assert all(not column.flags.writeable for column in executor.cache.columns.values())
    # what the search reads from the steps before it: the query vector, and the unknown-user flag for the answer
    assert sorted(c for _, c in executor.cache.columns) == sorted(["query_embedding", contract.OUTPUT_UNKNOWN])


def test_every_stored_user_gets_the_full_paths_answer_bit_for_bit(executor, uncached, stored, trained):
    """All stored users, in batches of 1 to 9 requests mixing cached rows with unknown users, rows
    that send a feature value and rows that send the 'not given' value, exclusions and top_k."""
    rng = np.random.default_rng(0)
    ids = stored.user_id.to_numpy().astype(np.int64)
    feature = trained["cfg"].data.user_features[0]
    start, checked, cached_rows, mixed = 0, 0, 0, 0
    while start < len(ids):
        batch, expected_hits = [], 0
        for _ in range(int(rng.integers(1, 10))):
            n = min(int(rng.integers(1, 4)), len(ids) - start)
            if n == 0:
                break
            user_ids = ids[start : start + n].copy()
            start += n
            unknown = rng.random(len(user_ids)) < 0.1
            user_ids[unknown] += 10**12
            tensors = {contract.INPUT_USER_ID: user_ids.reshape(-1, 1)}
            sent = np.zeros(len(user_ids), bool)
            if rng.random() < 0.2:  # the feature column, with a value in some rows and "not given" in the others
                sent = rng.random(len(user_ids)) < 0.5
                tensors[feature] = np.where(sent, 2, contract.FEATURE_NOT_GIVEN).reshape(-1, 1).astype(np.int64)
            params = {"top_k": int(rng.integers(1, 12))}
            if rng.random() < 0.2:
                params["exclude_seen"] = True
            if rng.random() < 0.2:
                tensors[contract.INPUT_EXCLUDE] = np.tile(np.arange(3, dtype=np.int64), (len(user_ids), 1))
            batch.append((tensors, params))
            expected_hits += int(np.count_nonzero(~unknown & ~sent))
        ours, theirs = executor.execute(batch), uncached.execute(batch)
        assert not [a for a in ours if isinstance(a, Exception)], ours
        assert executor.last.cached_users == expected_hits and uncached.last.cached_users == 0
        cached_rows += expected_hits
        mixed += 0 < expected_hits < executor.last.users
        for a, b in zip(ours, theirs):
            for name in (contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN):
                np.testing.assert_array_equal(a[name], b[name])
            checked += 1
    assert cached_rows > 0.7 * len(ids) and mixed > 10  # both paths and their mix were exercised
    # one user twice in a request, once with a feature value, and a stored user with "not given" sent
    twice = [({contract.INPUT_USER_ID: ids[[5, 5, 6]].reshape(-1, 1),
               feature: np.array([[2], [contract.FEATURE_NOT_GIVEN], [contract.FEATURE_NOT_GIVEN]], np.int64)}, {"top_k": 9})]
    ours, theirs = executor.execute(twice)[0], uncached.execute(twice)[0]
    assert executor.last.cached_users == 2
    for name in (contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN):
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_a_batch_of_cached_users_runs_only_the_search(executor, stored):
    executor.execute([({contract.INPUT_USER_ID: stored.user_id.to_numpy()[:4].astype(np.int64).reshape(-1, 1)}, {})])
    assert executor.last.cached_users == 4 and list(executor.last.stages_s) == ["SearchItems"]
    executor.execute([({contract.INPUT_USER_ID: np.array([[10**12], [stored.user_id[0]]])}, {})])
    assert executor.last.cached_users == 1
    assert list(executor.last.stages_s) == ["LookupUserFeatures", "TransformUserFeatures", "QueryTower", "SearchItems"]


def test_the_graph_run_in_two_parts_equals_one_run(uncached, stored):
    runner: GraphRunner = uncached.runner
    cut = runner.step_of("SearchItems")
    request = parse_request({contract.INPUT_USER_ID: np.append(stored.user_id.to_numpy()[:5].astype(np.int64), 10**12).reshape(-1, 1)},
                            {"top_k": 7}, uncached.limits, uncached.n_items)
    inputs = merge([request], uncached.limits.user_features)
    whole = runner.run(inputs)
    parts = runner.run_from(inputs, cut, runner.run_prefix(inputs, cut))
    for name in whole:
        np.testing.assert_array_equal(parts[name], whole[name])
    assert runner.step_of("NoSuchOperator") is None


@pytest.mark.parametrize("query_cache_mb, note", [
    (None, r"off: the model's config has no query_cache_mb \(exported before the query cache; `make ensemble` again\)"),
    (0, "off: serve.query_cache_mb is 0"),
    (0.001, r"off: [\d,]+ users would take \d+ MB, over serve.query_cache_mb=0.001"),
])
def test_the_cache_stays_off_when_turned_off_or_over_its_budget(repository, query_cache_mb, note):
    executor = load(repository, query_cache_mb)
    assert executor.cache is None
    assert re.fullmatch(note, executor.cache_note), executor.cache_note


def test_the_cache_stays_off_for_a_history_model(hist_executor):
    assert hist_executor.cache is None
    assert hist_executor.cache_note == "off: the model takes a history input (its metrics count every request's stored history ids)"


def test_the_cache_stays_off_for_the_tensorflow_tower(repository):
    from ensemble.ops.tower import QueryTower

    executor = load(repository, 0)
    tower = next(n.op for n in executor.runner.nodes if isinstance(n.op, QueryTower))
    assert why_not(executor.runner, 256) is None
    tower.runtime = "tensorflow"
    assert why_not(executor.runner, 256) == "the TensorFlow tower computes a row differently in different batches"


def test_the_cache_stays_off_for_a_transform_on_nvtabular(repository):
    from ensemble.ops.transform import TransformUserFeatures

    executor = load(repository, 0)
    transform = next(n.op for n in executor.runner.nodes if isinstance(n.op, TransformUserFeatures))
    transform._tables = None  # what load_artifacts leaves when the workflow has operators beyond Categorify
    assert why_not(executor.runner, 256) == ("the workflow transform runs on NVTabular (operators beyond Categorify), "
                                             "whose rows may depend on the batch")


def test_a_cache_that_fails_to_build_leaves_the_model_serving_the_full_path(repository, stored):
    """A stored row the tower refuses fails the build, not the load; the load log says why."""
    from ensemble.ops.tower import QueryTower

    executor = load(repository, 0)
    tower = next(n.op for n in executor.runner.nodes if isinstance(n.op, QueryTower))
    tower._numpy._rows = tower._numpy._rows.copy()
    tower._numpy._rows[0] = 0  # every code of the first feature is now outside its table
    note = executor.enable_query_cache(256)
    assert executor.cache is None
    assert re.fullmatch(r"off: building it failed \(IndexError: code \d+ of feature '\w+' is outside its embedding table of 0 rows\); "
                        r"every request runs the lookup, transform and tower", note), note


def test_a_store_replaced_after_load_drops_the_cache(repository, stored, uncached):
    from ensemble.feature_store import ParquetFeatureStore
    from ensemble.ops.lookup import LookupUserFeatures

    executor = load(repository, 256)
    lookup = next(n.op for n in executor.runner.nodes if isinstance(n.op, LookupUserFeatures))
    store = lookup.store
    lookup.set_store(ParquetFeatureStore(store.path, lookup.id_column, lookup.feature_names))
    request = [({contract.INPUT_USER_ID: stored.user_id.to_numpy()[:3].astype(np.int64).reshape(-1, 1)}, {})]
    ours, theirs = executor.execute(request)[0], uncached.execute(request)[0]
    assert executor.cache is None and executor.last.cached_users == 0
    assert executor.cache_note == "off: the feature store was replaced after load"
    np.testing.assert_array_equal(ours[contract.OUTPUT_ITEM_IDS], theirs[contract.OUTPUT_ITEM_IDS])
