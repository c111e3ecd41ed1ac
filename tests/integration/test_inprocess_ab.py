"""bench.inprocess_ab: the request path at a git revision against the current one, in two processes."""

import json

import numpy as np
import pandas as pd
import pytest

from common import contract

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_current_code_against_head_alternates_blocks_and_compares_answers(repository, trained, tmp_path, capsys):
    from bench.inprocess_ab import main

    assert main(["--repository", str(repository), "--artifacts", str(trained["artifacts"]), "--ref", "HEAD",
                 "--out", str(tmp_path / "ab"), "--rounds", "2", "--batch-sizes", "1,3", "--requests", "12"]) == 0
    result = json.loads((tmp_path / "ab" / "inprocess_ab.json").read_text())
    # HEAD's request path against the working tree's: the same unless the tree has uncommitted changes to it.
    assert result["ref"] == "HEAD" and isinstance(result["same_answers"], bool)
    for size in ("1", "3"):
        rounds = result["batch_sizes"][size]["rounds"]
        assert len(rounds["ref"]) == len(rounds["new"]) == 2 and min(rounds["ref"] + rounds["new"]) > 0
    said = "identical" if result["same_answers"] else "DIFFERENT"
    assert f"answers {said} on the fixed batches" in capsys.readouterr().out
    assert not (tmp_path / "ab" / "repo_ref").exists()  # the reference copy is removed after the run


def test_the_answer_digest_tells_two_models_apart(repository, hist_repository, trained, tmp_path):
    """The same model gives the same digest in two processes; another model's answers give another."""
    from bench.inprocess_ab import shipped_code, start_worker

    users = tmp_path / "users.npy"
    np.save(users, pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).iloc[:, 0].to_numpy(np.int64))
    digests = []
    for i, repo in enumerate((repository, repository, hist_repository)):
        worker, digest = start_worker(shipped_code(repo), users, [1, 3], tmp_path / f"w{i}.log")
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0
        digests.append(digest)
    assert digests[0] == digests[1] != digests[2]


def test_a_repository_without_shipped_code_is_refused(tmp_path):
    from bench.inprocess_ab import shipped_code

    (tmp_path / "retrieval" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no model version with shipped code \(model.py and code/\)"):
        shipped_code(tmp_path)
