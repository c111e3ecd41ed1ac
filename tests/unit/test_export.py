"""train.export and common.manifest: every export round-trips and is checked on load."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from common import contract
from common.errors import ArtifactError
from common.manifest import REQUIRED_FILES, read_manifest
from train import etl
from train.export import prepare_output
from train.fit import tower_inputs


def test_artifacts_hold_every_file_and_a_full_manifest(trained):
    artifacts = trained["artifacts"]
    manifest = read_manifest(artifacts)
    for name in REQUIRED_FILES:
        assert (artifacts / name).exists(), name
    assert manifest["counts"]["items"] == len(np.load(artifacts / contract.ARTIFACT_ITEM_IDS))
    assert manifest["embedding_dim"] == trained["cfg"].train.embedding_size
    assert {"merlin-models", "nvtabular", "tensorflow", "faiss-cpu", "python"} <= set(manifest["versions"])
    assert manifest["tensors"]["outputs"] == [contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN]
    assert set(manifest["metrics"]) >= {"two_tower", "random", "popular", "als", "oracle"}
    assert manifest["index"]["recall_at_10"] == 1.0  # the tiny preset serves an exact index
    assert json.loads((artifacts / contract.ARTIFACT_METRICS).read_text())["methods"] == manifest["metrics"]


def test_query_tower_round_trip(trained):
    """The SavedModel gives the in-memory tower's outputs, from the same input names."""
    users = pd.read_parquet(trained["work"] / "etl" / etl.USERS_ENCODED).head(32)
    in_memory = trained["run"].model.query_encoder(
        {k: tf.constant(v) for k, v in tower_inputs(users).items()}, training=False
    ).numpy()
    loaded = tf.saved_model.load(str(trained["artifacts"] / contract.ARTIFACT_QUERY_TOWER))
    signature = loaded.signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == sorted(users.columns)
    out = signature(**{k: tf.constant(v) for k, v in tower_inputs(users).items()})
    np.testing.assert_allclose(next(iter(out.values())).numpy(), in_memory, atol=1e-5)


def test_item_embeddings_match_the_item_tower(trained):
    items = pd.read_parquet(trained["work"] / "etl" / etl.ITEMS_ENCODED)
    emb = trained["run"].model.candidate_encoder({k: tf.constant(v) for k, v in tower_inputs(items).items()}).numpy()
    np.testing.assert_allclose(np.load(trained["artifacts"] / contract.ARTIFACT_ITEM_EMBEDDINGS), emb, atol=1e-5)
    raw = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_ITEM_FEATURES)
    np.testing.assert_array_equal(raw.item_id.to_numpy(), np.load(trained["artifacts"] / contract.ARTIFACT_ITEM_IDS))


def test_seen_items_are_the_training_positives(trained):
    seen = np.load(trained["artifacts"] / contract.ARTIFACT_SEEN)
    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()
    np.testing.assert_array_equal(seen["user_ids"], users)
    raw = pd.read_parquet(trained["work"] / "data" / "train.parquet")
    catalogue = np.load(trained["artifacts"] / contract.ARTIFACT_ITEM_IDS)
    u = 0
    clicked = np.unique(raw[(raw.user_id == users[u]) & (raw.click == 1)].item_id)
    np.testing.assert_array_equal(np.sort(catalogue[seen["indices"][seen["indptr"][u]: seen["indptr"][u + 1]]]), clicked)


@pytest.fixture
def copy_of_artifacts(trained, tmp_path):
    dest = tmp_path / "artifacts"
    shutil.copytree(trained["artifacts"], dest)
    return dest


def test_manifest_checks_fail_clearly(copy_of_artifacts, trained, tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    path = copy_of_artifacts / contract.MANIFEST
    manifest = json.loads(path.read_text())
    emb = copy_of_artifacts / contract.ARTIFACT_ITEM_EMBEDDINGS
    np.save(emb, np.zeros((3, 2), np.float32))
    with pytest.raises(ArtifactError, match=r"item_embeddings.npy has 152 bytes, the manifest recorded \d+: the file was truncated"):
        read_manifest(copy_of_artifacts)  # 152 = 128-byte .npy header + 3 x 2 x 4 bytes
    shutil.copy2(trained["artifacts"] / contract.ARTIFACT_ITEM_EMBEDDINGS, emb)
    path.write_text(json.dumps({**manifest, "counts": {**manifest["counts"], "items": manifest["counts"]["items"] + 1}}))
    with pytest.raises(ArtifactError, match=r"item_embeddings.npy has shape \(\d+, \d+\), manifest says"):
        read_manifest(copy_of_artifacts)
    path.write_text(json.dumps(manifest))
    (copy_of_artifacts / contract.ARTIFACT_INDEX).unlink()
    with pytest.raises(ArtifactError, match=r"lacks \['items.faiss'\]"):
        read_manifest(copy_of_artifacts)
    path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99, expected 2"):
        read_manifest(copy_of_artifacts)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(copy_of_artifacts)


@pytest.mark.parametrize("name", [contract.ARTIFACT_INDEX, contract.ARTIFACT_QUERY_TOWER_COMPILED, "workflow/metadata.json"])
def test_a_file_corrupted_without_changing_size_is_named(copy_of_artifacts, name):
    target = copy_of_artifacts / name
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{re.escape(name)} does not match its sha256 in the manifest .*changed or corrupted after export"):
        read_manifest(copy_of_artifacts)


def test_version_mismatch_is_logged(copy_of_artifacts, caplog):
    path = copy_of_artifacts / contract.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["versions"]["tensorflow"] = "1.15.0"
    path.write_text(json.dumps(manifest))
    read_manifest(copy_of_artifacts)
    assert "exported with tensorflow 1.15.0" in caplog.text


def test_output_folder_is_never_replaced_silently(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not empty; pass --overwrite"):
        prepare_output(tmp_path / "out", overwrite=False)
    prepare_output(tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_make_eval_scores_the_served_model_like_training_did(trained, tmp_path):
    """`make eval` recomputes the table from the exported files: the compiled tower and the item file."""
    from train.pipeline import evaluate_artifacts

    report = evaluate_artifacts(trained["work"], trained["artifacts"], tmp_path)
    training = json.loads((trained["artifacts"] / contract.ARTIFACT_METRICS).read_text())
    seeds = trained["cfg"].eval.seeds
    assert len(report["per_seed"]["two_tower"]) == 1  # the served model is the first seed's
    assert len(report["per_seed"]["als"]) == seeds and len(report["per_seed"]["random"]) == seeds
    assert report["n_users"] == training["n_users"]
    first_seed = training["per_seed"]["two_tower"][0]["recall@10"]
    assert report["methods"]["two_tower"]["recall@10"] == pytest.approx(first_seed, abs=0.01)
    assert report["methods"]["popular"] == training["methods"]["popular"]
    assert report["cold_start"]["n_users"] == training["cold_start"]["n_users"]
    assert report["cold_start_history"]["n_users"] == training["cold_start_history"]["n_users"] > 0
    assert set(report["cold_start_history"]["methods"]) >= {"two_tower", "popular", "popular_in_segment", "als_fold_in"}
    # both tables: features only, and the first positives as history
    assert (tmp_path / "metrics.md").read_text().count("## Cold start") == 2
