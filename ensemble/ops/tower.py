"""Operator: the query tower (a TensorFlow SavedModel) run inside the executor's Python process.

The PyPI tritonserver has no TensorFlow backend, merlin-systems' runtime swaps a stock
`PredictTensorflow` for a `tensorflow_savedmodel` model on export, and the stock op drops its
model when pickled. This subclass is a distinct type (so the runtime keeps it in-process),
saves the SavedModel beside the ensemble and loads it back in `load_artifacts`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag.ops.tensorflow import PredictTensorflow
from merlin.table import TensorTable

LOG = logging.getLogger(__name__)

TOWER_DIR = "query_tower"
QUERY_EMBEDDING = "query_embedding"


def configure_threads(threads: int) -> None:
    """Sets TensorFlow's thread pools; only possible before TensorFlow runs its first op."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        LOG.debug("TensorFlow already initialized; thread settings unchanged")


class QueryTower(PredictTensorflow):
    """Runs the query tower's serving signature on encoded user features.

    Output: `query_embedding` [batch, dim] float32.

    Args:
        saved_model_path: the exported query tower.
    """

    def __init__(self, saved_model_path: str | Path):
        self.saved_model_path = str(saved_model_path)
        super().__init__(self.saved_model_path)
        signature = self.model.signatures["serving_default"]
        self._output_key = next(iter(signature.structured_outputs))
        self._dim = int(signature.structured_outputs[self._output_key].shape[-1])
        self._input_names = tuple(sorted(signature.structured_input_signature[1]))
        self._signature = signature

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "_signature")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.model, self._signature = None, None

    def save_artifacts(self, artifact_path: str) -> None:
        shutil.copytree(self.saved_model_path, Path(artifact_path) / TOWER_DIR, dirs_exist_ok=True)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
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

        if self._signature is None:
            self.load_artifacts()
        inputs = {name: tf.convert_to_tensor(np.asarray(features[name]).reshape(-1).astype(np.int32, copy=False))
                  for name in self._input_names}
        return self._signature(**inputs)[self._output_key].numpy()

    def transform(self, col_selector: ColumnSelector, transformable: TensorTable) -> TensorTable:
        features = {name: transformable[name].values for name in self._input_names}
        return type(transformable)({QUERY_EMBEDDING: self.embed(features)})
