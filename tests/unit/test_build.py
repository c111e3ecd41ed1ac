"""ensemble.build: the generated model repository, checked without a server."""

import filecmp
from pathlib import Path

import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format

from common import contract


def _config(repository) -> mc.ModelConfig:
    return text_format.Parse((repository / contract.MODEL_NAME / "config.pbtxt").read_text(), mc.ModelConfig())


def test_only_the_executor_model_is_exported(repository):
    # No tensorflow_savedmodel and no NVTabular workflow model: neither runs on the PyPI server,
    # and both would cost a BLS hop.
    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == [contract.MODEL_NAME]


def test_config_follows_the_contract(repository, tiny_cfg):
    config = _config(repository)
    assert config.name == contract.MODEL_NAME and config.backend == "python"
    assert config.max_batch_size == tiny_cfg.serve.max_batch_size
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    inputs = {i.name: i for i in config.input}
    outputs = {o.name: o for o in config.output}
    features = set(tiny_cfg.data.user_features)
    assert set(inputs) == {contract.INPUT_USER_ID, contract.INPUT_EXCLUDE} | features
    assert all(inputs[f].optional and mc.DataType.Name(inputs[f].data_type) == "TYPE_INT64" for f in features)
    assert set(outputs) == {contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN}
    for name, tensor in {**inputs, **outputs}.items():
        if name in features:
            continue
        assert mc.DataType.Name(tensor.data_type) == f"TYPE_{contract.DTYPES[name]}", name
    assert list(inputs[contract.INPUT_USER_ID].dims) == [1]
    assert inputs[contract.INPUT_EXCLUDE].optional and inputs[contract.INPUT_EXCLUDE].allow_ragged_batch
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["default_top_k"] == str(tiny_cfg.serve.default_top_k) and params["max_top_k"] == str(tiny_cfg.serve.max_top_k)
    assert params["user_features"].split(",") == list(tiny_cfg.data.user_features)


def test_version_folder_is_self_contained(repository):
    version = repository / contract.MODEL_NAME / "1"
    assert filecmp.cmp(version / "model.py", Path(__file__).parents[2] / "ensemble" / "triton_model.py", shallow=False)
    for module in ("common/contract.py", "ensemble/executor.py", "ensemble/ops/search.py"):
        assert (version / "code" / module).is_file(), module
    for artifact in ("ensemble.pkl", "items.faiss", "item_ids.npy", "user_features.parquet", "query_tower", "user_workflow"):
        assert (version / "ensemble" / artifact).exists(), artifact
    assert (version / contract.MANIFEST).is_file()


def test_rebuilding_needs_overwrite(repository, trained):
    import pytest

    from common.errors import ArtifactError
    from ensemble.build import build_repository

    with pytest.raises(ArtifactError, match="exists and is not empty; pass --overwrite"):
        build_repository(trained["artifacts"], repository)


def test_the_canary_users_are_one_stored_and_one_not(repository, trained):
    import numpy as np
    import pandas as pd

    from ensemble.build import cold_user_id
    from ensemble.health import canary_user

    stored = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()
    user, known, new_user = canary_user(repository)
    assert known and user == stored[0] and new_user == stored.max() + 1
    big = np.iinfo(np.int64).max
    assert cold_user_id(np.array([5, 3, 9])) == 10
    assert cold_user_id(np.array([], dtype=np.int64)) == 0
    assert cold_user_id(np.array([big, 7, 8, big - 1])) == 9  # the largest id taken: the first hole above the smallest
    assert cold_user_id(np.array([big - 1, big])) == big - 2  # no hole: below the smallest

