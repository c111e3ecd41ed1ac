"""The history-aware model on the real server: stored and sent histories, batching, new users,
hostile history inputs, the metric, and append-click through Redis."""

import concurrent.futures as cf
import dataclasses
import re

import numpy as np
import pandas as pd
import pytest

from client import faults
from client.bad_requests import HISTORY_CASES, history_corpus, send
from common import contract
from common.config import MAX_HISTORY
from tests.conftest import HISTORY_LENGTH
from tests.integration.conftest import client_of

pytestmark = pytest.mark.integration

H = contract.INPUT_HISTORY
TOP_K = 10


@pytest.fixture(params=["grpc", "http"])
def hist_client(request, hist_server):
    yield from client_of(hist_server, request.param)


@pytest.fixture(scope="module")
def stored(hist_trained):
    return pd.read_parquet(hist_trained["artifacts"] / contract.ARTIFACT_USER_FEATURES)


@pytest.fixture(scope="module")
def catalogue(hist_trained):
    return np.load(hist_trained["artifacts"] / contract.ARTIFACT_ITEM_IDS)


def _matrix(lists) -> np.ndarray:
    width = max(1, max(len(x) for x in lists))
    out = np.full((len(lists), width), contract.HISTORY_PAD, np.int64)
    for i, row in enumerate(lists):
        out[i, : len(row)] = row
    return out


def _in_process(executor, users, history=None, top_k=TOP_K):
    tensors = {contract.INPUT_USER_ID: np.asarray(users, np.int64).reshape(-1, 1)}
    if history is not None:
        tensors[H] = _matrix(history)
    answer = executor.execute([(tensors, {"top_k": top_k})])[0]
    assert not isinstance(answer, Exception), answer
    return answer


def test_the_export_holds_histories_and_the_config_declares_the_input(stored, hist_repository):
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    lengths = stored[H].map(len)
    assert lengths.max() == HISTORY_LENGTH and (lengths > 0).mean() > 0.9
    config = text_format.Parse((hist_repository / contract.MODEL_NAME / "config.pbtxt").read_text(), mc.ModelConfig())
    (declared,) = [i for i in config.input if i.name == H]
    assert declared.optional and declared.allow_ragged_batch and list(declared.dims) == [-1]


def test_server_equals_in_process_with_stored_and_sent_history(hist_client, hist_executor, stored, catalogue):
    users = stored.user_id.to_numpy()[:6].tolist() + [10**9]
    sent = [[], [int(catalogue[3])], [int(catalogue[4]), 99_999_999, int(catalogue[5])], [], list(map(int, catalogue[10:17])), [],
            [int(catalogue[0]), int(catalogue[1])]]
    recs = hist_client.recommend(users, top_k=TOP_K, history=sent)
    expected = _in_process(hist_executor, users, sent)
    np.testing.assert_array_equal(recs.item_ids, expected[contract.OUTPUT_ITEM_IDS])
    np.testing.assert_allclose(recs.scores, expected[contract.OUTPUT_SCORES], atol=1e-4)
    assert recs.unknown_user.tolist() == [False] * 6 + [True]
    # Without a sent history the stored one alone is used; the users who sent none answer the same.
    plain = hist_client.recommend(users, top_k=TOP_K)
    np.testing.assert_array_equal(plain.item_ids, _in_process(hist_executor, users)[contract.OUTPUT_ITEM_IDS])
    for i in (0, 3, 5):
        np.testing.assert_array_equal(plain.item_ids[i], recs.item_ids[i])
    assert not np.array_equal(plain.scores[4], recs.scores[4])  # 7 sent ids replaced user 4's stored 5


def test_the_stored_history_is_what_the_lookup_serves(hist_executor, stored, catalogue):
    """Sending a known user's full stored history again leaves the latest N unchanged, so the answer too;
    N unknown ids push none of the stored ones out (they are left out before the latest N are kept)."""
    full = stored[stored[H].map(len) == HISTORY_LENGTH]
    row = full.iloc[[0]].reset_index(drop=True)
    history = [int(v) for v in row[H][0]]
    known = _in_process(hist_executor, [int(row.user_id[0])])
    tensors = {contract.INPUT_USER_ID: np.array([[int(row.user_id[0])]], np.int64), H: _matrix([history])}
    again = hist_executor.execute([(tensors, {"top_k": TOP_K})])[0]
    # Sent again, the same ids are new interactions: the latest 5 of stored + sent are the sent ones.
    np.testing.assert_array_equal(again[contract.OUTPUT_ITEM_IDS], known[contract.OUTPUT_ITEM_IDS])
    np.testing.assert_array_equal(again[contract.OUTPUT_SCORES], known[contract.OUTPUT_SCORES])
    unknown = _in_process(hist_executor, [int(row.user_id[0])], [[99_999_998] * HISTORY_LENGTH])
    np.testing.assert_array_equal(unknown[contract.OUTPUT_ITEM_IDS], known[contract.OUTPUT_ITEM_IDS])
    np.testing.assert_array_equal(unknown[contract.OUTPUT_SCORES], known[contract.OUTPUT_SCORES])
    other = next(int(i) for i in catalogue if int(i) not in history)
    one_new = _in_process(hist_executor, [int(row.user_id[0])], [[other]])  # a known id does push the oldest out
    assert not np.array_equal(one_new[contract.OUTPUT_SCORES], known[contract.OUTPUT_SCORES])


def test_sending_history_changes_the_answer_for_a_new_user(hist_client, hist_executor, catalogue):
    liked = [int(i) for i in catalogue[20:24]]
    cold = hist_client.recommend([10**9], top_k=TOP_K)
    warm = hist_client.recommend([10**9], top_k=TOP_K, history=[liked])
    assert cold.unknown_user.tolist() == warm.unknown_user.tolist() == [True]
    assert not np.array_equal(cold.item_ids, warm.item_ids)
    np.testing.assert_array_equal(warm.item_ids, _in_process(hist_executor, [10**9], [liked])[contract.OUTPUT_ITEM_IDS])
    unknown_only = hist_client.recommend([10**9], top_k=TOP_K, history=[[99_999_999, 99_999_998]])
    np.testing.assert_array_equal(unknown_only.item_ids, cold.item_ids)  # ids the model never saw are left out


def test_answers_with_history_do_not_depend_on_the_batch(hist_server, stored, catalogue):
    from client.client import RetrievalClient

    rng = np.random.default_rng(7)
    users = stored.user_id.to_numpy()[:64].tolist()
    sent = [[int(i) for i in rng.choice(catalogue, size=int(rng.integers(0, 9)))] for _ in users]
    with RetrievalClient(hist_server.grpc_url) as c:
        full = c.recommend(users, top_k=TOP_K, history=sent)
        for i in (0, 1, 17, 40, 63):
            one = c.recommend([users[i]], top_k=TOP_K, history=[sent[i]])
            np.testing.assert_array_equal(one.item_ids[0], full.item_ids[i])
            np.testing.assert_array_equal(one.scores[0], full.scores[i])
        seven = c.recommend(users[10:17], top_k=TOP_K, history=sent[10:17])
        np.testing.assert_array_equal(seven.item_ids, full.item_ids[10:17])


def test_concurrent_requests_with_histories_of_different_widths_merge_like_sequential_ones(hist_server, stored, catalogue):
    from client.client import RetrievalClient

    users = stored.user_id.to_numpy()
    jobs = [([int(u) for u in users[i: i + 1 + i % 3]], [[int(x) for x in catalogue[i: i + (i + j) % 6]] for j in range(1 + i % 3)])
            for i in range(40)]
    with RetrievalClient(hist_server.grpc_url) as c:
        sequential = [c.recommend(u, top_k=5, history=h).item_ids for u, h in jobs]

    def ask(job):
        with RetrievalClient(hist_server.grpc_url) as cc:
            return cc.recommend(job[0], top_k=5, history=job[1]).item_ids

    with cf.ThreadPoolExecutor(8) as pool:
        for seq, con in zip(sequential, pool.map(ask, jobs)):
            np.testing.assert_array_equal(seq, con)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_bad_history_gets_its_own_clear_error(hist_server, stored, protocol):
    import tritonclient.grpc as grpc_module
    import tritonclient.http as http_module

    from client.client import RetrievalClient

    module = grpc_module if protocol == "grpc" else http_module
    url = hist_server.grpc_url if protocol == "grpc" else hist_server.http_url
    cases = history_corpus(HISTORY_LENGTH, MAX_HISTORY, int(stored.user_id[0]))
    assert len(cases) == HISTORY_CASES and len({c.name for c in cases}) == HISTORY_CASES
    stubs = set(faults.stub_pids(hist_server.process.pid))
    raw = module.InferenceServerClient(url)
    for case in cases:
        error = send(module, raw, contract.MODEL_NAME, case)
        assert error is not None, f"{case.name} was answered"
        assert re.search(case.expected(protocol), str(error)), f"{case.name}: {error}"
        assert "Traceback" not in str(error), case.name
    raw.close()
    with RetrievalClient(url, protocol) as c:
        assert c.model_ready() and c.recommend([int(stored.user_id[0])], top_k=3).item_ids.shape == (1, 3)
    assert set(faults.stub_pids(hist_server.process.pid)) == stubs


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_without_history_refuses_the_input(server, trained, protocol):
    import tritonclient.grpc as grpc_module
    import tritonclient.http as http_module

    module = grpc_module if protocol == "grpc" else http_module
    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id
    (case,) = history_corpus(0, MAX_HISTORY, int(users[0]))
    raw = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    error = send(module, raw, contract.MODEL_NAME, case)
    raw.close()
    assert error is not None and re.search(case.expected(protocol), str(error)), str(error)


def test_the_history_metric_counts_known_and_unknown_ids(hist_server, stored, catalogue):
    import time

    from client.client import RetrievalClient
    from ensemble.metrics import FLUSH_INTERVAL_S
    from tests.integration.test_metrics import metric, scrape, scrape_after

    new_users = [10**9 + 1, 10**9 + 2]  # no stored history: what reaches the query is what was sent
    # The model sends every FLUSH_INTERVAL_S: let the previous tests' counts arrive before the baseline.
    time.sleep(3 * FLUSH_INTERVAL_S)
    before = scrape(hist_server)
    with RetrievalClient(hist_server.grpc_url) as c:
        for _ in range(3):
            c.recommend(new_users, top_k=3, history=[[int(catalogue[1]), 99_999_999, int(catalogue[2])], [99_999_998]])
    after = scrape_after(hist_server, before, "retrieval_history_items_total", 12)

    def delta(**labels):
        return metric(after, "retrieval_history_items_total", **labels) - metric(before, "retrieval_history_items_total", **labels)

    assert delta(kind="known") == 3 * 2 and delta(kind="unknown") == 3 * 2


@pytest.fixture(scope="module")
def hist_redis_repository(hist_trained, redis_url, tmp_path_factory):
    from common.manifest import artifacts_config, read_manifest
    from ensemble.__main__ import main
    from ensemble.build import build_repository

    assert main(["materialize", "--artifacts", str(hist_trained["artifacts"]), "--redis", redis_url]) == 0
    cfg = artifacts_config(read_manifest(hist_trained["artifacts"]))
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, feature_store=redis_url))
    return build_repository(hist_trained["artifacts"], tmp_path_factory.mktemp("hist_redis_repo") / "repo", cfg=cfg)


def test_append_click_reaches_the_next_answer_through_redis(hist_redis_repository, hist_trained, hist_executor, redis_url,
                                                            stored, catalogue, tmp_path, capsys):
    from client.client import RetrievalClient
    from ensemble.__main__ import main
    from ensemble.server import TritonServer
    from tests.integration.conftest import free_serve_config

    user = int(stored.user_id[3])
    clicks = [int(catalogue[30]), int(catalogue[31])]
    with TritonServer(hist_redis_repository, free_serve_config(), log_path=tmp_path / "log.txt") as server:
        with RetrievalClient(server.grpc_url) as client:
            before = client.recommend([user, 10**9], top_k=TOP_K)
            np.testing.assert_array_equal(before.item_ids, _in_process(hist_executor, [user, 10**9])[contract.OUTPUT_ITEM_IDS])
            capsys.readouterr()
            args = ["append-click", "--artifacts", str(hist_trained["artifacts"]), "--redis", redis_url, "--user", str(user), "--item"]
            assert main([*args, *map(str, clicks)]) == 0
            latest = ([int(v) for v in stored[H][3]] + clicks)[-HISTORY_LENGTH:]
            assert capsys.readouterr().out == f"user {user}: history now {latest} (latest {HISTORY_LENGTH} kept)\n"
            assert main(["append-click", "--artifacts", str(hist_trained["artifacts"]), "--redis", redis_url,
                         "--user", str(10**9), "--item", str(clicks[0])]) == 0  # a new user's first click
            after = client.recommend([user, 10**9], top_k=TOP_K)
    # Served from Redis after the clicks == the embedded table with the same clicks sent.
    expected = _in_process(hist_executor, [user, 10**9], [clicks, clicks[:1]])
    np.testing.assert_array_equal(after.item_ids, expected[contract.OUTPUT_ITEM_IDS])
    np.testing.assert_allclose(after.scores, expected[contract.OUTPUT_SCORES], atol=1e-4)
    assert not np.array_equal(after.scores, before.scores)
    assert after.unknown_user.tolist() == [False, True]


def test_deploying_a_history_model_over_one_without_adds_the_input_and_rollback_removes_it(
        repository, hist_trained, hist_executor, stored, catalogue, tmp_path, monkeypatch):
    """Version 1 has no history input, version 2 (the history model) has one: each version's own
    config.pbtxt is served, so the input comes and goes with the version; plain requests never fail."""
    import shutil

    from client.client import RetrievalClient
    from common.errors import ClientError
    from ensemble import deploy
    from ensemble.server import TritonServer
    from tests.integration.conftest import free_serve_config
    from tests.integration.test_deploy import Loop

    monkeypatch.setenv(contract.ADMIN_KEY_ENV, "test-admin-key")
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    assert deploy.add_version(repo, hist_trained["artifacts"]) == 2
    user, liked = int(stored.user_id[0]), [int(catalogue[5]), int(catalogue[6])]
    refused = f"unexpected inference input '{H}' for model '{contract.MODEL_NAME}'"
    with TritonServer(repo, free_serve_config(), log_path=tmp_path / "log.txt", model_control="explicit") as server:
        loop = Loop(server.grpc_url, [user])
        loop.start()
        with RetrievalClient(server.grpc_url) as client:
            with pytest.raises(ClientError, match=re.escape(refused)):
                client.recommend([user], top_k=5, history=[liked])
            deploy.activate(repo, 2, server.grpc_url)
            answer = client.recommend([user], top_k=5, history=[liked])
            assert answer.model_version == "2"
            np.testing.assert_array_equal(answer.item_ids, _in_process(hist_executor, [user], [liked], top_k=5)[contract.OUTPUT_ITEM_IDS])
            assert deploy.rollback(repo, server.grpc_url) == 1
            with pytest.raises(ClientError, match=re.escape(refused)):
                client.recommend([user], top_k=5, history=[liked])
        loop.stop.set()
        loop.join(10)
    assert loop.errors == [] and {v for v, _ in loop.answers} >= {"1"}
