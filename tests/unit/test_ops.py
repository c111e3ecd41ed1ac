"""ensemble.ops: each operator against an oracle, and the stock merlin-systems ops they replace."""

import cloudpickle
import faiss
import numpy as np
import nvtabular as nvt
import pandas as pd
import pytest
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag.ops.faiss import QueryFaiss
from merlin.table import TensorTable

from common import contract
from ensemble.ops import MISSING
from ensemble.ops.lookup import LookupUserFeatures
from ensemble.ops import search as search_mod
from ensemble.ops.search import PAD_SCORE, SearchItems, ragged_gather
from ensemble.ops.tower import QueryTower
from ensemble.ops.transform import TransformUserFeatures
from train.etl import user_workflow
from train.index import build_index, exact_top_k, search_params
from common.config import IndexConfig


@pytest.fixture(scope="module")
def user_wf_dir(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("uwf") / "user_workflow"
    user_workflow(nvt.Workflow.load(str(trained["artifacts"] / "workflow")), trained["cfg"].data).save(str(path))
    return path


@pytest.fixture(scope="module")
def users_raw(trained):
    return pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES)


def test_compiled_transform_equals_the_workflow(user_wf_dir, users_raw):
    op = TransformUserFeatures(user_wf_dir)
    op.load_artifacts()
    assert op.compiled and set(op._dense.columns) == set(op._tables)  # every column by the one lookup
    rng = np.random.default_rng(0)
    frame = users_raw.sample(200, replace=True, random_state=1).reset_index(drop=True)
    for col in frame.columns:  # a quarter of the values never seen in training
        unseen = rng.random(len(frame)) < 0.25
        frame.loc[unseen, col] = frame[col].max() + 1 + rng.integers(0, 1000, unseen.sum())
    expected = nvt.Workflow.load(str(user_wf_dir))._transform_df(frame)
    out = op.transform(ColumnSelector(list(frame.columns)), TensorTable({c: frame[c].to_numpy() for c in frame.columns}))
    for col in frame.columns:
        np.testing.assert_array_equal(out[col].values, expected[col].to_numpy(), err_msg=col)
        assert out[col].values.dtype == expected[col].dtype


def test_dense_codes_equal_each_columns_own_encoding():
    from ensemble.ops.transform import CategoryTable, DenseCodes

    rng = np.random.default_rng(0)
    tables = {  # vocabularies with gaps, a negative one, and one too wide for the table's budget
        "a": CategoryTable(np.array([3, 5, 9], np.int64), np.array([4, 5, 6], np.int32), 2, 1, np.dtype(np.int32)),
        "b": CategoryTable(np.array([-7, 0, 40], np.int64), np.array([3, 4, 5], np.int64), 2, 1, np.dtype(np.int64)),
        "wide": CategoryTable(np.array([0, 10**9], np.int64), np.array([3, 4], np.int32), 2, 1, np.dtype(np.int32)),
    }
    dense = DenseCodes.from_tables(tables, max_entries=100)
    assert dense.columns == ("a", "b")  # "wide" spans 10**9 values: it keeps its searchsorted
    extreme = [np.iinfo(np.int64).min, np.iinfo(np.int64).max, MISSING]  # far outside: no wrap-around into a block
    columns = {c: np.concatenate([rng.integers(-10, 50, 500), extreme, tables[c].keys]) for c in ("a", "b")}
    out = dense.encode(columns)
    for c in ("a", "b"):
        expected = tables[c].encode(columns[c])
        np.testing.assert_array_equal(out[c], expected, err_msg=c)
        assert out[c].dtype == expected.dtype
    assert list(out["a"][-6:-3]) == [2, 2, 1]  # out of vocabulary twice, then the null code
    assert DenseCodes.from_tables({"wide": tables["wide"]}, max_entries=100) is None


def test_missing_values_get_the_null_code_stock_categorify_cannot(user_wf_dir, users_raw):
    op = TransformUserFeatures(user_wf_dir)
    op.load_artifacts()
    cols = list(users_raw.columns)
    table = {c: users_raw[c].to_numpy()[:3].copy() for c in cols}
    table["user_age"][1] = MISSING
    out = op.transform(ColumnSelector(cols), TensorTable(table))
    assert out["user_age"].values[1] == 1  # NVTabular's null index
    frame = users_raw.head(3).astype({"user_age": "Int64"})
    frame.loc[1, "user_age"] = pd.NA
    with pytest.raises(RuntimeError, match="Failed to categorical encode column user_age"):
        nvt.Workflow.load(str(user_wf_dir))._transform_df(frame)


def test_lookup_returns_stored_features_and_flags_unknown_users(trained, users_raw):
    cfg = trained["cfg"].data
    op = LookupUserFeatures(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES, cfg.user_id, cfg.user_features)
    ids = np.array([users_raw.user_id.iloc[5], 10**12, users_raw.user_id.iloc[0]], dtype=np.int64)
    out = op.transform(ColumnSelector([cfg.user_id]), TensorTable({cfg.user_id: ids}))
    assert out[contract.OUTPUT_UNKNOWN].values.tolist() == [False, True, False]
    assert out["user_age"].values.tolist() == [users_raw.user_age.iloc[5], MISSING, users_raw.user_age.iloc[0]]
    np.testing.assert_array_equal(out[cfg.user_id].values, ids)
    restored = cloudpickle.loads(cloudpickle.dumps(op))
    assert restored._store is None  # the table is an artifact, not part of the pickle


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("catalogue")
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    raw_ids = rng.choice(np.arange(10_000, 99_999), 500, replace=False).astype(np.int64)
    faiss.write_index(build_index(vectors, IndexConfig(kind="flat")), str(root / "flat.faiss"))
    faiss.write_index(build_index(vectors, IndexConfig(kind="ivf", nlist=12, nprobe=1)), str(root / "ivf.faiss"))
    np.save(root / "ids.npy", raw_ids)
    # user 7 clicked catalogue rows 0..4, user 9 clicked rows 10..11
    np.savez(root / "seen.npz", user_ids=np.array([7, 9]), indptr=np.array([0, 5, 7]), indices=np.array([0, 1, 2, 3, 4, 10, 11]))
    return root, vectors, raw_ids


def _search_op(catalogue, index="flat.faiss", params=None):
    root, _, _ = catalogue
    op = SearchItems(root / index, root / "ids.npy", root / "seen.npz", params)
    op.load_artifacts()
    return op


def test_search_equals_exact_numpy_with_raw_ids(catalogue):
    _, vectors, raw_ids = catalogue
    queries = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    ids, scores = _search_op(catalogue).search(queries, np.full(6, 10))
    expected = exact_top_k(queries, vectors, 10)
    np.testing.assert_array_equal(ids, raw_ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, expected, axis=1), rtol=1e-5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_per_row_top_k_pads_short_rows(catalogue):
    queries = np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)
    ids, scores = _search_op(catalogue).search(queries, np.array([3, 5]))
    assert ids.shape == (2, 5)
    assert (ids[0, 3:] == -1).all() and (scores[0, 3:] == PAD_SCORE).all() and (ids[1] >= 0).all()


def test_exclusions_never_appear_and_k_is_still_met(catalogue):
    _, vectors, raw_ids = catalogue
    op = _search_op(catalogue)
    queries = np.random.default_rng(3).normal(size=(3, 8)).astype(np.float32)
    best = op.search(queries, np.full(3, 10))[0]
    exclude = np.full((3, 6), contract.EXCLUDE_PAD, np.int64)
    exclude[0, :6] = best[0, :6]  # the first user's six best
    exclude[1, :2] = [best[1, 0], 123]  # an id outside the catalogue is ignored
    ids, _ = op.search(queries, np.full(3, 10), exclude=exclude)
    assert not np.isin(ids[0], best[0, :6]).any() and best[1, 0] not in ids[1]
    assert (ids >= 0).all() and ids.shape == (3, 10)
    np.testing.assert_array_equal(ids[0, :4], best[0, 6:])  # the next ones move up, in order
    np.testing.assert_array_equal(ids[2], best[2])  # a user without exclusions is unaffected


def test_exclude_seen_uses_training_positives(catalogue):
    _, _, raw_ids = catalogue
    op = _search_op(catalogue)
    queries = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    users = np.array([7, 9, 8], np.int64)  # user 8 has no history
    ids, _ = op.search(queries, np.full(3, 490), user_ids=users, exclude_seen=np.array([True, True, True]))
    assert not np.isin(raw_ids[[0, 1, 2, 3, 4]], ids[0]).any() and (ids[0] >= 0).all()  # 495 remain for k=490
    assert not np.isin(raw_ids[[10, 11]], ids[1]).any()
    assert (ids[2] >= 0).all()
    np.testing.assert_array_equal(ragged_gather(np.array([0, 5, 7]), np.arange(7), np.array([1, 0]))[1], [5, 6, 0, 1, 2, 3, 4])


def test_approximate_index_short_answers_are_searched_wider(catalogue):
    op = _search_op(catalogue, "ivf.faiss", {"nprobe": 1})
    queries = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32)
    _, plain = op._index.search(queries, 200)
    assert (plain < 0).any()  # one IVF cell of ~40 items cannot answer k=200
    ids, _ = op.search(queries, np.full(4, 200))
    assert (ids >= 0).all() and all(len(set(r)) == 200 for r in ids)


def test_wider_probes_without_search_parameters_answer_the_same(catalogue, monkeypatch):
    """FAISS 1.7.2 (the Merlin container's) has no SearchParameters: the wider probe is set on
    the index for the call and put back, with the same answers as 1.8's per-call parameters."""
    import ensemble.ops.search as search

    queries = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32)
    with_params = _search_op(catalogue, "ivf.faiss", {"nprobe": 1}).search(queries, np.full(4, 200))
    monkeypatch.setattr(search, "SEARCH_PARAMETERS", False)
    monkeypatch.setattr(search.faiss, "SearchParametersIVF", None)  # any use of it would now fail
    op = _search_op(catalogue, "ivf.faiss", {"nprobe": 1})
    without = op.search(queries, np.full(4, 200))
    np.testing.assert_array_equal(without[0], with_params[0])
    np.testing.assert_array_equal(without[1], with_params[1])
    assert faiss.extract_index_ivf(op._index).nprobe == 1  # the wider probe was put back
    assert "no SearchParameters (FAISS < 1.7.3)" in op.describe()


class _DepthLimited:
    """Stands in for a GPU index: FAISS's GPU k-selection refuses k above its limit."""

    def __init__(self, index, max_k):
        self.index, self.max_k, self.calls = index, max_k, []

    def search(self, queries, k, **kwargs):
        self.calls.append(k)
        assert k <= self.max_k, f"k={k} over the device limit {self.max_k}"
        return self.index.search(queries, k, **kwargs)


def test_searches_deeper_than_the_gpu_limit_go_to_the_cpu_copy(catalogue):
    """top_k + exclusions + seen items + the tie margin can pass GPU_MAX_SELECTION_K (2048): those
    calls use the CPU copy, every other call the device index, and the answer is the same."""
    _, vectors, raw_ids = catalogue
    op = _search_op(catalogue)
    queries = np.random.default_rng(6).normal(size=(2, 8)).astype(np.float32)
    expected = op.search(queries, np.array([5, 40]))
    device = _DepthLimited(op._index, max_k=32)
    op._index, op._device_max_k = device, 32
    shallow = op.search(queries, np.array([5, 5]))  # depth 5 + 8 = 13: on the device
    deep = op.search(queries, np.array([5, 40]))  # depth 40 + 8 = 48 > 32: on the CPU copy
    assert device.calls == [13]
    np.testing.assert_array_equal(shallow[0], expected[0][:, :5])
    np.testing.assert_array_equal(deep[0], expected[0])
    np.testing.assert_array_equal(deep[1], expected[1])


def test_index_device_settings_are_checked(catalogue):
    from common.errors import ConfigError
    from ensemble.ops.search import gpu_count, place_index

    index = faiss.read_index(str(catalogue[0] / "flat.faiss"))
    assert place_index(index, "cpu") == (index, False)
    with pytest.raises(ConfigError, match=r"index_device must be one of \('cpu', 'gpu', 'auto'\), got 'tpu'"):
        place_index(index, "tpu")
    if gpu_count() == 0:
        assert place_index(index, "auto") == (index, False)
        with pytest.raises(ConfigError, match=r"index_device=gpu, but FAISS [\d.]+ sees no GPU"):
            place_index(index, "gpu")


def test_stock_query_faiss_flattens_the_batch_and_has_no_scores(catalogue):
    root, vectors, _ = catalogue
    stock = QueryFaiss(root / "flat.faiss", topk=5)
    stock.load_artifacts("")
    out = stock.transform(ColumnSelector(["q"]), TensorTable({"q": vectors[:3]}))
    assert list(out.columns) == ["candidate_ids"] and out["candidate_ids"].values.shape == (15,)
    two = Schema([ColumnSchema("a"), ColumnSchema("b")])
    with pytest.raises(TypeError, match="unsupported operand type"):  # its error message divides strings
        stock.validate_schemas(two, two, two, two)


def test_query_tower_survives_pickling_stock_predict_tensorflow_does_not(trained, tmp_path):
    from merlin.systems.dag.ops.tensorflow import PredictTensorflow

    path = trained["artifacts"] / contract.ARTIFACT_QUERY_TOWER
    stock = cloudpickle.loads(cloudpickle.dumps(PredictTensorflow(str(path))))
    assert not hasattr(stock, "model")
    ours = QueryTower(path, runtime="tensorflow")
    ours.save_artifacts(str(tmp_path))
    restored = cloudpickle.loads(cloudpickle.dumps(ours))
    restored.load_artifacts(str(tmp_path))
    users = pd.read_parquet(trained["work"] / "etl" / "users_encoded.parquet").head(4)
    feats = {c: users[c].to_numpy() for c in users.columns}
    np.testing.assert_allclose(restored.embed(feats), ours.embed(feats), atol=1e-6)
    assert restored.embed(feats).shape == (4, trained["cfg"].train.embedding_size)


def test_compiled_tower_equals_tensorflow_and_is_the_default(trained):
    import tensorflow as tf

    from ensemble.ops.tower import NumpyTower

    art = trained["artifacts"]
    users = pd.read_parquet(trained["work"] / "etl" / "users_encoded.parquet")
    feats = {c: users[c].to_numpy() for c in users.columns}
    signature = tf.saved_model.load(str(art / contract.ARTIFACT_QUERY_TOWER)).signatures["serving_default"]
    expected = next(iter(signature(**{k: tf.constant(v) for k, v in feats.items()}).values())).numpy()
    with np.load(art / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        compiled = NumpyTower({k: arrays[k] for k in arrays.files})
    np.testing.assert_allclose(compiled.embed(feats), expected, atol=1e-5)
    op = cloudpickle.loads(cloudpickle.dumps(QueryTower(art / contract.ARTIFACT_QUERY_TOWER, art / contract.ARTIFACT_QUERY_TOWER_COMPILED)))
    op.load_artifacts()  # as the server does, from the pickled ensemble
    assert op.model is None and op._numpy is not None  # TensorFlow stays off the request path
    np.testing.assert_array_equal(op.embed(feats), compiled.embed(feats))
    with pytest.raises(ValueError, match="needs the compiled tower"):
        QueryTower(art / contract.ARTIFACT_QUERY_TOWER)


def test_compiled_tower_one_gather_equals_a_lookup_per_table_and_refuses_codes_outside(trained):
    """Tables of one embedding size are gathered at once from one stacked table; the values must
    be the per-table lookups' bit for bit, and a code past its table must not read the next one's rows."""
    from ensemble.ops.tower import NumpyTower

    with np.load(trained["artifacts"] / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        tower = NumpyTower({k: arrays[k] for k in arrays.files})
    assert tower._stacked is not None
    users = pd.read_parquet(trained["work"] / "etl" / "users_encoded.parquet")
    feats = {c: users[c].to_numpy() for c in users.columns}
    stacked = tower.embed(feats)
    per_table = NumpyTower.__new__(NumpyTower)
    per_table.__dict__.update({**tower.__dict__, "_stacked": None})
    assert np.array_equal(stacked, per_table.embed(feats))
    first = tower.features[0]
    for bad in (len(tower.tables[0]), -1):  # one past the end would be the next table's first row
        broken = {**feats, first: np.where(np.arange(len(feats[first])) == 3, bad, feats[first])}
        with pytest.raises(IndexError, match=rf"code {bad} of feature '{first}' is outside its embedding table of {len(tower.tables[0])} rows"):
            tower.embed(broken)


def test_a_rows_embedding_does_not_depend_on_its_batch(trained):
    """BLAS gives a row other bits at other tile positions; the compiled tower must not."""
    from ensemble.ops.tower import NumpyTower

    with np.load(trained["artifacts"] / contract.ARTIFACT_QUERY_TOWER_COMPILED) as arrays:
        tower = NumpyTower({k: arrays[k] for k in arrays.files})
    users = pd.read_parquet(trained["work"] / "etl" / "users_encoded.parquet")
    feats = {c: users[c].to_numpy() for c in users.columns}
    alone = tower.embed({c: v[:1] for c, v in feats.items()})[0]
    for n in (2, 7, 16, 17, 64, 256):
        for pos in sorted({0, 1, 7, 8, n // 2, n - 1} & set(range(n))):
            batch = {c: np.roll(v[:n], pos) if n <= len(v) else v for c, v in feats.items()}
            assert np.array_equal(tower.embed(batch)[pos], alone), (n, pos)


def test_search_scores_do_not_depend_on_the_batch(catalogue):
    op = _search_op(catalogue)
    queries = np.random.default_rng(9).normal(size=(64, 8)).astype(np.float32)
    one = op.search(queries[:1], np.array([10]))
    for n in (2, 19, 20, 21, 64):  # FAISS switches to BLAS at 20 queries unless told not to
        ids, scores = op.search(queries[:n], np.full(n, 10))
        assert np.array_equal(scores[0], one[1][0]) and np.array_equal(ids[0], one[0][0]), n


def test_answer_order_shortcut_only_where_the_sort_changes_nothing():
    """in_answer_order lets SearchItems skip its sort; it must say yes only when the sort by
    (kept first, score falling, catalogue row) would leave every kept hit where it is."""
    t, f = True, False
    scores = np.array([[5.0, 4.0, 3.0, -1.0]], np.float32)
    assert search_mod.in_answer_order(scores, np.array([[t, t, t, f]]))
    assert search_mod.in_answer_order(np.array([[5.0, 4.0, 0.0, 0.0]], np.float32), np.array([[t, t, f, f]]))  # tie in the padding
    assert not search_mod.in_answer_order(np.array([[5.0, 4.0, 4.0]], np.float32), np.array([[t, t, t]]))  # exact tie
    assert not search_mod.in_answer_order(scores, np.array([[t, f, t, f]]))  # an excluded hit before a kept one
    assert not search_mod.in_answer_order(np.array([[4.0, 5.0]], np.float32), np.array([[t, t]]))  # not best first
    assert search_mod.in_answer_order(np.zeros((2, 0), np.float32), np.zeros((2, 0), bool))
    rng = np.random.default_rng(0)
    answers = []
    for _ in range(2000):
        s = np.sort(rng.integers(0, 40, size=(3, 6)).astype(np.float32), axis=1)[:, ::-1]
        keep = rng.random((3, 6)) < 0.9
        rows = rng.permutation(100)[:18].reshape(3, 6)
        answers.append(search_mod.in_answer_order(s, keep))
        if answers[-1]:
            order = np.lexsort((rows, -s, ~keep), axis=1)
            kept = np.take_along_axis(keep, order, axis=1)
            assert np.array_equal(np.where(kept, np.take_along_axis(rows, order, axis=1), -1), np.where(keep, rows, -1))
    assert 50 < sum(answers) < 1950  # both answers were exercised


def test_search_answers_the_same_without_the_order_shortcut(catalogue, monkeypatch):
    op = _search_op(catalogue)
    rng = np.random.default_rng(12)
    queries = rng.normal(size=(16, 8)).astype(np.float32)
    exclude = np.full((16, 3), contract.EXCLUDE_PAD, np.int64)
    exclude[::3] = rng.choice(catalogue[2], size=(6, 3))
    users = np.array([7, 9, 8, 1] * 4, np.int64)
    top_k = rng.integers(1, 30, 16)
    for args in ({}, {"exclude": exclude}, {"user_ids": users, "exclude_seen": np.arange(16) % 2 == 0}):
        fast = op.search(queries, top_k, **args)
        with monkeypatch.context() as m:
            m.setattr(search_mod, "in_answer_order", lambda scores, keep: False)
            sorted_ = op.search(queries, top_k, **args)
        assert np.array_equal(fast[0], sorted_[0]) and np.array_equal(fast[1], sorted_[1]), args


def test_exact_ties_are_broken_by_catalogue_row_at_any_depth(tmp_path):
    vectors = np.ones((30, 4), np.float32)  # every item scores the same
    faiss.write_index(build_index(vectors, IndexConfig(kind="flat")), str(tmp_path / "i.faiss"))
    np.save(tmp_path / "ids.npy", np.arange(100, 130, dtype=np.int64))
    np.savez(tmp_path / "s.npz", user_ids=np.array([1]), indptr=np.array([0, 0]), indices=np.zeros(0, np.int64))
    op = SearchItems(tmp_path / "i.faiss", tmp_path / "ids.npy", tmp_path / "s.npz")
    op.load_artifacts()
    q = np.ones((2, 4), np.float32)
    for k in (3, 5, 12):
        ids, _ = op.search(q, np.array([k, 20]))  # the second row makes the search deeper
        assert ids[0, :k].tolist() == list(range(100, 100 + k))


@pytest.mark.parametrize("hnsw_cells", [0, 64], ids=["flat quantizer", "hnsw quantizer"])
def test_ivf_pq_answers_do_not_depend_on_the_batch_on_two_threads(tmp_path, hnsw_cells):
    """serve.threads 2: FAISS splits a batch's queries over its team; a row's ids and scores must
    still be those it gets alone."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 16)).astype(np.float32)
    vectors = (centres[rng.integers(0, 40, 20_000)] + 0.3 * rng.normal(size=(20_000, 16))).astype(np.float32)
    index = build_index(vectors, IndexConfig(kind="ivf_pq", pq_nlist=64, pq_nprobe=8, pq_m=16, pq_hnsw_cells=hnsw_cells))
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    np.save(tmp_path / "ids.npy", np.arange(20_000, dtype=np.int64))
    np.savez(tmp_path / "s.npz", user_ids=np.array([1]), indptr=np.array([0, 0]), indices=np.zeros(0, np.int64))
    op = SearchItems(tmp_path / "i.faiss", tmp_path / "ids.npy", tmp_path / "s.npz", search_params(index))
    op.load_artifacts()
    queries = (centres[rng.integers(0, 40, 64)] + 0.3 * rng.normal(size=(64, 16))).astype(np.float32)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        alone = [op.search(queries[i : i + 1], np.array([10])) for i in range(64)]
        for n in (2, 5, 8, 19, 20, 21, 64):
            ids, scores = op.search(queries[:n], np.full(n, 10))
            for i in range(n):
                assert np.array_equal(ids[i], alone[i][0][0]) and np.array_equal(scores[i], alone[i][1][0]), (n, i)
    finally:
        faiss.omp_set_num_threads(before)
