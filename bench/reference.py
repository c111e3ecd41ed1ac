"""The Merlin reference ensemble, rebuilt from stock merlin-systems ops for an honest comparison.

Stock `TransformWorkflow` (exported by merlin as its own Python model, reached through BLS) ->
`PredictTensorflow` -> stock `QueryFaiss` over an index from stock `setup_faiss` (IVF32,Flat,
nprobe 8), exported by the stock `TritonExecutorRuntime`. One change only: the PyPI tritonserver
has no TensorFlow backend, and the stock `PredictTensorflow` drops its model when pickled and is
swapped for a `tensorflow_savedmodel` model on export; `InProcessPredictTensorflow` is a
distinct type that keeps the same call in-process and saves/loads the SavedModel beside the
ensemble. Requests carry the raw user features, as in the seed notebook; the answer is encoded
candidate ids without scores, one flattened list.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.systems.dag import Ensemble
from merlin.systems.dag.ops.faiss import QueryFaiss, setup_faiss
from merlin.systems.dag.ops.tensorflow import PredictTensorflow
from merlin.systems.dag.ops.workflow import TransformWorkflow

from common import contract
from common.config import DataConfig

LOG = logging.getLogger(__name__)

MODEL = "executor_model"  # merlin's default name for the entry model
TOWER_DIR = "reference_tower"


class InProcessPredictTensorflow(PredictTensorflow):
    """Stock PredictTensorflow, kept in the executor's process (the reference's only change)."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}

    def save_artifacts(self, artifact_path: str) -> None:
        shutil.copytree(self.path, Path(artifact_path) / TOWER_DIR, dirs_exist_ok=True)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        import tensorflow as tf

        self.model = tf.saved_model.load(str(Path(artifact_path) / TOWER_DIR) if artifact_path else str(self.path))


def build_reference_repository(artifacts: Path, repository: Path, scratch: Path, data: DataConfig) -> Path:
    """Exports the reference ensemble for an artifacts folder (its embeddings, its tower)."""
    from train.etl import user_workflow

    scratch.mkdir(parents=True, exist_ok=True)
    workflow = user_workflow(nvt.Workflow.load(str(artifacts / contract.ARTIFACT_WORKFLOW)), data)
    vectors = np.load(artifacts / contract.ARTIFACT_ITEM_EMBEDDINGS)
    frame = pd.DataFrame({"item_id": np.arange(len(vectors)), "embedding": list(vectors)})
    index_path = scratch / "reference.faiss"
    setup_faiss(frame, str(index_path))
    graph = (
        workflow.input_schema.column_names
        >> TransformWorkflow(workflow)
        >> InProcessPredictTensorflow(str(artifacts / contract.ARTIFACT_QUERY_TOWER))
        >> QueryFaiss(str(index_path), topk=10)
    )
    ensemble = Ensemble(graph, workflow.input_schema)
    ensemble.export(str(repository))
    LOG.info("reference ensemble written to %s (%d items)", repository, len(vectors))
    return repository
