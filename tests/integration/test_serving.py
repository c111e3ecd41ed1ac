"""The real server answers what the same pipeline computes in-process, over gRPC and HTTP."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import contract
from common.errors import ClientError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def known_users(trained):
    return pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()


def test_the_model_is_ready_in_the_servers_own_list(client, monkeypatch):
    """The repository index is a restricted API: refused without the admin key or with a wrong one
    (test_deploy.py lists it with the key)."""
    from common.errors import ClientError

    monkeypatch.delenv(contract.ADMIN_KEY_ENV, raising=False)
    assert client.server_ready() and client.model_ready()
    with pytest.raises(ClientError, match=r"repository index refused by \S+: This (protocol|API) is restricted, expecting header '(triton-grpc-protocol-)?admin-key' \(it needs the server's admin key, \$RETRIEVAL_ADMIN_KEY\)$"):
        client.repository_index()
    with pytest.raises(ClientError, match=r"repository index refused by \S+: This (protocol|API) is restricted"):
        client.repository_index(admin_key="a wrong key")


def test_server_answers_equal_the_in_process_pipeline(client, executor, known_users, trained):
    users = [*known_users[:20].tolist(), 10**10, -5]
    recs = client.recommend(users, top_k=10)
    expected = executor.execute([({contract.INPUT_USER_ID: np.array(users, np.int64).reshape(-1, 1)}, {"top_k": 10})])[0]
    np.testing.assert_array_equal(recs.item_ids, expected[contract.OUTPUT_ITEM_IDS])
    np.testing.assert_allclose(recs.scores, expected[contract.OUTPUT_SCORES], atol=1e-4)
    assert recs.unknown_user.tolist() == [False] * 20 + [True, True]
    recs.check(10, np.load(trained["artifacts"] / contract.ARTIFACT_ITEM_IDS))


def test_top_k_exclusions_and_seen_items(client, known_users, trained):
    user = int(known_users[0])
    base = client.recommend([user], top_k=5)
    assert base.item_ids.shape == (1, 5)
    excluded = base.item_ids[0, :2].tolist()
    recs = client.recommend([user, int(known_users[1])], top_k=5, exclude=[excluded, []])
    assert not np.isin(recs.item_ids[0], excluded).any() and (recs.item_ids >= 0).all()
    np.testing.assert_array_equal(recs.item_ids[0, :3], base.item_ids[0, 2:])
    raw = pd.read_parquet(trained["work"] / "data" / "train.parquet")
    clicked = raw[(raw.user_id == user) & (raw.click == 1)].item_id.unique()
    unseen = client.recommend([user], top_k=20, exclude_seen=True)
    assert not np.isin(unseen.item_ids, clicked).any() and (unseen.item_ids >= 0).all()


def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(client, known_users):
    with pytest.raises(ClientError, match=r"top_k must be in 1\.\.\d+, got 0"):
        client.recommend([int(known_users[0])], top_k=0)
    assert client.recommend([int(known_users[0])], top_k=3).item_ids.shape == (1, 3)


def test_the_served_model_computes_its_stored_users_queries_at_load(server, trained):
    users = len(pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES))
    log = Path(server.log_path).read_text(errors="replace")
    assert f"query cache: on, {users:,} users, " in log, server.log_tail()


def test_unknown_model_is_a_clear_error(server):
    from client.client import RetrievalClient

    with RetrievalClient(server.grpc_url, "grpc", model="nope") as c:
        with pytest.raises(ClientError, match="inference failed .*nope"):
            c.recommend([1])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "client", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_k_distinct_raw_ids_best_first_same_over_both_protocols(server, known_users, trained):
    ids = [str(u) for u in known_users[:3]]
    catalogue = str(trained["artifacts"] / contract.ARTIFACT_ITEM_IDS)
    grpc = _cli("--url", server.grpc_url, "--user-id", *ids, "--top-k", "10", "--json", "--catalogue", catalogue)
    http = _cli("--http", "--url", server.http_url, "--user-id", *ids, "--top-k", "10", "--json")
    assert grpc.returncode == 0, grpc.stderr
    assert http.returncode == 0, http.stderr
    g, h = json.loads(grpc.stdout)["results"], json.loads(http.stdout)["results"]
    assert [r["item_ids"] for r in g] == [r["item_ids"] for r in h]
    for row in g:
        assert len(set(row["item_ids"])) == 10 and row["scores"] == sorted(row["scores"], reverse=True)


def test_cli_errors_are_one_line_without_traceback(server, known_users):
    from ensemble.server import free_port

    down = _cli("--url", f"127.0.0.1:{free_port()}", "--user-id", "1")
    assert down.returncode == 1 and "cannot reach the server" in down.stderr
    assert "Traceback" not in down.stderr and len(down.stderr.strip().splitlines()) == 1
    bad = _cli("--url", server.grpc_url, "--user-id", str(known_users[0]), "--top-k", "0")
    assert bad.returncode == 1 and "top_k must be in" in bad.stderr and "Traceback" not in bad.stderr


def test_health_cli_asks_the_repositorys_two_canary_users(server, repository, known_users, tmp_path):
    from ensemble.build import cold_user_id

    run = lambda *a: subprocess.run([sys.executable, "-m", "ensemble", "health", "--url", server.http_url, *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    ok = run("--repository", str(repository))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith(f"ready (ok): user {known_users[0]} -> item ")
    assert f", new user {cold_user_id(known_users)} -> item " in ok.stdout
    missing = run("--repository", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stdout.strip() == f"not ready: {tmp_path / contract.MODEL_NAME / 'config.pbtxt'} does not exist; pass the served model repository"
