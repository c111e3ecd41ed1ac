"""The history input on the serving side: merging, the parquet store's list column, request
validation, item-code encoding with its counts, the config, the metric and the client's packing."""

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import contract
from common.config import MAX_HISTORY
from common.errors import ArtifactError, ClientError, RequestError
from ensemble.history import append_sent, keep_latest, rows_from_ragged
from ensemble.request import Limits, merge, parse_request

PAD = contract.HISTORY_PAD
H = contract.INPUT_HISTORY


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def users(*ids):
    return np.array(ids, dtype=np.int64).reshape(-1, 1)


# -- merging: stored + sent, the latest N kept --------------------------------------------------------


def test_rows_from_ragged_keeps_the_latest_width_oldest_first():
    values = np.array([10, 11, 12, 13, 20, 30, 31], np.int64)
    rows = rows_from_ragged(values, starts=[0, 4, 5, 0], lengths=[4, 1, 2, 0], width=3)
    # row 0 has 4 ids, the latest 3 are 11 12 13; row 1 one id; row 2 two; row 3 none.
    assert rows.tolist() == [[11, 12, 13], [20, PAD, PAD], [30, 31, PAD], [PAD, PAD, PAD]]
    assert rows_from_ragged(np.zeros(0, np.int64), [0], [0], 2).tolist() == [[PAD, PAD]]
    assert rows_from_ragged(values, [0], [4], 0).shape == (1, 0)


def test_keep_latest_drops_padding_anywhere_and_keeps_order():
    ids = np.array([[5, PAD, 6, 7, PAD], [PAD, PAD, PAD, PAD, PAD], [1, 2, PAD, PAD, 3]], np.int64)
    assert keep_latest(ids, 2).tolist() == [[6, 7], [PAD, PAD], [2, 3]]
    assert keep_latest(ids, 4).tolist() == [[5, 6, 7, PAD], [PAD] * 4, [1, 2, 3, PAD]]


def merge_histories(stored, sent, width):
    """What the lookup (append) and the transform (cut, here with every id known) do together."""
    return keep_latest(append_sent(stored, sent), width)


def test_the_request_ids_come_after_the_stored_ones_and_the_last_n_win():
    stored = np.array([[1, 2, 3], [4, PAD, PAD], [PAD, PAD, PAD]], np.int64)
    sent = np.array([[8, 9], [PAD, PAD], [7, PAD]], np.int64)
    # user 0: 1 2 3 8 9 -> latest 3: 3 8 9; user 1: 4 and nothing sent; user 2 (unknown): only what was sent.
    assert merge_histories(stored, sent, 3).tolist() == [[3, 8, 9], [4, PAD, PAD], [7, PAD, PAD]]
    assert merge_histories(stored, None, 3).tolist() == stored.tolist()
    assert merge_histories(stored, np.zeros((3, 0), np.int64), 2).tolist() == [[2, 3], [4, PAD], [PAD, PAD]]
    # A repeated click is a new interaction: kept twice, not deduplicated.
    assert merge_histories(np.array([[5, PAD]]), np.array([[5]]), 2).tolist() == [[5, 5]]


def test_merging_is_vectorized_at_scale():
    """256 users x (200 stored + 200 sent) against a per-row Python oracle."""
    rng = np.random.default_rng(0)
    stored = np.where(rng.random((256, 200)) < 0.3, PAD, rng.integers(0, 10**6, (256, 200)))
    sent = np.where(rng.random((256, 200)) < 0.5, PAD, rng.integers(0, 10**6, (256, 200)))
    got = merge_histories(stored, sent, 50)
    for i in range(256):
        row = [v for v in [*stored[i], *sent[i]] if v != PAD][-50:]
        assert got[i].tolist() == row + [PAD] * (50 - len(row))


# -- the embedded store's list column ----------------------------------------------------------------


def _write_table(path, histories, ids=(30, 10, 20, 40), type_=pa.list_(pa.int64())):
    table = pa.table({"user_id": pa.array(ids, pa.int64()), "user_age": pa.array([3, 1, 2, 4], pa.int64()),
                      H: pa.array(histories, type_)})
    pq.write_table(table, path, row_group_size=2)  # two row groups: the column arrives in chunks
    return path


def test_the_parquet_store_serves_each_users_history(tmp_path):
    from ensemble.feature_store import ParquetFeatureStore

    path = _write_table(tmp_path / "u.parquet", [[7, 8, 9, 10], [], None, [5]])
    store = ParquetFeatureStore(path, "user_id", ("user_age",), history_length=3)
    features, found = store.get(np.array([10, 30, 99, 20, 40]))
    assert found.tolist() == [True, True, False, True, True]
    assert features["user_age"].tolist()[:2] == [1, 3]
    # user 30 stored 7 8 9 10: the latest 3; user 10 none; 99 unknown; user 20 a null list; user 40 one.
    assert features[H].tolist() == [[PAD] * 3, [8, 9, 10], [PAD] * 3, [PAD] * 3, [5, PAD, PAD]]
    assert features[H].dtype == np.int64


def test_the_parquet_store_without_history_reads_no_list_column(tmp_path):
    from ensemble.feature_store import ParquetFeatureStore

    path = tmp_path / "u.parquet"
    pd.DataFrame({"user_id": [1, 2], "user_age": [3, 4]}).to_parquet(path)
    features, found = ParquetFeatureStore(path, "user_id", ("user_age",)).get(np.array([2]))
    assert set(features) == {"user_age"} and found.tolist() == [True]
    with pytest.raises(ArtifactError, match=exactly(
            f"{path} has no 'history_item_ids' column, and the model takes each user's latest 5 items "
            "(train.history_length); export it again with this training code")):
        ParquetFeatureStore(path, "user_id", ("user_age",), history_length=5)


def test_a_history_column_of_the_wrong_type_is_named(tmp_path):
    from ensemble.feature_store import ParquetFeatureStore

    path = _write_table(tmp_path / "u.parquet", [["a"], [], [], []], type_=pa.list_(pa.string()))
    with pytest.raises(ArtifactError, match=exactly(
            f"{path}: column 'history_item_ids' must be a list of integer item ids, got list<item: string>")):
        ParquetFeatureStore(path, "user_id", ("user_age",), history_length=2)


# -- request validation and merging across a dynamic batch -------------------------------------------

LIMITS = Limits(max_batch_size=4, history_length=3)


@pytest.mark.parametrize("history, message", [
    (np.array([[1.0]]), "input 'history_item_ids' must be INT64 raw item ids, got float64"),
    (np.array([[1]], np.int32), "input 'history_item_ids' must be INT64 raw item ids, got int32"),
    (np.array([1, 2], np.int64),
     "input 'history_item_ids' must have shape [2, n] (one row per user, oldest first, padded with -1), got [2]"),
    (np.array([[1, 2]], np.int64),
     "input 'history_item_ids' must have shape [2, n] (one row per user, oldest first, padded with -1), got [1, 2]"),
    (np.ones((2, 2, 2), np.int64),
     "input 'history_item_ids' must have shape [2, n] (one row per user, oldest first, padded with -1), got [2, 2, 2]"),
    (np.ones((2, MAX_HISTORY + 1), np.int64), f"input 'history_item_ids' has {MAX_HISTORY + 1} ids per user, over the maximum of {MAX_HISTORY}"),
])
def test_bad_history_inputs_get_their_own_message(history, message):
    with pytest.raises(RequestError, match=exactly(message)):
        parse_request({contract.INPUT_USER_ID: users(1, 2), H: history}, {}, LIMITS, n_items=100)


def test_a_model_without_history_refuses_the_input():
    with pytest.raises(RequestError, match=exactly(
            "input 'history_item_ids' is not accepted: this model was trained without a history input (train.history_length 0)")):
        parse_request({contract.INPUT_USER_ID: users(1), H: np.array([[1]], np.int64)}, {}, Limits(), n_items=100)


def test_history_width_up_to_the_maximum_is_accepted_whatever_the_model_length():
    r = parse_request({contract.INPUT_USER_ID: users(1), H: np.ones((1, MAX_HISTORY), np.int64)}, {}, LIMITS, 100)
    assert r.history.shape == (1, MAX_HISTORY)  # the transform keeps the latest N known of stored + sent


def test_histories_merge_across_requests_padded_to_the_widest():
    a = parse_request({contract.INPUT_USER_ID: users(1, 2), H: np.array([[5, 6, 7], [8, PAD, PAD]])}, {}, LIMITS, 100)
    b = parse_request({contract.INPUT_USER_ID: users(3)}, {}, LIMITS, 100)
    c = parse_request({contract.INPUT_USER_ID: users(4), H: np.array([[9]])}, {}, LIMITS, 100)
    merged = merge([a, b, c], history=True)
    assert merged[H].tolist() == [[5, 6, 7], [8, PAD, PAD], [PAD, PAD, PAD], [9, PAD, PAD]]
    assert merge([b], history=True)[H].shape == (1, 0) and merge([b], history=True)[H].dtype == np.int64
    assert H not in merge([a, b])  # a model without history gets no such column


# -- the lookup operator with a store --------------------------------------------------------------


class _Store:
    """A FeatureStore of two users with stored histories (N = 3)."""

    feature_names = ("user_age",)
    history_length = 3

    def get(self, user_ids):
        table = {1: (5, [11, 12, 13]), 2: (6, [21, PAD, PAD])}
        rows = [table.get(int(u), (np.iinfo(np.int32).min, [PAD] * 3)) for u in user_ids]
        found = np.array([int(u) in table for u in user_ids])
        return {"user_age": np.array([r[0] for r in rows], np.int64), H: np.array([r[1] for r in rows], np.int64)}, found


def test_lookup_appends_the_request_history_to_the_stored_one(tmp_path):
    from ensemble.ops.lookup import LookupUserFeatures

    op = LookupUserFeatures(tmp_path / "unused.parquet", "user_id", ("user_age",), history_length=3)
    op.set_store(_Store())
    out = op.run({contract.INPUT_USER_ID: np.array([1, 2, 9]), H: np.array([[14, PAD], [22, 23], [PAD, PAD]])})
    # user 1: 11 12 13 + 14; user 2: 21 + 22 23; user 9 (unknown): nothing anywhere. The transform
    # keeps the latest N the model knows.
    assert out[H].tolist() == [[11, 12, 13, 14, PAD], [21, PAD, PAD, 22, 23], [PAD] * 5]
    assert keep_latest(out[H], 3).tolist() == [[12, 13, 14], [21, 22, 23], [PAD] * 3]
    assert out[contract.OUTPUT_UNKNOWN].tolist() == [False, False, True]
    assert op.run({contract.INPUT_USER_ID: np.array([2])})[H].tolist() == [[21, PAD, PAD]]


def test_lookup_pickled_before_history_has_none(tmp_path):
    import pickle

    from ensemble.ops.lookup import LookupUserFeatures

    op = LookupUserFeatures(tmp_path / "u.parquet", "user_id", ("user_age",))
    state = op.__getstate__()
    state.pop("history_length")  # what an ensemble.pkl written before this change holds
    old = LookupUserFeatures.__new__(LookupUserFeatures)
    old.__setstate__(state)
    assert old.history_length == 0 and pickle.loads(pickle.dumps(op)).history_length == 0


# -- encoding with the item id's Categorify, and the counts ----------------------------------------


@pytest.fixture(scope="module")
def item_workflows(tmp_path_factory):
    """A fitted workflow of user_id, user_age and item_id (as train.etl fits them), its user part
    and its item-id part."""
    import nvtabular as nvt
    from nvtabular import ops

    from ensemble.build import item_id_workflow

    root = tmp_path_factory.mktemp("wf")
    frame = pd.DataFrame({"user_id": [1, 2, 3, 1, 2], "user_age": [4, 5, 4, 4, 5], "item_id": [100, 200, 300, 200, 100]})
    cat = lambda: ops.Categorify(dtype="int32", out_path=str(root / "categories"))  # noqa: E731
    workflow = nvt.Workflow((["user_id"] >> cat()) + (["item_id"] >> cat()) + (["user_age"] >> cat()))
    workflow.fit(nvt.Dataset(frame))
    user = root / "user"
    import copy

    copy.deepcopy(workflow).remove_inputs(["item_id"]).save(str(user))
    item_id_workflow(workflow, "item_id").save(str(root / "item"))
    return workflow, user, root / "item"


def test_history_is_encoded_with_the_item_id_categorify_and_unknown_ids_are_counted(item_workflows):
    from ensemble.ops.transform import TransformUserFeatures

    workflow, user, item = item_workflows
    op = TransformUserFeatures(user, passthrough=(contract.OUTPUT_UNKNOWN,), history_workflow_path=item)
    op.load_artifacts()
    raw = np.array([[100, 300, 999, PAD], [PAD, PAD, PAD, PAD], [200, 12345, 100, 200]], np.int64)
    out = op.run({"user_id": np.array([1, 2, 7]), "user_age": np.array([4, 5, 4]),
                  contract.OUTPUT_UNKNOWN: np.array([False, False, True]), H: raw})
    # NVTabular's own codes for the known items, 0 for padding and for the 2 ids it never saw.
    theirs = workflow._transform_df(pd.DataFrame({"user_id": [1] * 3, "user_age": [4] * 3, "item_id": [100, 200, 300]}))
    code = dict(zip([100, 200, 300], theirs["item_id"].tolist()))
    assert min(code.values()) >= 3
    assert out[H].tolist() == [[code[100], code[300], 0, 0], [0, 0, 0, 0], [code[200], 0, code[100], code[200]]]
    assert op.history_counts == (5, 2)  # known: 100 300 200 100 200; unknown: 999 12345; padding not counted
    assert out[contract.OUTPUT_UNKNOWN].tolist() == [False, False, True]


def test_unknown_history_ids_take_no_known_ids_place(item_workflows):
    """The model's N latest are chosen among the ids it knows: an unknown id (a newer catalogue, a
    typo) must not push a known one out of the query."""
    from ensemble.ops.transform import TransformUserFeatures

    workflow, user, item = item_workflows
    op = TransformUserFeatures(user, passthrough=(contract.OUTPUT_UNKNOWN,), history_workflow_path=item, history_length=2)
    op.load_artifacts()
    # stored 100 300, then sent 999 12345 (both unknown): the latest 2 known are still 100 300
    raw = np.array([[100, 300, 999, 12345], [200, 999, 100, PAD], [999, PAD, PAD, PAD]], np.int64)
    out = op.run({"user_id": np.array([1, 2, 7]), "user_age": np.array([4, 5, 4]),
                  contract.OUTPUT_UNKNOWN: np.array([False, False, True]), H: raw})
    theirs = workflow._transform_df(pd.DataFrame({"user_id": [1] * 3, "user_age": [4] * 3, "item_id": [100, 200, 300]}))
    code = dict(zip([100, 200, 300], theirs["item_id"].tolist()))
    assert out[H].tolist() == [[code[100], code[300]], [code[200], code[100]], [0, 0]]
    assert op.history_counts == (4, 4)


def test_a_workflow_that_is_not_the_item_id_alone_is_refused(item_workflows):
    import nvtabular as nvt

    from ensemble.ops.transform import item_id_table

    _, user, _ = item_workflows
    with pytest.raises(ArtifactError, match=re.escape(f"{user} must hold one Categorify of the item id column to encode histories")):
        item_id_table(nvt.Workflow.load(str(user)), user)


# -- config, metric, client ------------------------------------------------------------------------


def test_the_history_input_is_declared_only_for_a_model_with_history(tiny_cfg):
    import dataclasses

    import tritonclient.grpc.model_config_pb2 as mc

    from ensemble.build import executor_config

    plain = executor_config(tiny_cfg)
    assert H not in {i.name for i in plain.input} and plain.parameters["history_length"].string_value == "0"
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, history_length=5))
    config = executor_config(cfg)
    (declared,) = [i for i in config.input if i.name == H]
    assert mc.DataType.Name(declared.data_type) == "TYPE_INT64" and list(declared.dims) == [-1]
    assert declared.optional and declared.allow_ragged_batch
    assert config.parameters["history_length"].string_value == "5"
    limits = Limits.from_parameters({k: v.string_value for k, v in config.parameters.items()}, 256)
    assert limits.history_length == 5 and limits.max_history == MAX_HISTORY


def test_history_counts_are_sent_as_their_own_family():
    from ensemble.backend import BackendCapabilities
    from ensemble.executor import BatchReport
    from ensemble.metrics import ServingMetrics
    from tests.unit.test_executor import _Recorder

    _Recorder.calls = []
    metrics = ServingMetrics(_Recorder, BackendCapabilities(_Recorder), "retrieval", "1", flush_interval_s=3600)
    metrics.record(BatchReport(ok=1, users=2, history_known=7, history_unknown=2))
    metrics.record(BatchReport(ok=1, users=1, history_known=3))
    metrics.close()
    sent = [(labels["kind"], v) for c, labels, v in _Recorder.calls if labels["family"] == "retrieval_history_items_total"]
    assert sorted(sent) == [("known", 10), ("unknown", 2)]


def test_client_packs_histories_and_the_cli_parses_them():
    from client.__main__ import history_lists, parse_args
    from client.client import _exclusion_matrix

    assert _exclusion_matrix([[1, 2], []], 2, "history", PAD).tolist() == [[1, 2], [PAD, PAD]]
    with pytest.raises(ClientError, match=exactly("history must have one list per user: 2 users, 1 lists")):
        _exclusion_matrix([[1]], 2, "history", PAD)
    args = parse_args(["--user-id", "11", "42", "--history", "12,40,7", "--history", "42:9"])
    assert args.history == [(None, [12, 40, 7]), (42, [9])]
    assert history_lists(args.history, args.user_ids) == [[12, 40, 7], [12, 40, 7, 9]]
    assert history_lists([], [1]) is None
    with pytest.raises(ClientError, match=exactly("--history names user 5, who is not among --user-id [11, 42]")):
        history_lists([(5, [1])], [11, 42])
    with pytest.raises(SystemExit):
        parse_args(["--user-id", "1", "--history", "1,x"])


def test_the_guard_refuses_a_history_that_claims_a_huge_shape():
    import json

    from ensemble.guard import GuardLimits, Refused, check_infer

    body = json.dumps({"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [1]},
                                  {"name": H, "shape": [1, 2**40], "datatype": "INT64", "data": [1]}]}).encode()
    with pytest.raises(Refused, match=re.escape("input 'history_item_ids': shape [1, 1099511627776] has a dimension outside 0..2147483647")):
        check_infer(body, None, GuardLimits(max_body_bytes=1 << 20, max_elements=1000))


def test_append_click_reads_the_manifest_alone_and_names_it_when_missing(tmp_path):
    from ensemble.__main__ import main

    with pytest.raises(ArtifactError, match=exactly(
            f"{tmp_path / contract.MANIFEST} cannot be read: [Errno 2] No such file or directory: '{tmp_path / contract.MANIFEST}'")):
        main(["append-click", "--artifacts", str(tmp_path), "--redis", "redis://127.0.0.1:1/0", "--user", "1", "--item", "2"])


def test_an_export_is_served_with_the_history_length_it_was_trained_with(trained, tmp_path):
    import dataclasses

    from ensemble.build import build_repository

    cfg = dataclasses.replace(trained["cfg"], train=dataclasses.replace(trained["cfg"].train, history_length=5))
    with pytest.raises(ArtifactError, match=exactly(
            f"{trained['artifacts']} was trained with train.history_length 0; it cannot be served with 5 "
            "(the query tower's inputs are fixed at training)")):
        build_repository(trained["artifacts"], tmp_path / "repo", cfg=cfg)
    assert not (tmp_path / "repo").exists()


def test_an_export_from_before_the_history_input_is_served_without_one(trained):
    """Manifests written before train.history_length existed lack it: such an export has no history
    whatever today's default (20), and keeps its config.pbtxt without the input."""
    import copy
    import json

    from common.manifest import artifacts_config
    from ensemble.build import executor_config

    manifest = json.loads((trained["artifacts"] / contract.MANIFEST).read_text())
    old = copy.deepcopy(manifest)
    del old["config"]["train"]["history_length"]
    assert artifacts_config(old).train.history_length == 0
    assert H not in {i.name for i in executor_config(artifacts_config(old)).input}
    manifest["config"]["train"]["history_length"] = 7
    assert artifacts_config(manifest).train.history_length == 7
