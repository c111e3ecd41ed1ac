"""ensemble.executor: request validation, merging, and a graph runner equal to merlin's."""

import numpy as np
import pandas as pd
import pytest
from merlin.systems.dag import Ensemble
from merlin.table import TensorTable

from common import contract
from common.errors import RequestError
from ensemble.request import Limits, merge, parse_parameters, parse_request, split

LIMITS = Limits(max_batch_size=4, default_top_k=3, max_top_k=20, max_exclude=2)


def users(*ids):
    return np.array(ids, dtype=np.int64).reshape(-1, 1)


def test_a_valid_request_with_defaults():
    r = parse_request({contract.INPUT_USER_ID: users(1, 2)}, {}, LIMITS, n_items=100)
    assert r.top_k == 3 and r.exclude.shape == (2, 0) and r.exclude_seen is False
    r = parse_request({contract.INPUT_USER_ID: users(1), contract.INPUT_EXCLUDE: np.array([[5, -1]])},
                      {"top_k": "7", "exclude_seen": "true"}, LIMITS, n_items=100)
    assert r.top_k == 7 and r.exclude_seen is True


@pytest.mark.parametrize(
    "tensors, params, message",
    [
        ({}, {}, r"missing input 'user_id' \(INT64 \[batch, 1\]\)"),
        ({contract.INPUT_USER_ID: users(1).astype(np.int32)}, {}, "must be INT64, got int32"),
        ({contract.INPUT_USER_ID: np.array([1, 2], np.int64)}, {}, r"shape \[batch, 1\], got \[2\]"),
        ({contract.INPUT_USER_ID: np.zeros((0, 1), np.int64)}, {}, "holds no users; send 1 to 4"),
        ({contract.INPUT_USER_ID: users(1, 2, 3, 4, 5)}, {}, "batch of 5 users is over the maximum of 4"),
        ({contract.INPUT_USER_ID: users(1)}, {"top_k": 0}, r"top_k must be in 1..20, got 0"),
        ({contract.INPUT_USER_ID: users(1)}, {"top_k": -3}, r"top_k must be in 1..20, got -3"),
        ({contract.INPUT_USER_ID: users(1)}, {"top_k": 21}, r"top_k must be in 1..20, got 21"),
        ({contract.INPUT_USER_ID: users(1)}, {"top_k": "ten"}, "top_k must be an integer, got 'ten'"),
        ({contract.INPUT_USER_ID: users(1)}, {"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({contract.INPUT_USER_ID: users(1)}, {"top_k": True}, "top_k must be an integer, got True"),
        ({contract.INPUT_USER_ID: users(1)}, {"exclude_seen": "maybe"}, "exclude_seen must be a boolean"),
        ({contract.INPUT_USER_ID: users(1), contract.INPUT_EXCLUDE: np.array([[1.0]])}, {}, "must be INT64, got float64"),
        ({contract.INPUT_USER_ID: users(1, 2), contract.INPUT_EXCLUDE: np.array([[1]], np.int64)}, {}, r"shape \[2, n\]"),
        ({contract.INPUT_USER_ID: users(1), contract.INPUT_EXCLUDE: np.ones((1, 3), np.int64)}, {}, "3 ids per user, over the maximum of 2"),
    ],
)
def test_every_bad_request_gets_its_own_message(tensors, params, message):
    with pytest.raises(RequestError, match=message):
        parse_request(tensors, params, LIMITS, n_items=100)


def test_top_k_is_capped_by_the_catalogue():
    with pytest.raises(RequestError, match=r"top_k must be in 1..8, got 9"):
        parse_request({contract.INPUT_USER_ID: users(1)}, {"top_k": 9}, LIMITS, n_items=8)


def test_parameters_json():
    assert parse_parameters(None) == {} and parse_parameters('{"top_k": 5}') == {"top_k": 5}
    assert parse_parameters("{}") == {} and parse_parameters("") == {}
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_parameters("{")
    with pytest.raises(RequestError, match="must be a JSON object"):
        parse_parameters("[1]")


def test_merge_and_split_keep_each_request_apart():
    a = parse_request({contract.INPUT_USER_ID: users(1, 2)}, {"top_k": 2}, LIMITS, 100)
    b = parse_request({contract.INPUT_USER_ID: users(3), contract.INPUT_EXCLUDE: np.array([[9, 8]])}, {"top_k": 4}, LIMITS, 100)
    merged = merge([a, b])
    assert merged["user_id"].tolist() == [1, 2, 3] and merged["top_k"].tolist() == [2, 2, 4]
    assert merged[contract.INPUT_EXCLUDE].tolist() == [[-1, -1], [-1, -1], [9, 8]]
    outputs = {contract.OUTPUT_ITEM_IDS: np.arange(12).reshape(3, 4), contract.OUTPUT_SCORES: np.zeros((3, 4), np.float32),
               contract.OUTPUT_UNKNOWN: np.array([False, True, False])}
    first, second = split(outputs, [a, b])
    assert first[contract.OUTPUT_ITEM_IDS].tolist() == [[0, 1], [4, 5]] and second[contract.OUTPUT_ITEM_IDS].tolist() == [[8, 9, 10, 11]]
    assert first[contract.OUTPUT_UNKNOWN].tolist() == [[False], [True]]


def test_merge_fills_features_nobody_sent_and_keeps_the_ones_sent():
    limits = Limits(max_batch_size=4, user_features=("user_age", "user_gender"))
    a = parse_request({contract.INPUT_USER_ID: users(1, 2), "user_age": np.array([[5], [-1]])}, {}, limits, 100)
    b = parse_request({contract.INPUT_USER_ID: users(3)}, {"exclude_seen": True}, limits, 100)
    merged = merge([a, b], limits.user_features)
    assert merged["user_age"].tolist() == [5, -1, contract.FEATURE_NOT_GIVEN]
    assert merged["user_gender"].tolist() == [contract.FEATURE_NOT_GIVEN] * 3 and merged["user_gender"].dtype == np.int64
    alone = merge([b], limits.user_features)
    together = merge([b, b], limits.user_features)
    for name, values in alone.items():  # one request merges like any other batch
        assert values.dtype == together[name].dtype and values.tolist() == together[name][: len(values)].tolist(), name
    assert alone[contract.INPUT_USER_ID] is not b.user_ids  # a fresh array, not the request's tensor


class _Recorder:
    """The part of a Python backend's metric API that ServingMetrics calls, writing down each call."""

    calls: list = []

    class TritonError(Exception):
        pass

    class Metric:
        def __init__(self, labels, buckets=None):
            self.labels = labels

        def increment(self, value):
            _Recorder.calls.append(("increment", self.labels, value))

        def observe(self, value):
            _Recorder.calls.append(("observe", self.labels, value))

    class MetricFamily:
        COUNTER, HISTOGRAM = "counter", "histogram"

        def __init__(self, name, text, kind):
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 - the backend's name
            return _Recorder.Metric({"family": self.name, **labels}, buckets)


def test_busy_histograms_observe_an_even_sample_and_counters_stay_exact():
    from ensemble.backend import BackendCapabilities
    from ensemble.executor import BatchReport
    from ensemble.metrics import MAX_OBSERVED_PER_SEND, ServingMetrics

    _Recorder.calls = []
    metrics = ServingMetrics(_Recorder, BackendCapabilities(_Recorder), "retrieval", "1", flush_interval_s=3600)
    n = 3 * MAX_OBSERVED_PER_SEND + 1  # 25 batches: every 4th is observed (ceil(25 / 8) = 4), 7 of them
    for users in range(1, n + 1):
        metrics.record(BatchReport(ok=1, users=users, parse_s=0.001))
    metrics.close()
    observed = [v for c, labels, v in _Recorder.calls if c == "observe" and labels["family"] == "retrieval_batch_users"]
    assert observed == [1.0, 5.0, 9.0, 13.0, 17.0, 21.0, 25.0]
    assert [v for c, labels, v in _Recorder.calls if labels.get("outcome") == "ok"] == [n]
    assert [v for c, labels, v in _Recorder.calls if labels.get("kind") == "known"] == [n * (n + 1) // 2]


@pytest.mark.parametrize("histograms", [True, False])
def test_metrics_are_queued_per_batch_and_sent_coalesced(histograms):
    from ensemble.backend import BackendCapabilities
    from ensemble.executor import BatchReport
    from ensemble.metrics import ServingMetrics

    caps = BackendCapabilities(_Recorder)
    caps.histograms = histograms
    _Recorder.calls = []
    metrics = ServingMetrics(_Recorder, caps, "retrieval", "1", flush_interval_s=3600)
    stages = {"LookupUserFeatures": 0.001, "QueryTower": 0.002, "SelectionOp": 9.0}
    metrics.record(BatchReport(ok=2, invalid=1, users=3, unknown_users=1, excluded_items=4, parse_s=0.5, stages_s=stages))
    metrics.record(BatchReport(ok=1, users=1, cached_users=1, parse_s=0.25, stages_s=stages))
    metrics.record(BatchReport(ok=2, users=2, cached_users=2, parse_s=0.25, stages_s={"SearchItems": 0.001}))
    metrics.record_failure("unavailable", 2)
    assert _Recorder.calls == []  # nothing reaches the backend on the request path
    metrics.close()

    def sent(call, family, **labels):
        return [v for c, got, v in _Recorder.calls if c == call and got["family"] == family and labels.items() <= got.items()]

    assert sent("increment", "retrieval_requests_total", outcome="ok") == [5]
    assert sent("increment", "retrieval_requests_total", outcome="invalid") == [1]
    assert sent("increment", "retrieval_requests_total", outcome="unavailable") == [2]
    assert sent("increment", "retrieval_requests_total", outcome="error") == []  # zeros are not sent
    assert sent("increment", "retrieval_users_total", kind="known") == [2 + 1 + 2]
    assert sent("increment", "retrieval_cached_users_total") == [1 + 2]
    assert sent("increment", "retrieval_excluded_items_total", source="seen") == []
    if histograms:  # one observation per executed batch that ran the stage
        assert sent("observe", "retrieval_stage_seconds", stage="parse") == [0.5, 0.25, 0.25]
        assert sent("observe", "retrieval_stage_seconds", stage="tower") == [0.002, 0.002]
        assert sent("observe", "retrieval_stage_seconds", stage="search") == [0.001]
        assert sent("observe", "retrieval_batch_users") == [3, 1, 2]
        assert sent("observe", "retrieval_stage_seconds", stage="transform") == []
    else:  # sums and counts as counters, one increment each per send
        assert sent("increment", "retrieval_stage_seconds_sum", stage="parse") == [1.0]
        assert sent("increment", "retrieval_stage_seconds_count", stage="parse") == [3]
        assert sent("increment", "retrieval_stage_seconds_count", stage="tower") == [2]
        assert sent("increment", "retrieval_batch_users_sum") == [6.0] and sent("increment", "retrieval_batch_users_count") == [3]
    calls = len(_Recorder.calls)
    metrics.record(BatchReport(ok=1, users=1))  # after close: dropped, nothing sent
    assert metrics.flush() == 0 and len(_Recorder.calls) == calls


def test_graph_runner_equals_merlins_executor(executor, trained):
    user_ids = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:6]
    request = parse_request({contract.INPUT_USER_ID: users(*user_ids, 10**9)}, {"top_k": 5}, executor.limits, executor.n_items)
    inputs = merge([request], executor.limits.user_features)
    ours = executor.runner.run(inputs)
    ensemble: Ensemble = executor.runner.ensemble
    theirs = ensemble.transform(TensorTable(inputs))
    for name in (contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN):
        np.testing.assert_array_equal(ours[name], theirs[name].values)


def test_bad_requests_do_not_disturb_good_ones_in_the_same_batch(executor, trained):
    ids = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()
    good = ({contract.INPUT_USER_ID: users(*ids[:3])}, {"top_k": 4})
    alone = executor.execute([good])[0]
    answers = executor.execute([({}, {}), good, ({contract.INPUT_USER_ID: users(ids[0])}, {"top_k": 0}), good])
    assert isinstance(answers[0], RequestError) and isinstance(answers[2], RequestError)
    for answer in (answers[1], answers[3]):
        np.testing.assert_array_equal(answer[contract.OUTPUT_ITEM_IDS], alone[contract.OUTPUT_ITEM_IDS])
        np.testing.assert_array_equal(answer[contract.OUTPUT_SCORES], alone[contract.OUTPUT_SCORES])


def test_batched_answers_equal_one_user_answers(executor, trained):
    ids = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:7]
    batch = executor.execute([({contract.INPUT_USER_ID: users(*ids)}, {"top_k": 6})])[0]
    for i, user in enumerate(ids):
        one = executor.execute([({contract.INPUT_USER_ID: users(user)}, {"top_k": 6})])[0]
        np.testing.assert_array_equal(one[contract.OUTPUT_ITEM_IDS][0], batch[contract.OUTPUT_ITEM_IDS][i])
        np.testing.assert_allclose(one[contract.OUTPUT_SCORES][0], batch[contract.OUTPUT_SCORES][i], atol=1e-5)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.array([[3]], np.int32), "must be INT64 raw feature ids, got int32"),
        (np.array([[3, 4]], np.int64), r"must have shape \[1, 1\], got \[1, 2\]"),
        (np.array([[-7]], np.int64), "holds -7; raw feature ids are >= 0, or -1 for 'not given'"),
    ],
)
def test_bad_feature_values(value, message):
    limits = Limits(user_features=("user_age",))
    with pytest.raises(RequestError, match=message):
        parse_request({contract.INPUT_USER_ID: users(1), "user_age": value}, {}, limits, n_items=10)


def test_unknown_parameters_are_rejected():
    with pytest.raises(RequestError, match=r"unknown request parameters \['topk'\]"):
        parse_request({contract.INPUT_USER_ID: users(1)}, {"topk": 3}, LIMITS, n_items=10)


@pytest.fixture(scope="module")
def oracle(trained):
    """An independent path: NVTabular's own transform, the Keras tower, numpy top-k."""
    import nvtabular as nvt
    import tensorflow as tf

    from train.etl import user_workflow
    from train.index import exact_top_k

    art = trained["artifacts"]
    workflow = user_workflow(nvt.Workflow.load(str(art / "workflow")), trained["cfg"].data)
    tower = tf.keras.models.load_model(art / contract.ARTIFACT_QUERY_TOWER, compile=False)
    items = np.load(art / contract.ARTIFACT_ITEM_EMBEDDINGS)
    item_ids = np.load(art / contract.ARTIFACT_ITEM_IDS)

    def top(frame: pd.DataFrame, k: int) -> np.ndarray:
        encoded = workflow._transform_df(frame)
        q = tower({c: tf.constant(encoded[c].to_numpy()) for c in encoded.columns}, training=False).numpy()
        return item_ids[exact_top_k(q, items, k)]

    return top


def test_new_user_with_features_goes_through_the_workflow_and_tower(executor, trained, oracle):
    stored = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES)
    template = stored.iloc[[3]].reset_index(drop=True)
    frame = template.assign(user_id=10**9)  # a new id, someone else's features
    tensors = {contract.INPUT_USER_ID: users(10**9)}
    tensors.update({f: frame[[f]].to_numpy(np.int64) for f in trained["cfg"].data.user_features})
    answer = executor.execute([(tensors, {"top_k": 8})])[0]
    assert answer[contract.OUTPUT_UNKNOWN].tolist() == [[True]]
    np.testing.assert_array_equal(answer[contract.OUTPUT_ITEM_IDS], oracle(frame, 8))


def test_new_user_without_features_gets_the_all_null_row(executor, trained):
    data = trained["cfg"].data
    answer = executor.execute([({contract.INPUT_USER_ID: users(10**9)}, {"top_k": 5})])[0]
    # Stock Categorify cannot encode integer nulls on CPU, so the oracle feeds NVTabular's codes
    # directly: 1 for a null feature, 2 (out of vocabulary) for an unseen id.
    import tensorflow as tf

    from train.index import exact_top_k

    art = trained["artifacts"]
    tower = tf.keras.models.load_model(art / contract.ARTIFACT_QUERY_TOWER, compile=False)
    codes = {f: tf.constant([1], tf.int32) for f in data.user_features}
    codes[data.user_id] = tf.constant([2], tf.int32)
    q = tower(codes, training=False).numpy()
    expected = np.load(art / contract.ARTIFACT_ITEM_IDS)[exact_top_k(q, np.load(art / contract.ARTIFACT_ITEM_EMBEDDINGS), 5)]
    np.testing.assert_array_equal(answer[contract.OUTPUT_ITEM_IDS], expected)


def test_sent_features_replace_stored_ones(executor, trained, oracle):
    stored = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES)
    user = stored.iloc[[0]].reset_index(drop=True)
    plain = executor.execute([({contract.INPUT_USER_ID: users(user.user_id[0])}, {"top_k": 6})])[0]
    same = executor.execute([({contract.INPUT_USER_ID: users(user.user_id[0]), "user_age": user[["user_age"]].to_numpy(np.int64)}, {"top_k": 6})])[0]
    np.testing.assert_array_equal(plain[contract.OUTPUT_ITEM_IDS], same[contract.OUTPUT_ITEM_IDS])
    other_age = int(stored.user_age[stored.user_age != user.user_age[0]].iloc[0])
    changed = executor.execute([({contract.INPUT_USER_ID: users(user.user_id[0]), "user_age": np.array([[other_age]])}, {"top_k": 6})])[0]
    np.testing.assert_array_equal(changed[contract.OUTPUT_ITEM_IDS], oracle(user.assign(user_age=other_age), 6))
    assert changed[contract.OUTPUT_UNKNOWN].tolist() == [[False]]


def test_protobuf_stays_compiled_on_the_request_path():
    """merlin-systems sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python when its TensorFlow op is
    imported; by then protobuf is loaded, so our processes keep the C implementation."""
    import ensemble.loader  # noqa: F401 - the import order of the served model
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() != "python"


def test_a_loaded_model_searches_on_serve_threads_and_keeps_blas_on_one(repository):
    import faiss
    from threadpoolctl import threadpool_info

    from ensemble.loader import load_model_in_process, model_parameters
    from ensemble.ops.search import SearchItems

    params, _ = model_parameters(repository / contract.MODEL_NAME, 1)
    assert params["threads"] == "2"  # serve.threads' default
    assert params["probe_split_min_codes"] == "50000"  # serve.probe_split_min_codes' default
    faiss.omp_set_num_threads(1)  # whatever ran before in this process
    executor = load_model_in_process(repository)
    assert faiss.omp_get_max_threads() == 2
    search = next(node.op for node in executor.runner.nodes if isinstance(node.op, SearchItems))
    assert search.probe_split_min_codes == 50_000 and search._split is None  # 2,000 items: one thread a query
    # the compiled tower's small matmuls ran 8x slower with OpenBLAS threads beside FAISS's team
    blas = {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
    assert blas == {1}
