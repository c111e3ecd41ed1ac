"""Triton's floor: a Python-backend model that only echoes its input, in its own repository."""

from __future__ import annotations

from pathlib import Path

MODEL = "trivial"
CONFIG = """name: "trivial"
backend: "python"
max_batch_size: 256
dynamic_batching { }
input [{ name: "user_id" data_type: TYPE_INT64 dims: [1] }]
output [{ name: "echo" data_type: TYPE_INT64 dims: [1] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""
MODEL_PY = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("echo", pb_utils.get_input_tensor_by_name(r, "user_id").as_numpy())])
            for r in requests
        ]
'''


def build_trivial_repository(repository: Path) -> Path:
    """Writes `repository/trivial/{config.pbtxt,1/model.py}`."""
    (repository / MODEL / "1").mkdir(parents=True, exist_ok=True)
    (repository / MODEL / "config.pbtxt").write_text(CONFIG)
    (repository / MODEL / "1" / "model.py").write_text(MODEL_PY)
    return repository
