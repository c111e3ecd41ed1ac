"""Compiles the trained query tower into plain arrays that numpy can run (`query_tower.npz`).

The tower is embedding lookups, a concatenation, an MLP and an L2 norm. Served through
TensorFlow it costs 0.35 ms per call before any work, and TensorFlow's kernels give a row
slightly different floats depending on the batch it shares (oneDNN picks kernels by shape),
so a user's ranking could flip between near-tied items depending on who else was batched with
them. The compiled form runs in microseconds and, computing each row's matmuls on their own,
gives every row the same bits whatever the batch. The SavedModel stays the exported model of record;
compilation refuses any tower whose structure it does not recognise, and checks its outputs
against TensorFlow's before it is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from common.errors import ArtifactError

LOG = logging.getLogger(__name__)

ACTIVATIONS = ("linear", "relu")
TOLERANCE = 1e-5


def _layers(block):
    return getattr(block, "layers", None) or []


def compile_query_tower(encoder: tf.keras.Model, probe: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Extracts the arrays of a merlin-models query `Encoder` (InputBlockV2 -> MLPBlock -> L2Norm).

    Args:
        encoder: the trained query encoder.
        probe: feature name -> [n] encoded values (a `train.history.Ragged` of item codes for the
            history), used to find the concatenation order and to
            check the compiled tower against TensorFlow.

    Returns:
        arrays for `np.savez`: `features` (concatenation order), `pooled` (list features, mean-pooled), `table_<name>`, `kernel_<i>`,
        `bias_<i>`, `activations`, `l2_norm`.

    Raises:
        ArtifactError: a structure other than the one above, or outputs that differ.
    """
    from merlin.models.tf.inputs.embedding import EmbeddingTable

    from ensemble.ops.tower import NumpyTower, pool_mean
    from train.history import Ragged

    input_block, *rest = encoder.blocks
    # List features are the probe's Ragged inputs (the history). merlin's `Embeddings` gives every
    # table sequence_combiner="mean" whether its column is a list or not, so the combiner alone
    # cannot say which tables pool.
    pooled = {name for name, values in probe.items() if isinstance(values, Ragged)}
    tables = {}
    stack = [input_block]
    while stack:
        layer = stack.pop()
        if isinstance(layer, EmbeddingTable):
            tables[layer.name] = layer.table.embeddings.numpy()
            if layer.name in pooled and layer.sequence_combiner != "mean":
                raise ArtifactError(f"query tower list feature {layer.name} pools by {layer.sequence_combiner!r}; only 'mean' compiles")
        stack.extend(getattr(layer, "parallel_layers", {}).values() if isinstance(getattr(layer, "parallel_layers", None), dict) else _layers(layer))
    if set(tables) != set(probe):
        raise ArtifactError(f"query tower tables {sorted(tables)} do not match its inputs {sorted(probe)}")

    probe = with_new_user_rows(probe, pooled)
    inputs = {k: tf.RaggedTensor.from_row_splits(tf.constant(v.values.astype(np.int32)), tf.constant(v.offsets))
              if isinstance(v, Ragged) else tf.constant(v) for k, v in probe.items()}
    width = max([int(v.lengths.max(initial=0)) for v in probe.values() if isinstance(v, Ragged)] + [1])
    padded = {k: v.padded(width, 0) if isinstance(v, Ragged) else v for k, v in probe.items()}
    concat = input_block(encoder._prepare_features(inputs)).numpy()  # noqa: SLF001 - the encoder's own preprocessing
    looked_up = {name: pool_mean(table, padded[name]) if name in pooled else table[padded[name]] for name, table in tables.items()}
    order, offset = [], 0
    for _ in tables:
        for name, table in tables.items():
            width = table.shape[1]
            if name not in order and np.allclose(concat[:, offset : offset + width], looked_up[name], atol=1e-6):
                order.append(name)
                offset += width
                break
        else:
            raise ArtifactError("cannot find the concatenation order of the query tower's embeddings")

    kernels, biases, activations = [], [], []
    l2_norm = False
    for block in rest:
        for layer in _layers(block) or [block]:
            kind = type(layer).__name__
            if kind == "_Dense":
                dense = layer.dense
                activation = getattr(dense.activation, "__name__", str(dense.activation))
                if activation not in ACTIVATIONS:
                    raise ArtifactError(f"query tower activation {activation!r} is not one of {ACTIVATIONS}")
                kernels.append(dense.kernel.numpy())
                biases.append(dense.bias.numpy() if dense.use_bias else np.zeros(dense.units, np.float32))
                activations.append(activation)
            elif kind == "L2Norm":
                l2_norm = True
            elif kind not in ("Dropout", "NoOp"):
                raise ArtifactError(f"query tower layer {kind} cannot be compiled")
    if getattr(encoder, "post", None) is not None and type(encoder.post).__name__ == "L2Norm":
        l2_norm = True

    arrays = {"features": np.array(order), "pooled": np.array(sorted(pooled), dtype=str), "activations": np.array(activations),
              "l2_norm": np.array(l2_norm)}
    arrays.update({f"table_{n}": tables[n].astype(np.float32) for n in order})
    arrays.update({f"kernel_{i}": k.astype(np.float32) for i, k in enumerate(kernels)})
    arrays.update({f"bias_{i}": b.astype(np.float32) for i, b in enumerate(biases)})

    expected = encoder(inputs, training=False).numpy()
    got = NumpyTower(arrays).embed(padded)
    error = float(np.abs(got - expected).max())
    if error > TOLERANCE:
        raise ArtifactError(f"compiled query tower differs from TensorFlow by {error:.2e} (> {TOLERANCE})")
    LOG.info("query tower compiled: %d tables, %d dense layers, max |numpy - tensorflow| = %.1e", len(order), len(kernels), error)
    arrays["max_abs_error"] = np.array(error)
    return arrays


def with_new_user_rows(probe: dict, pooled: set[str]) -> dict:
    """The probe plus the rows a new user sends: every scalar feature missing (code 1), then unseen
    (code 2), with an empty history, so that the check below covers the rows warm users never hit."""
    from nvtabular.ops.categorify import NULL_OFFSET, OOV_OFFSET

    from train.history import Ragged

    out = {}
    for name, values in probe.items():
        if name in pooled:
            out[name] = Ragged(values.values, np.concatenate([values.offsets, [values.offsets[-1]] * 2]))
        else:
            out[name] = np.concatenate([values, np.array([NULL_OFFSET, OOV_OFFSET], dtype=values.dtype)])
    return out


def save_compiled(arrays: dict[str, np.ndarray], path: Path) -> None:
    np.savez(path, **arrays)
