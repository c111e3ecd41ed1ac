"""Triton Python-backend model that serves the retrieval ensemble (copied as `<model>/<version>/model.py`).

It replaces merlin-systems' executor model, which loops over the requests of a dynamic batch
one by one and sends Python tracebacks to clients. Here every request is validated on its own
(a bad one gets INVALID_ARG with a message, the others still run), the good ones are merged
and the graph runs once for all of them. Tracebacks are logged on the server only.

It runs on every Python backend we deploy to (tritonserver 2.51's and Triton 23.06's) and on
Python 3.10 and 3.11: what the backend offers is detected at load (`ensemble.backend`).
"""

import gc
import json
import sys
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The export vendors our packages next to this file so the model does not depend on a checkout.
sys.path.insert(0, str(_HERE / "code"))

import triton_python_backend_utils as pb_utils  # noqa: E402

from common import contract  # noqa: E402
from common.errors import FeatureStoreError, RequestError, RetrievalError  # noqa: E402
from ensemble.backend import INTERNAL, INVALID_ARG, UNAVAILABLE, BackendCapabilities  # noqa: E402
from ensemble.loader import load_executor  # noqa: E402
from ensemble.metrics import ServingMetrics  # noqa: E402
from ensemble.request import Limits, parse_parameters  # noqa: E402

_OPTIONAL_INPUTS = (contract.INPUT_EXCLUDE,)


class TritonPythonModel:
    """Triton's entry points: initialize once, execute per batch of requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        limits = Limits.from_parameters(params, int(config.get("max_batch_size", 0)) or 1)
        threads = int(params.get("threads", "1"))
        self.caps = BackendCapabilities(pb_utils)
        try:
            self.executor = load_executor(_HERE / "ensemble", limits, params=params)
        except RetrievalError as e:
            # One line in the server log that says what to fix, not a traceback into our code.
            raise pb_utils.TritonModelException(f"retrieval model cannot load: {e}") from None
        history = (contract.INPUT_HISTORY,) if limits.history_length else ()
        self.inputs = frozenset((contract.INPUT_USER_ID, *_OPTIONAL_INPUTS, *history, *limits.user_features))
        self.metrics = ServingMetrics(pb_utils, self.caps, args["model_name"], str(args["model_version"]),
                                      on_error=pb_utils.Logger.log_error)
        # The loaded model holds about 450,000 objects (TensorFlow, merlin, pandas); a full collection
        # walks them all (0.57 s measured here), and one can fall on any request. They live as long as
        # the model, so they are moved out of the collector's reach.
        gc.collect()
        gc.freeze()
        pb_utils.Logger.log_info(
            f"retrieval model ready: {self.executor.n_items} items, limits {limits}, {threads} thread(s); "
            f"backend: {self.caps.describe()}; search: {self.executor.search_description}; "
            f"query cache: {self.executor.cache_note}"
        )

    def execute(self, requests):
        parsed, refused = [], {}
        for i, request in enumerate(requests):
            try:
                # One pass over the inputs: pb_utils.get_input_tensor_by_name walks them all on every call.
                tensors = {t.name(): t.as_numpy() for t in request.inputs() if t.name() in self.inputs}
                parsed.append((tensors, parse_parameters(request.parameters())))
            except RequestError as e:
                # Keep the message only: an exception's traceback holds the frames, and so the
                # request's input tensors, alive for as long as the exception lives.
                refused[i] = str(e)
                parsed.append(({}, {}))
        try:
            answers = self.executor.execute(parsed)
            self.metrics.record(self.executor.last)
        except FeatureStoreError as e:
            self.metrics.record_failure("unavailable", len(requests))
            pb_utils.Logger.log_error(f"feature store failed for a batch of {len(requests)} request(s): {e}")
            return [self._failed(f"feature store unavailable: {e}", UNAVAILABLE) for _ in requests]
        except Exception:  # noqa: BLE001 - log the traceback here, send the client a summary
            self.metrics.record_failure("error", len(requests))
            pb_utils.Logger.log_error("retrieval graph failed:\n" + traceback.format_exc())
            return [self._failed("internal error while serving this batch; see the server log", INTERNAL) for _ in requests]
        responses = []
        for i, answer in enumerate(answers):
            if i in refused or isinstance(answer, RequestError):
                responses.append(self._failed(refused.get(i) or str(answer), INVALID_ARG))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in answer.items()]))
        return responses

    def _failed(self, message: str, kind: str):
        # A TritonError of its own per response: the backend frees an error with its response,
        # so one object shared by a batch's responses is used after it is freed.
        return pb_utils.InferenceResponse(output_tensors=[], error=self.caps.error(message, kind))

    def finalize(self):
        pb_utils.Logger.log_info(f"retrieval model unloading; served {self.executor.stats}")
        self.metrics.close()
