"""Operator: the query tower, run inside the executor's Python process.

The PyPI tritonserver has no TensorFlow backend, merlin-systems' runtime swaps a stock
`PredictTensorflow` for a `tensorflow_savedmodel` model on export, and the stock op drops its
model when pickled. This subclass is a distinct type (so the runtime keeps it in-process),
saves the SavedModel beside the ensemble and loads it back in `load_artifacts`.

When the export also wrote the compiled tower (`train.compile_tower`), requests run on it
(`NumpyTower`): the same arrays, checked against TensorFlow at export, in microseconds for one
user, and with the same result for a row whatever else is in the batch. `runtime="tensorflow"` keeps
the SavedModel's signature on the request path instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag.ops.tensorflow import PredictTensorflow

from common.errors import ArtifactError
from ensemble.ops import ArrayOperator

LOG = logging.getLogger(__name__)

TOWER_DIR = "query_tower"
COMPILED_FILE = "query_tower.npz"
QUERY_EMBEDDING = "query_embedding"
RUNTIMES = ("numpy", "tensorflow")


def rowwise_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w as one [1, k] @ [k, m] product per row (numpy loops over them in C).

    BLAS picks kernels by shape and treats rows differently by their place in a tile, so a
    plain [n, k] @ [k, m] gives a row other bits in other batches (seen here: 6e-8, enough to
    swap near-tied items). One shape for every row makes each row's result its own.
    """
    return np.matmul(x[:, None, :], w)[:, 0, :]


# Categorify's codes below this are padding (0), missing (1) and unseen (2): never an item.
FIRST_ITEM_CODE = 3


def pool_mean(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[batch, n] item codes -> [batch, dim] mean of their embedding rows.

    Codes below FIRST_ITEM_CODE (padding, unknown items) are left out; a row with none pools to
    zeros. This is what merlin-models' `EmbeddingTable(sequence_combiner="mean")` computes on the
    ragged list of a row's codes (`tf.nn.safe_embedding_lookup_sparse`), summed in order per row.
    """
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes.reshape(len(codes), -1)
    valid = codes >= FIRST_ITEM_CODE
    rows = table[np.where(valid, codes, 0)] * valid[..., None]
    counts = valid.sum(axis=1, keepdims=True)
    return (rows.sum(axis=1) / np.maximum(counts, 1)).astype(np.float32, copy=False)


RAGGED_SUFFIXES = ("__values", "__offsets")


def ragged_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[batch, n] padded codes -> (int32 values, int64 offsets [batch + 1]) of the item codes in each
    row, in order: a list feature as merlin's dataloader hands it to a model."""
    codes = np.asarray(codes)
    codes = codes.reshape(len(codes), -1)
    valid = codes >= FIRST_ITEM_CODE
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int64)
    return codes[valid].astype(np.int32), offsets


class NumpyTower:
    """The compiled query tower: embedding lookups (mean-pooled for list features), concatenation,
    dense layers, L2 norm.

    Args:
        arrays: what `train.compile_tower.compile_query_tower` returns (or the loaded npz).
    """

    def __init__(self, arrays):
        self.features = [str(f) for f in arrays["features"]]
        self.pooled = {str(f) for f in arrays["pooled"]} if "pooled" in arrays else set()
        self.tables = [np.ascontiguousarray(arrays[f"table_{f}"], np.float32) for f in self.features]
        n_layers = len(arrays["activations"])
        self.kernels = [np.ascontiguousarray(arrays[f"kernel_{i}"], np.float32) for i in range(n_layers)]
        self.biases = [np.asarray(arrays[f"bias_{i}"], np.float32) for i in range(n_layers)]
        self.activations = [str(a) for a in arrays["activations"]]
        self.l2_norm = bool(arrays["l2_norm"])
        # With no pooled feature and one embedding size, the lookups and their concatenation are one
        # gather from the tables stacked end to end ([batch, features] codes + each table's first row).
        same_dim = len({t.shape[1] for t in self.tables}) == 1
        self._stacked = np.concatenate(self.tables) if self.tables and same_dim and not self.pooled else None
        self._rows = np.array([len(t) for t in self.tables], np.int64)
        self._first_row = np.concatenate([[0], np.cumsum(self._rows)[:-1]]).astype(np.int64)

    @property
    def dim(self) -> int:
        return self.kernels[-1].shape[1]

    def _stacked_lookup(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """The concatenated embeddings of every feature by one gather (the same values as a lookup per table).

        Raises:
            IndexError: a code outside its table (which a gather per table raises too), rather than
                a row of the next table.
        """
        codes = np.array([np.asarray(features[f]).reshape(-1) for f in self.features], dtype=np.int64).T
        if (codes < 0).any() or (codes >= self._rows).any():
            bad = np.argwhere((codes < 0) | (codes >= self._rows))[0]
            raise IndexError(f"code {codes[tuple(bad)]} of feature {self.features[bad[1]]!r} is outside its embedding table "
                             f"of {self._rows[bad[1]]} rows")
        return self._stacked[codes + self._first_row].reshape(len(codes), -1)

    def embed(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """[batch] encoded feature columns ([batch, n] codes for pooled list features) -> [batch, dim] float32."""
        x = self._stacked_lookup(features) if self._stacked is not None else np.concatenate(
            [pool_mean(t, features[f]) if f in self.pooled else t[np.asarray(features[f]).reshape(-1)]
             for f, t in zip(self.features, self.tables)], axis=1)
        for w, b, activation in zip(self.kernels, self.biases, self.activations):
            x = rowwise_matmul(x, w) + b
            if activation == "relu":
                np.maximum(x, 0.0, out=x)
        if self.l2_norm:  # tf.math.l2_normalize: x * rsqrt(max(sum(x^2), 1e-12))
            x = x / np.sqrt(np.maximum(np.sum(x * x, axis=1, keepdims=True), 1e-12))
        return x.astype(np.float32, copy=False)


def configure_threads(threads: int) -> None:
    """Sets TensorFlow's thread pools, and on a GPU lets it grow its memory instead of taking it
    all (the FAISS index shares the GPU); only possible before TensorFlow runs its first op."""
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            LOG.debug("TensorFlow already initialized %s; memory growth unchanged", gpu.name)

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        LOG.debug("TensorFlow already initialized; thread settings unchanged")


class QueryTower(ArrayOperator, PredictTensorflow):
    """Runs the query tower's serving signature on encoded user features.

    Output: `query_embedding` [batch, dim] float32.

    Args:
        saved_model_path: the exported query tower.
        compiled_path: its compiled arrays (`query_tower.npz`), or None.
        runtime: "numpy" (the compiled arrays; needs compiled_path) or "tensorflow".
    """

    def __init__(self, saved_model_path: str | Path, compiled_path: str | Path | None = None, runtime: str = "numpy"):
        if runtime not in RUNTIMES:
            raise ValueError(f"tower runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "numpy" and compiled_path is None:
            raise ValueError("the numpy tower runtime needs the compiled tower (query_tower.npz)")
        self.saved_model_path = str(saved_model_path)
        self.compiled_path = None if compiled_path is None else str(compiled_path)
        self.runtime = runtime
        self._numpy = None
        super().__init__(self.saved_model_path)
        signature = self.model.signatures["serving_default"]
        self._output_key = next(iter(signature.structured_outputs))
        self._dim = int(signature.structured_outputs[self._output_key].shape[-1])
        self._input_names = tuple(sorted(signature.structured_input_signature[1]))
        self._signature = signature

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "_signature", "_numpy")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.model, self._signature, self._numpy = None, None, None

    def save_artifacts(self, artifact_path: str) -> None:
        shutil.copytree(self.saved_model_path, Path(artifact_path) / TOWER_DIR, dirs_exist_ok=True)
        if self.compiled_path:
            shutil.copy2(self.compiled_path, Path(artifact_path) / COMPILED_FILE)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        if self.runtime == "numpy":  # TensorFlow's model is not needed on the request path then
            compiled = Path(artifact_path) / COMPILED_FILE if artifact_path else Path(self.compiled_path)
            try:
                with np.load(compiled) as arrays:
                    self._numpy = NumpyTower({k: arrays[k] for k in arrays.files})
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                raise ArtifactError(f"{compiled} is not a readable compiled tower: {type(e).__name__}: {e}") from None
            return
        import tensorflow as tf

        path = Path(artifact_path) / TOWER_DIR if artifact_path else Path(self.saved_model_path)
        self.model = tf.saved_model.load(str(path))
        self._signature = self.model.signatures["serving_default"]

    def compute_input_schema(self, root_schema, parents_schema, deps_schema, selector) -> Schema:
        return self.input_schema

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema=None) -> Schema:
        return Schema([ColumnSchema(QUERY_EMBEDDING, dtype=np.float32, dims=(None, self._dim))])

    def embed(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """[batch] encoded feature columns -> [batch, dim] float32 query embeddings."""
        import tensorflow as tf

        if self._signature is None and self._numpy is None:
            self.load_artifacts()
        if self._numpy is not None:
            return self._numpy.embed(features)
        inputs = {}
        for name in self._input_names:
            if name.endswith(RAGGED_SUFFIXES):  # a list feature: padded codes -> merlin's values/offsets
                base, part = name.rsplit("__", 1)
                values, offsets = ragged_codes(features[base])
                inputs[name] = tf.convert_to_tensor(values if part == "values" else offsets)
            else:
                inputs[name] = tf.convert_to_tensor(np.asarray(features[name]).reshape(-1).astype(np.int32, copy=False))
        return self._signature(**inputs)[self._output_key].numpy()

    def run(self, columns: dict) -> dict:
        return {QUERY_EMBEDDING: self.embed(columns)}
