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
