"""Hostile history cases found in review: each one a bug that was fixed."""

import numpy as np
import pandas as pd
import pytest

from common import contract
from train.coldstart import ColdUsers
from train.history import Ragged


def test_cold_history_longer_than_the_model_history_keeps_the_latest_n_as_the_server_does():
    """eval.cold_history 5 with train.history_length 3: the server keeps the latest 3 of the 5 sent,
    so the cold table's queries (TensorFlow in `train run`, NumpyTower in `make eval`) must too."""
    first = Ragged.from_lengths(np.array([0, 1, 2, 3, 4, 5, 6], np.int64), np.array([5, 2]))
    cold = ColdUsers(raw=pd.DataFrame({"u": [7, 8]}), encoded=pd.DataFrame({"u": [2, 2]}), data=None,
                     first=first, item_codes=np.arange(10, 17))
    history = cold.query_inputs(3, True)[contract.INPUT_HISTORY]
    assert isinstance(history, Ragged)
    assert history.lengths.tolist() == [3, 2]
    assert history.values.tolist() == [12, 13, 14, 15, 16]


@pytest.mark.parametrize("args", [["--user", "1", "--item", str(2**64)], ["--user", str(2**63), "--item", "5"],
                                  ["--user", "1", "--item", "5", str(-(2**63) - 1)]])
def test_append_click_refuses_ids_outside_int64_with_one_line_not_a_traceback(args, capsys):
    """99999999999999999999 was an OverflowError traceback for --item, and for --user a key no request
    (user_id is INT64) could ever reach."""
    from ensemble.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["append-click", "--artifacts", "a", "--redis", "redis://127.0.0.1:1/0", *args])
    assert e.value.code == 2
    assert "invalid int64 value" in capsys.readouterr().err


def test_append_click_library_refuses_a_user_id_outside_int64_before_reaching_redis():
    from common.errors import ArtifactError
    from ensemble.redis_store import append_click

    with pytest.raises(ArtifactError, match=r"user id 18446744073709551616 is outside INT64; nothing was appended"):
        append_click("redis://127.0.0.1:1/0", "ns", 2**64, [5])
    with pytest.raises(ArtifactError, match=r"item id 18446744073709551616 is outside INT64; nothing was appended"):
        append_click("redis://127.0.0.1:1/0", "ns", 5, [1, 2**64])


@pytest.mark.parametrize("args", [["--user-id", "1", "--history", str(2**64)], ["--user-id", str(2**64)],
                                  ["--user-id", "1", "--history", f"{2**64}:5"]])
def test_the_client_cli_refuses_ids_outside_int64_with_one_line_not_a_traceback(args, capsys):
    from client.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid int64 value" in err or "with INT64 integer ids" in err


def test_the_parquet_store_reads_histories_of_a_table_written_by_pandas_from_a_slice(tmp_path):
    """A user_features.parquet written by pandas keeps a RangeIndex that does not start at 0 (a slice of a
    frame): the history reader took that index for row positions (IndexError at load)."""
    from ensemble.feature_store import ParquetFeatureStore

    frame = pd.DataFrame({"user_id": [9, 7, 8, 5], "f": [1, 2, 3, 4],
                          contract.INPUT_HISTORY: [[1], [2, 3], [4, 5, 6], []]}).iloc[1:]
    frame.to_parquet(tmp_path / "users.parquet")
    store = ParquetFeatureStore(tmp_path / "users.parquet", "user_id", ("f",), history_length=2)
    features, found = store.get(np.array([8, 7, 9, 5]))
    assert found.tolist() == [True, True, False, True]
    assert features["f"].tolist()[:2] == [3, 2]
    assert features[contract.INPUT_HISTORY].tolist() == [[5, 6], [2, 3], [-1, -1], [-1, -1]]
