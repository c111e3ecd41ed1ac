"""train.evaluate: metrics against hand-computed values; every method ranks the same way."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from train.evaluate import (
    build_eval_set, embedding_scorer, evaluate_methods, format_table, popularity_scorer, rank_metrics,
    recall_curve, save_report, top_k, verdicts,
)


def small_set():
    # 2 users, 5 items. User 0 clicked item 0 in training; held out: items 1 and 3, plus one
    # item outside the catalogue (-1). User 1 held out: item 4.
    return build_eval_set(
        train_users=np.array([0]), train_items=np.array([0]),
        valid_users=np.array([0, 0, 0, 1]), valid_items=np.array([1, 3, -1, 4]),
        n_users=2, n_items=5,
    )


def test_eval_set_counts_out_of_catalogue_positives():
    data = small_set()
    assert data.n_positives.tolist() == [3, 1]
    assert data.positives[0].indices.tolist() == [1, 3]
    assert data.seen[0].indices.tolist() == [0]


def test_top_k_excludes_seen_items_and_sorts():
    data = small_set()
    scores = np.array([[9.0, 1.0, 5.0, 3.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    ranked = top_k(lambda rows: scores[rows], data, 3)
    assert ranked.tolist() == [[2, 3, 4], [4, 3, 2]]  # item 0 is user 0's training click


def test_metrics_by_hand():
    data = small_set()
    ranked = np.array([[2, 3, 4, 1, 0], [4, 3, 2, 1, 0]])
    m = rank_metrics(ranked, data, (2, 4))
    # user 0: hits at ranks 2 (item 3) and 4 (item 1) of 3 positives; user 1: hit at rank 1.
    assert m["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    dcg0_2 = 1 / math.log2(3)
    idcg0_2 = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx((dcg0_2 / idcg0_2 + 1.0) / 2)
    assert m["mrr@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert recall_curve(ranked, data)[:2] == pytest.approx([(0 + 1) / 2, (1 / 3 + 1) / 2])


def test_every_method_ranks_the_same_candidates_with_the_same_exclusions():
    data = small_set()
    # A scorer that loves the seen item must not get it back, whatever the method.
    loves_seen = lambda rows: np.tile([100.0, 0, 0, 0, 0], (len(rows), 1))  # noqa: E731
    counts = sp.csr_matrix((np.array([50.0]), (np.array([0]), np.array([0]))), shape=(2, 5))
    report = evaluate_methods({"a": loves_seen, "popular": popularity_scorer(counts)}, data, (2,))
    assert report["n_items"] == 5 and report["n_users"] == 2
    for name in ("a", "popular"):
        assert 0 not in top_k({"a": loves_seen, "popular": popularity_scorer(counts)}[name], data, 4)[0]


def test_embedding_scorer_is_a_dot_product():
    q = np.array([[1.0, 0.0], [0.0, 2.0]])
    items = np.array([[1.0, 1.0], [3.0, 0.0]])
    np.testing.assert_allclose(embedding_scorer(q, items)(np.array([1, 0])), [[2.0, 0.0], [1.0, 3.0]])


def test_report_files_and_verdicts(tmp_path):
    report = {
        "ks": [10], "n_users": 3, "n_items": 9, "recall_curves": {"two_tower": [0.1, 0.2], "popular": [0.3, 0.4]},
        "methods": {"two_tower": {"recall@10": 0.2, "ndcg@10": 0.1, "mrr@10": 0.1},
                    "popular": {"recall@10": 0.4, "ndcg@10": 0.2, "mrr@10": 0.2}},
    }
    assert verdicts(report) == ["two_tower LOSES TO popular: recall@10 0.2000 vs 0.4000 (0.50x)"]
    assert "| two_tower | 0.2000 | 0.1000 | 0.1000 |" in format_table(report)
    paths = save_report(report, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert paths["md"].read_text().startswith("**WARNING: two_tower LOSES TO popular")
