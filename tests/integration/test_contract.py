"""The serving contract on the real server: batches, concurrency, new users and the bad-input corpus."""

import concurrent.futures as cf
import re

import numpy as np
import pandas as pd
import pytest

from client import faults
from client.bad_requests import CASES, corpus, send
from common import contract

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def known_users(trained):
    return pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()


def stub_pids(server) -> set[int]:
    return set(faults.stub_pids(server.process.pid))


def test_batches_of_1_7_and_256_give_the_same_per_user_answers(client, known_users):
    users = known_users[:256].tolist()
    full = client.recommend(users, top_k=10)
    seven = client.recommend(users[:7], top_k=10)
    np.testing.assert_array_equal(seven.item_ids, full.item_ids[:7])
    for i in (0, 3, 6, 100, 255):
        one = client.recommend([users[i]], top_k=10)
        np.testing.assert_array_equal(one.item_ids[0], full.item_ids[i])
        np.testing.assert_allclose(one.scores[0], full.scores[i], atol=1e-5)


def test_concurrent_clients_through_dynamic_batching_match_sequential_answers(server, known_users):
    from client.client import RetrievalClient

    jobs = [([int(u) for u in known_users[i: i + 1 + i % 4]], 3 + i % 5) for i in range(48)]
    with RetrievalClient(server.grpc_url) as c:
        sequential = [c.recommend(users, top_k=k).item_ids for users, k in jobs]
        before = c._client.get_inference_statistics(contract.MODEL_NAME, as_json=True)["model_stats"][0]

    def ask(job):
        with RetrievalClient(server.grpc_url) as cc:
            return cc.recommend(job[0], top_k=job[1]).item_ids

    with cf.ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, jobs))
    for seq, con in zip(sequential, concurrent):
        np.testing.assert_array_equal(seq, con)
    with RetrievalClient(server.grpc_url) as c:
        after = c._client.get_inference_statistics(contract.MODEL_NAME, as_json=True)["model_stats"][0]
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert executions < len(jobs) <= requests  # some requests were merged into one execution


def test_a_new_user_with_features_over_the_wire(client, executor, trained):
    stored = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES)
    features = {f: [int(stored[f].iloc[5]), None] for f in trained["cfg"].data.user_features}
    recs = client.recommend([10**9, 10**9 + 1], top_k=5, features=features)
    tensors = {contract.INPUT_USER_ID: np.array([[10**9], [10**9 + 1]], np.int64)}
    tensors.update({f: np.array([[v[0]], [-1]], np.int64) for f, v in features.items()})
    expected = executor.execute([(tensors, {"top_k": 5})])[0]
    np.testing.assert_array_equal(recs.item_ids, expected[contract.OUTPUT_ITEM_IDS])
    assert recs.unknown_user.tolist() == [True, True]
    assert not np.array_equal(recs.item_ids[0], recs.item_ids[1])  # the features made a difference


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_bad_request_gets_its_own_clear_error(server, known_users, protocol, trained, executor):
    import tritonclient.grpc as grpc_module
    import tritonclient.http as http_module

    module = grpc_module if protocol == "grpc" else http_module
    url = server.grpc_url if protocol == "grpc" else server.http_url
    serve = trained["cfg"].serve
    cases = corpus(serve.max_batch_size, serve.max_top_k, serve.max_exclude, "user_age", int(known_users[0]), executor.n_items)
    assert len(cases) == CASES and len({c.name for c in cases}) == CASES
    from client.client import RetrievalClient

    with RetrievalClient(url, protocol) as good_client:
        before = good_client.recommend(known_users[:5].tolist(), top_k=7)
        stubs = stub_pids(server)
        raw = module.InferenceServerClient(url)
        for case in cases:
            error = send(module, raw, contract.MODEL_NAME, case)
            assert error is not None, f"{case.name} was answered"
            message = str(error)
            assert re.search(case.expected(protocol), message), f"{case.name}: {message}"
            assert "Traceback" not in message and 'File "' not in message, f"{case.name} leaked a traceback: {message}"
        raw.close()
        after = good_client.recommend(known_users[:5].tolist(), top_k=7)
        assert good_client.model_ready()
    np.testing.assert_array_equal(before.item_ids, after.item_ids)
    assert stub_pids(server) == stubs  # no stub process died or was restarted


def test_bad_and_good_requests_in_the_same_dynamic_batch(server, known_users, trained, executor):
    import tritonclient.grpc as grpc_module

    from client.client import RetrievalClient

    serve = trained["cfg"].serve
    bad = [c for c in corpus(serve.max_batch_size, serve.max_top_k, serve.max_exclude, "user_age", int(known_users[0]), executor.n_items)
           if c.name in ("top_k_zero", "unknown_parameter", "feature_out_of_range", "exclude_too_wide")]
    with RetrievalClient(server.grpc_url) as c:
        expected = c.recommend([int(known_users[1])], top_k=4).item_ids

    def good(_):
        with RetrievalClient(server.grpc_url) as cc:
            return cc.recommend([int(known_users[1])], top_k=4).item_ids

    def bad_one(case):
        raw = grpc_module.InferenceServerClient(server.grpc_url)
        try:
            return send(grpc_module, raw, contract.MODEL_NAME, case)
        finally:
            raw.close()

    with cf.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, i) for i in range(24)]
        bads = [pool.submit(bad_one, case) for case in bad * 6]
        for f in goods:
            np.testing.assert_array_equal(f.result(), expected)
        for f, case in zip(bads, bad * 6):
            assert re.search(case.expected("grpc"), str(f.result())), case.name
