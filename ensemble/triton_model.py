"""Triton Python-backend model that serves the retrieval ensemble (copied as `<model>/1/model.py`).

It replaces merlin-systems' executor model, which loops over the requests of a dynamic batch
one by one and sends Python tracebacks to clients. Here every request is validated on its own
(a bad one gets INVALID_ARG with a message, the others still run), the good ones are merged
and the graph runs once for all of them. Tracebacks are logged on the server only.
"""

import json
import logging
import sys
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The export vendors our packages next to this file so the model does not depend on a checkout.
sys.path.insert(0, str(_HERE / "code"))

import triton_python_backend_utils as pb_utils  # noqa: E402

from common import contract  # noqa: E402
from common.errors import RequestError  # noqa: E402
from ensemble.executor import Limits, load_executor, parse_parameters  # noqa: E402
from ensemble.metrics import ServingMetrics  # noqa: E402

LOG = logging.getLogger("retrieval.model")
_OPTIONAL_INPUTS = (contract.INPUT_EXCLUDE,)


class TritonPythonModel:
    """Triton's entry points: initialize once, execute per batch of requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        limits = Limits.from_parameters(params, int(config.get("max_batch_size", 0)) or 1)
        threads = int(params.get("threads", "1"))
        self.executor = load_executor(_HERE / "ensemble", limits, threads=threads, feature_store=params.get("feature_store", "embedded"))
        self.optional_inputs = (*_OPTIONAL_INPUTS, *limits.user_features)
        self.metrics = ServingMetrics(pb_utils, args["model_name"], str(args["model_version"]))
        pb_utils.Logger.log_info(
            f"retrieval model ready: {self.executor.n_items} items, limits {limits}, {threads} thread(s)"
        )

    def execute(self, requests):
        parsed, errors = [], {}
        for i, request in enumerate(requests):
            try:
                tensors = {contract.INPUT_USER_ID: _input(request, contract.INPUT_USER_ID)}
                for name in self.optional_inputs:
                    tensors[name] = _input(request, name)
                parsed.append((tensors, parse_parameters(request.parameters())))
            except RequestError as e:
                errors[i] = e
                parsed.append(({}, {}))
        try:
            answers = self.executor.execute(parsed)
            self.metrics.record(self.executor.last)
        except Exception:  # noqa: BLE001 - log the traceback here, send the client a summary
            self.metrics.record_error(len(requests))
            pb_utils.Logger.log_error("retrieval graph failed:\n" + traceback.format_exc())
            error = pb_utils.TritonError("internal error while serving this batch; see the server log", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        for i, answer in enumerate(answers):
            answer = errors.get(i, answer)
            if isinstance(answer, RequestError):
                error = pb_utils.TritonError(str(answer), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in answer.items()]))
        return responses

    def finalize(self):
        pb_utils.Logger.log_info(f"retrieval model unloading; served {self.executor.stats}")
        self.metrics.close()


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
