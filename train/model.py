"""The merlin-models two-tower model: query and item `Encoder`s, in-batch softmax, optional logQ.

merlin-models 23.12's `InBatchSamplerV2` gives no sampling probabilities, so its
`logq_sampling_correction=True` warns "sampling probs were not found" and then fails adding an
epsilon to None. `PopularityInBatchSampler` supplies the probabilities from training item
frequencies, which makes the correction work. ContrastiveOutput also divides by the temperature
*after* subtracting log(p), which turns `alpha * log(p)` into `alpha / temperature * log(p)` (20x
at temperature 0.05); the sampler hands out p ** (alpha * temperature) so that the logits come
out as s / temperature - alpha * log(p), the correction of Yi et al. (2019).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import merlin.models.tf as mm
from merlin.models.tf.outputs.sampling.base import Candidate
from merlin.models.tf.outputs.sampling.in_batch import InBatchSamplerV2
from merlin.models.tf.outputs.contrastive import ContrastiveOutput
from merlin.models.tf.outputs.base import DotProduct
from merlin.models.tf.core.combinators import ParallelBlock
from merlin.models.tf.inputs.embedding import EmbeddingTable
from merlin.schema import Schema, Tags

from common.config import TrainConfig


@tf.keras.utils.register_keras_serializable(package="retrieval")
class PopularityInBatchSampler(InBatchSamplerV2):
    """In-batch negatives that know each item's probability of being in a batch.

    Args:
        item_probs: [cardinality] float32, the share of training positives per encoded item id.
        alpha: weight of the correction: logits = score / temperature - alpha * log(prob).
        temperature: the model's logits temperature (undone here, see the module docstring).
    """

    def __init__(self, item_probs: np.ndarray, alpha: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.item_probs = np.asarray(item_probs, dtype=np.float32)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self._table = tf.constant(self.item_probs)

    def with_sampling_probs(self, items: Candidate) -> Candidate:
        ids = tf.cast(items.id, tf.int32)
        probs = tf.gather(self._table, ids)
        if probs.shape.rank == 1:
            probs = tf.expand_dims(probs, -1)
        # ContrastiveOutput computes (score - log(p')) / temperature; p' = p ** (alpha * temperature)
        # makes that score / temperature - alpha * log(p).
        return items.with_sampling_prob(tf.pow(probs, self.alpha * self.temperature))

    def get_config(self):
        config = super().get_config()
        config.update(item_probs=self.item_probs.tolist(), alpha=self.alpha, temperature=self.temperature)
        return config


def item_probabilities(item_ids: np.ndarray, cardinality: int) -> np.ndarray:
    """[cardinality] share of training positives per encoded item id, floored at one count."""
    counts = np.bincount(item_ids, minlength=cardinality).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    return (counts / counts.sum()).astype(np.float32)


def _encoder(schema: Schema, sizes: tuple[int, ...], cfg: TrainConfig, embeddings: ParallelBlock | None = None) -> mm.Encoder:
    categorical = schema.select_by_tag(Tags.CATEGORICAL)
    embeddings = embeddings or mm.Embeddings(categorical, dim=cfg.embedding_dim)
    inputs = mm.InputBlockV2(schema, categorical=embeddings)
    mlp = mm.MLPBlock(list(sizes), no_activation_last_layer=True, dropout=cfg.dropout or None)
    return mm.Encoder(inputs, mlp, post=mm.L2Norm())


def _query_embeddings(user_schema: Schema, item_table: EmbeddingTable, dim: int) -> ParallelBlock:
    """One table per categorical user column, plus the history pooled over the item tower's id table.

    The history's `EmbeddingTable` wraps the item id's Keras `Embedding` layer (`table=`): one
    variable, moved by both towers, so a clicked item pulls the queries of whoever clicked it
    towards where the item tower put it. Its "mean" combiner takes merlin's ragged list input
    (`tf.nn.safe_embedding_lookup_sparse`: an empty history pools to zeros). The block's schema
    must name the history column too, or the ParallelBlock filters it out of its inputs.
    """
    categorical = user_schema.select_by_tag(Tags.CATEGORICAL)
    history = user_schema.select_by_tag(Tags.SEQUENCE)
    tables = {col.name: EmbeddingTable(dim, col, name=col.name) for col in categorical}
    for col in history:
        tables[col.name] = EmbeddingTable(dim, col, table=item_table.table, sequence_combiner="mean", name=col.name)
    return ParallelBlock(tables, name="embeddings", schema=categorical + history)


def tower_schemas(schema: Schema) -> tuple[Schema, Schema]:
    """(user columns, item columns) of an ETL output schema, selected by their tags."""
    return schema.select_by_tag(Tags.USER), schema.select_by_tag(Tags.ITEM)


def build_two_tower(schema: Schema, cfg: TrainConfig, item_probs: np.ndarray | None = None) -> mm.RetrievalModelV2:
    """Builds and compiles `TwoTowerModelV2` with in-batch negatives.

    Args:
        schema: the ETL output schema (user and item columns, tagged).
        cfg: tower sizes, temperature, learning rate, logQ weight.
        item_probs: [item cardinality] needed when cfg.logq_correction > 0.
    """
    user_schema, item_schema = tower_schemas(schema)
    item_embeddings = mm.Embeddings(item_schema.select_by_tag(Tags.CATEGORICAL), dim=cfg.embedding_dim)
    candidate = _encoder(item_schema, cfg.item_mlp, cfg, item_embeddings)
    query_embeddings = None
    if user_schema.select_by_tag(Tags.SEQUENCE):
        item_id = item_schema.select_by_tag(Tags.ITEM_ID).first.name
        query_embeddings = _query_embeddings(user_schema, item_embeddings.parallel_dict[item_id], cfg.embedding_dim)
    query = _encoder(user_schema, cfg.query_mlp, cfg, query_embeddings)
    if cfg.logq_correction > 0:
        if item_probs is None:
            raise ValueError("logQ correction needs item_probs")
        sampler = PopularityInBatchSampler(item_probs, alpha=cfg.logq_correction, temperature=cfg.temperature)
        outputs = ContrastiveOutput(
            to_call=DotProduct(),
            negative_samplers=[sampler],
            logits_temperature=cfg.temperature,
            schema=item_schema.select_by_tag(Tags.ITEM_ID),
            logq_sampling_correction=True,
        )
        model = mm.TwoTowerModelV2(query, candidate, outputs=outputs)
    else:
        model = mm.TwoTowerModelV2(query, candidate, logits_temperature=cfg.temperature)
    # No in-batch metrics: the full-catalogue evaluation is what counts, and top-k metrics break
    # on a last batch smaller than k.
    optimizer = (tf.keras.optimizers.Adagrad if cfg.optimizer == "adagrad" else tf.keras.optimizers.Adam)(cfg.learning_rate)
    model.compile(optimizer=optimizer, run_eagerly=False, metrics=[])
    return model


def encode_in_batches(encoder: tf.keras.Model, features: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """Runs a tower over feature columns in batches.

    Args:
        encoder: a query or candidate `Encoder`.
        features: column name -> [n] int32 encoded values, or a `train.history.Ragged` of item
            codes for a list column (the history).

    Returns:
        [n, dim] float32 embeddings.
    """
    n = len(next(iter(features.values())))
    out = []
    for start in range(0, n, batch_size):
        batch = {k: _batch_tensor(v, start, min(start + batch_size, n)) for k, v in features.items()}
        out.append(encoder(batch, training=False).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def _batch_tensor(values, start: int, stop: int) -> tf.Tensor | tf.RaggedTensor:
    if isinstance(values, np.ndarray):
        return tf.constant(values[start:stop])
    rows = values.slice(start, stop)  # a train.history.Ragged
    return tf.RaggedTensor.from_row_splits(tf.constant(rows.values.astype(np.int32)), tf.constant(rows.offsets))
