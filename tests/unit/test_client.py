"""client: answer checks, exclusion packing and CLI parsing (no server needed)."""

import numpy as np
import pytest

from client.__main__ import parse_args
from client.client import Recommendations, RetrievalClient, _exclusion_matrix
from common.errors import ClientError


def recs(ids, scores):
    ids, scores = np.array(ids, np.int64), np.array(scores, np.float32)
    return Recommendations(np.arange(len(ids)), ids, scores, np.zeros(len(ids), bool))


def test_a_good_answer_passes():
    recs([[5, 6, -1]], [[0.9, 0.5, -3.4e38]]).check(3, catalogue=np.array([5, 6, 7]))


@pytest.mark.parametrize(
    "answer, kwargs, message",
    [
        (recs([[5, 5]], [[0.9, 0.5]]), {}, "repeated item ids"),
        (recs([[5, 6]], [[0.5, 0.9]]), {}, "not best-first"),
        (recs([[5, 6]], [[0.9, 0.5]]), {"top_k": 3}, "asked for 3 items per user, got 2"),
        (recs([[5, 8]], [[0.9, 0.5]]), {"catalogue": np.array([5, 6])}, r"outside the catalogue \[8\]"),
        (Recommendations(np.arange(1), np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32), np.zeros(1, bool)), {}, "wrong dtypes"),
    ],
)
def test_bad_answers_are_caught(answer, kwargs, message):
    with pytest.raises(ClientError, match=message):
        answer.check(**kwargs)


def test_exclusions_are_padded_per_user():
    assert _exclusion_matrix([[1, 2], []], 2).tolist() == [[1, 2], [-1, -1]]
    assert _exclusion_matrix([[], []], 2).tolist() == [[-1], [-1]]
    with pytest.raises(ClientError, match="one list per user: 2 users, 1 lists"):
        _exclusion_matrix([[1]], 2)


def test_cli_parses_the_documented_call():
    args = parse_args(["--url", "127.0.0.1:8001", "--user-id", "11", "42", "7", "--top-k", "10", "--json",
                       "--exclude", "11:5,6", "--exclude", "42:9"])
    assert args.user_ids == [11, 42, 7] and args.top_k == 10 and args.json
    assert args.exclude == [(11, [5, 6]), (42, [9])]
    with pytest.raises(SystemExit):
        parse_args(["--user-id", "1", "--exclude", "nocolon"])


def test_unknown_protocol():
    with pytest.raises(ClientError, match="protocol must be one of"):
        RetrievalClient("127.0.0.1:1", "carrier-pigeon")
