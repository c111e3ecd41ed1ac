"""train.model: the towers, and a logQ correction that merlin-models' in-batch sampler lacks."""

import dataclasses
import warnings

import numpy as np
import pytest
import tensorflow as tf
from merlin.io import Dataset
from merlin.models.tf.outputs.sampling.base import Candidate
from merlin.models.tf.outputs.sampling.in_batch import InBatchSamplerV2

from train import etl
from train.fit import tower_inputs
from train.model import PopularityInBatchSampler, build_two_tower, encode_in_batches, item_probabilities, tower_schemas


def test_item_probabilities_floor_and_normalize():
    probs = item_probabilities(np.array([3, 3, 4]), cardinality=5)
    # counts [0,0,0,2,1] floored at 1 -> [1,1,1,2,1] / 6
    np.testing.assert_allclose(probs, np.array([1, 1, 1, 2, 1]) / 6, rtol=1e-6)


def test_stock_in_batch_sampler_gives_no_probabilities_ours_does():
    items = Candidate(id=tf.constant([[3], [4]]), metadata={})
    assert InBatchSamplerV2().with_sampling_probs(items).sampling_prob is None  # logQ would be a no-op
    ours = PopularityInBatchSampler(np.array([0.1, 0.1, 0.2, 0.4, 0.2], np.float32), alpha=0.5)
    probs = ours.with_sampling_probs(items).sampling_prob.numpy()
    np.testing.assert_allclose(probs, [[0.4**0.5], [0.2**0.5]], rtol=1e-6)


@pytest.fixture(scope="module")
def batch(trained):
    train = Dataset(str(trained["work"] / "etl" / etl.TRAIN_DIR), engine="parquet")
    user_schema, item_schema = tower_schemas(train.schema)
    frame = etl.read_encoded(trained["work"] / "etl" / etl.TRAIN_DIR).head(64)
    cols = user_schema.column_names + item_schema.column_names
    return user_schema + item_schema, {c: tf.constant(frame[c].to_numpy()) for c in cols}


def _warnings_of_a_training_call(model, features):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(features, targets=None, training=True)
    return [str(w.message) for w in caught if "logQ" in str(w.message)]


def test_logq_correction_really_applies(batch, tiny_cfg):
    schema, features = batch
    cardinality = int(schema["item_id"].int_domain.max) + 1
    cfg = dataclasses.replace(tiny_cfg.train, logq_correction=1.0)
    ours = build_two_tower(schema, cfg, item_probabilities(features["item_id"].numpy(), cardinality))
    assert isinstance(ours.last.negative_samplers[0], PopularityInBatchSampler)
    assert _warnings_of_a_training_call(ours, features) == []
    # The same call on merlin's own in-batch sampler warns that it found no probabilities, then
    # fails adding an epsilon to None.
    import merlin.models.tf as mm
    from merlin.models.tf.outputs.base import DotProduct
    from merlin.models.tf.outputs.contrastive import ContrastiveOutput

    stock = build_two_tower(schema, dataclasses.replace(cfg, logq_correction=0.0))
    stock_out = ContrastiveOutput(to_call=DotProduct(), negative_samplers=["in-batch"],
                                  schema=schema.select_by_name(["item_id"]), logq_sampling_correction=True)
    stock = mm.TwoTowerModelV2(stock.query_encoder, stock.candidate_encoder, outputs=stock_out)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TypeError):
        warnings.simplefilter("always")
        stock(features, targets=None, training=True)
    assert any("sampling probs were not found" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="needs item_probs"):
        build_two_tower(schema, cfg, None)


def test_towers_embed_to_unit_vectors(trained):
    model_dir = trained["artifacts"] / "query_tower"
    loaded = tf.keras.models.load_model(model_dir, compile=False)
    import pandas as pd

    users = pd.read_parquet(trained["work"] / "etl" / etl.USERS_ENCODED).head(7)
    emb = encode_in_batches(loaded, tower_inputs(users), batch_size=3)
    assert emb.shape == (7, trained["cfg"].train.embedding_size)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_logits_are_score_over_temperature_minus_alpha_log_p(batch, tiny_cfg):
    """ContrastiveOutput scales by 1/temperature after subtracting log(p); the sampler undoes that."""
    schema, features = batch
    cardinality = int(schema["item_id"].int_domain.max) + 1
    probs = item_probabilities(features["item_id"].numpy().ravel(), cardinality)
    alpha, temperature = 0.8, 0.05
    cfg = dataclasses.replace(tiny_cfg.train, logq_correction=alpha, temperature=temperature, dropout=0.0)
    model = build_two_tower(schema, cfg, probs)
    logits = model(features, targets=None, training=True).outputs.numpy()
    q = model.query_encoder(features, training=False).numpy()
    c = model.candidate_encoder(features, training=False).numpy()
    ids = features["item_id"].numpy().ravel()
    expected_pos = np.sum(q * c, axis=1) / temperature - alpha * np.log(probs[ids])
    expected_neg = q @ c.T / temperature - alpha * np.log(probs[ids])[None, :]
    np.testing.assert_allclose(logits[:, 0], expected_pos, rtol=1e-4, atol=1e-3)
    different = ids[:, None] != ids[None, :]  # same-item negatives are masked as false negatives
    np.testing.assert_allclose(logits[:, 1:][different], expected_neg[different], rtol=1e-4, atol=1e-3)


def _item_id_table(model, cardinality):
    tables = [v for v in model.candidate_encoder.trainable_variables if v.shape.rank == 2 and v.shape[0] == cardinality]
    assert len(tables) == 1, [v.shape for v in model.candidate_encoder.trainable_variables]
    return tables[0].numpy().copy()


@pytest.mark.parametrize("optimizer, sparse", [("adagrad", True), ("adam", False)])
def test_adagrad_leaves_the_rows_a_batch_does_not_use_alone(batch, tiny_cfg, optimizer, sparse):
    """Why the seed-size preset trains with Adagrad: Keras 2.12's Adam moves every row it ever saw at every step."""
    schema, features = batch
    cfg = dataclasses.replace(tiny_cfg.train, optimizer=optimizer, logq_correction=0.0, dropout=0.0, learning_rate=0.05)
    model = build_two_tower(schema, cfg)
    half = {k: v[:32] for k, v in features.items()}
    other = {k: v[32:] for k, v in features.items()}
    cardinality = int(schema["item_id"].int_domain.max) + 1
    model.fit(half, batch_size=32, epochs=1, verbose=0, shuffle=False)
    before = _item_id_table(model, cardinality)
    model.fit(other, batch_size=32, epochs=1, verbose=0, shuffle=False)  # a batch without the first one's items
    after = _item_id_table(model, cardinality)
    only_first = np.setdiff1d(half["item_id"].numpy(), other["item_id"].numpy())
    assert len(only_first) > 0
    moved = np.abs(after[only_first] - before[only_first]).max()
    assert (moved == 0) == sparse, f"{optimizer}: rows of the first batch only moved by {moved}"
