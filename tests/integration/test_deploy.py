"""ensemble.deploy: a version switch under a running client loop, with zero errors, and a rollback."""

import dataclasses
import json
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest

from common import contract

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, tiny_cfg):
    """The same data trained with another seed: other embeddings, other answers."""
    from train.pipeline import run_training

    root = tmp_path_factory.mktemp("retrained")
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, seed=7))
    run_training(cfg, root / "work", root / "artifacts")
    return root / "artifacts"


class Loop(threading.Thread):
    """Asks for the same users over and over, recording every answer and every error."""

    def __init__(self, url, users):
        super().__init__(daemon=True)
        self.url, self.users = url, users
        self.answers, self.errors, self.stop = [], [], threading.Event()

    def run(self):
        from client.client import RetrievalClient

        with RetrievalClient(self.url) as client:
            while not self.stop.is_set():
                try:
                    recs = client.recommend(self.users, top_k=5)
                    self.answers.append((recs.model_version, recs.item_ids))
                except Exception as e:  # noqa: BLE001 - every failure counts
                    self.errors.append(repr(e))


def _versions_seen(loop):
    return {v for v, _ in loop.answers}


@pytest.fixture(autouse=True)
def admin_key(monkeypatch):
    """The model-repository API is restricted: the server and the deploy command share a key."""
    monkeypatch.setenv(contract.ADMIN_KEY_ENV, "test-admin-key")


def test_switch_and_rollback_under_load(repository, trained, retrained, tmp_path):
    from ensemble import deploy
    from ensemble.loader import load_model_in_process
    from ensemble.server import TritonServer
    from tests.integration.conftest import free_serve_config

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:6].tolist()
    expected = {}
    for version, artifacts in ((1, None), (2, retrained)):
        if artifacts is not None:
            assert deploy.add_version(repo, artifacts) == 2
        executor = load_model_in_process(repo, version=version)
        request = [({contract.INPUT_USER_ID: np.array(users, np.int64).reshape(-1, 1)}, {"top_k": 5})]
        expected[str(version)] = executor.execute(request)[0][contract.OUTPUT_ITEM_IDS]
    assert not np.array_equal(expected["1"], expected["2"])
    assert deploy.active_version(repo) == 1  # adding a version does not switch

    with TritonServer(repo, free_serve_config(), log_path=tmp_path / "log.txt", model_control="explicit") as server:
        loop = Loop(server.grpc_url, users)
        loop.start()
        time.sleep(1.0)
        deploy.activate(repo, 2, server.grpc_url)
        deadline = time.monotonic() + 30
        while "2" not in _versions_seen(loop) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert deploy.rollback(repo, server.grpc_url) == 1
        mark = len(loop.answers)
        time.sleep(1.0)
        loop.stop.set()
        loop.join(10)
    assert loop.errors == []
    assert _versions_seen(loop) == {"1", "2"}
    for version, ids in loop.answers:
        np.testing.assert_array_equal(ids, expected[version])  # no answer from a half-loaded version
    assert [v for v, _ in loop.answers[mark + 5:]] and all(v == "1" for v, _ in loop.answers[mark + 5:])


def test_activate_refuses_a_missing_version(repository, tmp_path):
    from common.errors import ArtifactError
    from ensemble import deploy

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    with pytest.raises(ArtifactError, match=r"has no version 9; it has \[1\]"):
        deploy.activate(repo, 9, "127.0.0.1:1")
    with pytest.raises(ArtifactError, match="no version older than 1"):
        deploy.rollback(repo, "127.0.0.1:1")


def _state(repo, server):
    """What a failed deploy must leave exactly as it was: config, loaded versions, readiness."""
    import tritonclient.grpc as grpcclient

    from ensemble.health import canary

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        index = client.get_model_repository_index(headers={contract.GRPC_ADMIN_KEY_HEADER: "test-admin-key"}, as_json=True)
        loaded = sorted((m["version"], m["state"]) for m in index["models"] if m.get("state") == "READY")
        return (repo / contract.MODEL_NAME / "config.pbtxt").read_text(), loaded, canary(server.http_url).ok, client.is_server_ready()
    finally:
        client.close()


def test_failed_deploys_leave_everything_as_it_was(repository, trained, tmp_path):
    """(a) a version corrupted on disk after it was added is refused before anything changes;
    (b) a version that passes its checksums but cannot load is rolled back by the deploy itself;
    (c) activating the version already served is a no-op that says so."""
    import faiss

    from common.errors import ArtifactError, ServerError
    from ensemble import deploy
    from ensemble.build import record_version_files
    from ensemble.server import TritonServer
    from tests.integration.conftest import free_serve_config

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    assert deploy.add_version(repo, trained["artifacts"]) == 2
    assert deploy.add_version(repo, trained["artifacts"]) == 3
    index2 = repo / contract.MODEL_NAME / "2" / "ensemble" / contract.ARTIFACT_INDEX
    index2.write_bytes(index2.read_bytes()[: index2.stat().st_size // 2])  # truncated before activation
    version3 = repo / contract.MODEL_NAME / "3"
    # Version 3's index holds fewer vectors than its catalogue, with checksums recorded afresh:
    # only loading it can tell.
    small = faiss.IndexFlatIP(faiss.read_index(str(version3 / "ensemble" / contract.ARTIFACT_INDEX)).d)
    faiss.write_index(small, str(version3 / "ensemble" / contract.ARTIFACT_INDEX))
    record_version_files(version3, json.loads((version3 / contract.MANIFEST).read_text()))
    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:4].tolist()

    with TritonServer(repo, free_serve_config(), log_path=tmp_path / "log.txt", model_control="explicit") as server:
        before = _state(repo, server)
        assert before[1:] == ([("1", "READY")], True, True)
        loop = Loop(server.grpc_url, users)
        loop.start()
        with pytest.raises(ArtifactError, match=r"retrieval/2/ensemble/items\.faiss has \d+ bytes, the manifest recorded \d+"):
            deploy.activate(repo, 2, server.grpc_url)
        assert _state(repo, server) == before
        with pytest.raises(ServerError, match=r"did not switch to version 3: .*retrieval model cannot load: \S+/3/ensemble/items\.faiss holds 0 vectors but \S+/item_ids\.npy has \d+ item ids; it still serves version 1$"):
            deploy.activate(repo, 3, server.grpc_url)
        assert _state(repo, server) == before
        assert deploy.activate(repo, 1, server.grpc_url) is False
        time.sleep(1.0)
        assert _state(repo, server) == before and server.process.poll() is None
        loop.stop.set()
        loop.join(10)
    assert loop.errors == [] and len(loop.answers) > 10
    assert _versions_seen(loop) == {"1"}
