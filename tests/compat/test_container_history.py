"""The history-aware model on the Merlin 23.08 container's stack (Python 3.10, tritonserver 2.36,
FAISS 1.7.2, pyarrow 11): the same answers as the main server with stored and sent histories, and
every hostile history input refused with its message."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from client.bad_requests import history_corpus, send
from common import contract
from common.config import MAX_HISTORY
from tests.compat.test_container_stack import CONTAINER_ENV
from tests.conftest import HISTORY_LENGTH

pytestmark = [pytest.mark.integration, pytest.mark.compat]


@pytest.fixture(scope="module")
def container_hist_server(hist_repository, compat_python, tmp_path_factory):
    from ensemble.server import TritonServer
    from ensemble.stack import ServerStack
    from tests.integration.conftest import free_serve_config

    log = tmp_path_factory.mktemp("compat_hist") / "tritonserver-2.36.log"
    with TritonServer(hist_repository, free_serve_config(), log_path=log, stack=ServerStack.of_python(compat_python),
                      extra_env=CONTAINER_ENV) as server:
        yield server
    assert "2.36.0" in log.read_text(), "not the 2.36 server"


@pytest.fixture(scope="module")
def users(hist_trained):
    return pd.read_parquet(hist_trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:8].tolist() + [10**9]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_history_answers_equal_the_main_servers(container_hist_server, hist_server, hist_trained, users, protocol):
    from client.client import RetrievalClient

    items = np.load(hist_trained["artifacts"] / contract.ARTIFACT_ITEM_IDS)
    sent = [[int(i) for i in items[k: k + k % 7]] for k in range(len(users) - 1)] + [[int(items[3]), 99_999_999]]

    def ask(srv):
        with RetrievalClient(srv.grpc_url if protocol == "grpc" else srv.http_url, protocol) as client:
            return client.recommend(users, top_k=20), client.recommend(users, top_k=20, history=sent)

    for ours, theirs in zip(ask(hist_server), ask(container_hist_server)):
        np.testing.assert_array_equal(theirs.item_ids, ours.item_ids)
        np.testing.assert_allclose(theirs.scores, ours.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_bad_history_gets_its_own_message(container_hist_server, users, protocol):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if protocol == "grpc" else httpclient
    raw = module.InferenceServerClient(container_hist_server.grpc_url if protocol == "grpc" else container_hist_server.http_url)
    try:
        for case in history_corpus(HISTORY_LENGTH, MAX_HISTORY, int(users[0])):
            error = send(module, raw, contract.MODEL_NAME, case)
            assert error is not None, f"{case.name} was answered"
            assert re.search(case.expected(protocol, stack="23.06"), str(error)), f"{case.name}: {error}"
    finally:
        raw.close()
