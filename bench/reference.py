"""The Merlin reference ensemble, rebuilt from stock merlin-systems ops for an honest comparison.

Stock `TransformWorkflow` (exported by merlin as its own Python model, reached through BLS) ->
`PredictTensorflow` -> stock `QueryFaiss` over an index from stock `setup_faiss` (IVF32,Flat,
nprobe 8), exported by the stock `TritonExecutorRuntime`. One change only: the PyPI tritonserver
has no TensorFlow backend, and the stock `PredictTensorflow` drops its model when pickled and is
swapped for a `tensorflow_savedmodel` model on export; `InProcessPredictTensorflow` is a
distinct type that keeps the same call in-process and saves/loads the SavedModel beside the
ensemble. Requests carry the raw user features, as in the seed notebook; the answer is encoded
candidate ids without scores, one flattened list.

A second variant attributes the gains: the same stock ensemble given our FAISS index file (the
one our model serves, with its nprobe) and Triton's dynamic batching on its entry model (the
stock executor then receives queued requests together, and runs its graph once per request).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import nvtabular as nvt
import tritonclient.grpc.model_config_pb2 as mc
import pandas as pd
from google.protobuf import text_format
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


def build_reference_repository(artifacts: Path, repository: Path, scratch: Path, data: DataConfig,
                               index_path: Path | None = None, max_batch_size: int = 0) -> Path:
    """Exports the reference ensemble for an artifacts folder (its embeddings, its tower).

    Args:
        index_path: a FAISS index file to serve instead of stock `setup_faiss`'s (ours, say).
        max_batch_size: above 0, the entry model gets Triton's dynamic batching with this
            largest batch (`with_dynamic_batching`); 0 keeps merlin's export (no batching).
    """
    from train.etl import user_workflow

    scratch.mkdir(parents=True, exist_ok=True)
    workflow = user_workflow(nvt.Workflow.load(str(artifacts / contract.ARTIFACT_WORKFLOW)), data)
    if index_path is None:
        vectors = np.load(artifacts / contract.ARTIFACT_ITEM_EMBEDDINGS)
        frame = pd.DataFrame({"item_id": np.arange(len(vectors)), "embedding": list(vectors)})
        index_path = scratch / "reference.faiss"
        setup_faiss(frame, str(index_path))
        del vectors, frame
    graph = (
        workflow.input_schema.column_names
        >> TransformWorkflow(workflow)
        >> InProcessPredictTensorflow(str(artifacts / contract.ARTIFACT_QUERY_TOWER))
        >> QueryFaiss(str(index_path), topk=10)
    )
    ensemble = Ensemble(graph, workflow.input_schema)
    ensemble.export(str(repository))
    if max_batch_size:
        with_dynamic_batching(repository / MODEL / "config.pbtxt", max_batch_size)
    LOG.info("reference ensemble written to %s (index %s, max_batch_size %d)", repository, Path(index_path).name, max_batch_size)
    return repository


def with_dynamic_batching(config_path: Path, max_batch_size: int) -> None:
    """Turns on Triton's dynamic batching in a stock merlin entry model's config.pbtxt.

    merlin exports `max_batch_size: 0` and inputs of dims [-1]; batching needs a batch dimension,
    so each input becomes dims [1] reshaped to [] (the model still sees a [batch] vector per
    request, as before) and the output loses its leading -1. No queue delay, as ours.
    """
    config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    config.max_batch_size = max_batch_size
    for tensor in config.input:
        del tensor.dims[:]
        tensor.dims.append(1)
        tensor.reshape.SetInParent()
    for tensor in config.output:
        dims = list(tensor.dims)[1:]
        del tensor.dims[:]
        tensor.dims.extend(dims)
    config.dynamic_batching.max_queue_delay_microseconds = 0
    config_path.write_text(text_format.MessageToString(config))
