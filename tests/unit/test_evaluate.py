"""train.evaluate: metrics against hand-computed values; every method ranks the same way."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from train.evaluate import (
    build_eval_set, embedding_scorer, evaluate_methods, format_table, paired_bootstrap, popularity_scorer, rank_metrics,
    recall_curve, save_report, split_tune_eval, top_k, verdicts,
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


def many_users(n=400, n_items=50, seed=0):
    rng = np.random.default_rng(seed)
    users = np.arange(n)
    return build_eval_set(
        train_users=users, train_items=rng.integers(0, n_items, n),
        valid_users=np.repeat(users, 2), valid_items=rng.integers(0, n_items, 2 * n), n_users=n, n_items=n_items,
    )


def test_verdicts_come_from_the_paired_interval():
    data = many_users()
    truth = data.positives.toarray()
    perfect = lambda rows: truth[np.searchsorted(data.user_rows, rows)] + 0.0  # noqa: E731
    noisy = [lambda rows, s=s: truth[np.searchsorted(data.user_rows, rows)] * 0.2 + np.random.default_rng(s).random((len(rows), 50))
             for s in range(2)]
    same = [lambda rows, s=s: np.random.default_rng(s).random((len(rows), 50)) for s in range(3)]
    report = evaluate_methods({"two_tower": noisy, "oracle": perfect, "random": same, "random_too": same[:1]}, data, (5,), seed=1)
    c = report["comparisons"]
    assert c["random"]["recall@5"]["verdict"] == "BEATS" and c["random"]["recall@5"]["lo"] > 0
    assert c["oracle"]["recall@5"]["verdict"] == "reaches"
    assert len(report["per_seed"]["two_tower"]) == 2 and len(report["per_seed"]["random"]) == 3
    assert report["methods"]["two_tower"]["recall@5"] == pytest.approx(np.mean([r["recall@5"] for r in report["per_seed"]["two_tower"]]))
    # Two random rankers are not told apart: the interval straddles zero.
    tie = evaluate_methods({"two_tower": same[1:2], "random": same[2:3]}, data, (5,), seed=1)["comparisons"]["random"]["recall@5"]
    assert tie["lo"] < 0 < tie["hi"] and tie["verdict"] == "TIES"
    line = [v for v in verdicts(report, 5) if " random:" in v][0]
    assert line.startswith("two_tower BEATS random: recall@5 ") and "95% interval +" in line


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_users():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.1, 1, 100), rng.normal(0.1, 1, 10_000)
    lo_s, hi_s = paired_bootstrap(small, 1000, 0.95, 0)
    lo_l, hi_l = paired_bootstrap(large, 1000, 0.95, 0)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < 0.2 * (hi_s - lo_s)
    assert lo_l > 0  # 0.1 with 10,000 users is not zero


def test_tuning_and_reported_users_are_disjoint_bounded_samples():
    data = many_users(1000)
    tune, report = split_tune_eval(data, 7, 0.5, max_tune=100, max_report=300)
    assert tune.n_users == 100 and report.n_users == 300
    assert not set(tune.user_rows) & set(report.user_rows)
    again, _ = split_tune_eval(data, 7, 0.5, max_tune=100, max_report=300)
    np.testing.assert_array_equal(again.user_rows, tune.user_rows)


def test_top_k_blocks_do_not_change_the_ranking_and_scorers_arrays_stay_untouched():
    data = many_users(300)
    scores = np.random.default_rng(3).random((300, 50))
    before = scores.copy()
    whole = top_k(lambda rows: scores[rows], data, 10, chunk=300)
    blocks = top_k(lambda rows: scores[rows], data, 10, chunk=7)
    np.testing.assert_array_equal(whole, blocks)
    shared = top_k(lambda rows: np.broadcast_to(scores[0], (len(rows), 50)), data, 10)
    assert shared.shape == (300, 10)
    np.testing.assert_array_equal(scores, before)
