"""A corpus of malformed requests, each with the error it must get (used by tests and `make soak`).

Each case is sent with raw tritonclient calls, since the library would refuse to build most of
them. Some are stopped by Triton itself before the model (wrong dtype, wrong rank, batch over the
maximum, unknown input); the rest by our validation, with INVALID_ARG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common import contract


@dataclass(frozen=True)
class BadRequest:
    """One malformed request and the exact error it must get.

    Attributes:
        name: short id of the case.
        inputs: (tensor name, array, Triton datatype) to send.
        params: request parameters.
        message: regular expression of the whole error message (anchored at both ends).
        triton: the message is Triton's own (it may carry a request-id prefix), not our model's.
        message_2_36: the message where tritonserver 2.36 (Triton 23.06) words it otherwise.
        http_message: the message over HTTP where it differs (the guard answers it).
        http_status: the HTTP status of `http_message`.
        ours_on_2_36: on tritonserver 2.36 the request reaches our model, which refuses it.
    """

    name: str
    inputs: tuple[tuple[str, np.ndarray, str], ...]
    params: dict = field(default_factory=dict)
    message: str = ""
    triton: bool = False
    message_2_36: str | None = None
    http_message: str | None = None
    http_status: int = 400
    ours_on_2_36: bool = False

    def expected(self, protocol: str, stack: str = "2.51") -> str:
        """The full error text's pattern as tritonclient reports it ('[400] ...', '[StatusCode...] ...').

        Args:
            protocol: "grpc" or "http".
            stack: "2.51" (our pinned server) or "23.06" (the Merlin container's backend, whose
                model errors carry no code: gRPC reports them as INTERNAL).
        """
        if protocol == "http" and self.http_message is not None:
            return rf"^\[{self.http_status}\] {self.http_message}$"
        message = self.message_2_36 if stack == "23.06" and self.message_2_36 else self.message
        triton = self.triton and not (stack == "23.06" and self.ours_on_2_36)
        if protocol == "http":
            code = r"\[400\]"
        else:
            code = r"\[StatusCode\.INTERNAL\]" if stack == "23.06" and not triton else r"\[StatusCode\.INVALID_ARGUMENT\]"
        request_id = r"(\[request id: <id_unknown>\] )?" if triton else ""
        return rf"^{code} {request_id}{message}$"


def _users(*ids) -> tuple[str, np.ndarray, str]:
    return (contract.INPUT_USER_ID, np.array(ids, dtype=np.int64).reshape(-1, 1), "INT64")


CASES = 26  # the corpus's size; the tests assert it, so a case cannot silently go missing


def corpus(max_batch_size: int, max_top_k: int, max_exclude: int, feature: str, known_user: int,
           n_items: int | None = None, max_request_bytes: int = 8 << 20) -> list[BadRequest]:
    """The CASES bad requests for a model with these limits, a catalogue of `n_items` (top_k's cap
    when smaller than max_top_k) and a user feature named `feature`."""
    cap = min(max_top_k, n_items or max_top_k)
    u = _users(known_user)
    model = contract.MODEL_NAME

    def dtype(name, got):
        return BadRequest(f"{name}_{got.lower()}", (), triton=True,
                          message=rf"inference input '{name}' data-type is '{got}', but model '{model}' expects 'INT64'",
                          message_2_36=rf"inference input data-type is '{got}', model expects 'INT64' for '{model}'")

    def typed(case, inputs):
        return BadRequest(case.name, inputs, triton=True, message=case.message, message_2_36=case.message_2_36)

    def shape(name, expected, got):
        return (rf"unexpected shape for input '{name}' for model '{model}'\. Expected \[{expected}\], got \[{got}\]\. "
                r"NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension.*")

    def top_k(value, text):
        return BadRequest(f"top_k_{text}", (u,), {"top_k": value}, rf"parameter top_k must be in 1\.\.{cap}, got {value}")

    mismatch = rf"input 'user_id' batch size does not match other inputs for '{model}'"
    huge = 2_000_000
    return [
        BadRequest("missing_user_id", ((contract.INPUT_EXCLUDE, np.array([[1]], np.int64), "INT64"),),
                   message=r"missing input 'user_id' \(INT64 \[batch, 1\]\)"),
        typed(dtype("user_id", "FP32"), ((contract.INPUT_USER_ID, np.array([[1.0]], np.float32), "FP32"),)),
        typed(dtype("user_id", "INT32"), ((contract.INPUT_USER_ID, np.array([[1]], np.int32), "INT32"),)),
        typed(dtype("user_id", "BYTES"), ((contract.INPUT_USER_ID, np.array([[b"11"]], np.object_), "BYTES"),)),
        BadRequest("user_id_rank1", ((contract.INPUT_USER_ID, np.array([1, 2, 3], np.int64), "INT64"),), triton=True,
                   message=shape("user_id", "-1,1", "3")),
        BadRequest("user_id_two_columns", ((contract.INPUT_USER_ID, np.array([[1, 2]], np.int64), "INT64"),), triton=True,
                   message=shape("user_id", "-1,1", "1,2")),
        # Triton 2.51 refuses the empty batch itself; 2.36 hands the model a [1] tensor, which our validation refuses.
        BadRequest("empty_batch", ((contract.INPUT_USER_ID, np.zeros((0, 1), np.int64), "INT64"),), triton=True,
                   message=rf"input byte size mismatch for input 'user_id' for model '{model}'\. Expected 8, got 0",
                   message_2_36=r"input 'user_id' must have shape \[batch, 1\], got \[1\]", ours_on_2_36=True),
        BadRequest("batch_over_maximum", (_users(*range(max_batch_size + 1)),), triton=True,
                   message=rf"inference request batch-size must be <= {max_batch_size} for '{model}'"),
        top_k(0, "zero"),
        top_k(-5, "negative"),
        top_k(max_top_k + 1, "over_maximum"),
        BadRequest("top_k_text", (u,), {"top_k": "ten"}, "parameter top_k must be an integer, got 'ten'"),
        BadRequest("top_k_fraction", (u,), {"top_k": "2.5"}, r"parameter top_k must be an integer, got '2\.5'"),
        BadRequest("top_k_bool", (u,), {"top_k": True}, "parameter top_k must be an integer, got True"),
        BadRequest("unknown_parameter", (u,), {"topk": 5}, r"unknown request parameters \['topk'\]; expected 'top_k', 'exclude_seen'"),
        BadRequest("exclude_seen_not_bool", (u,), {"exclude_seen": "maybe"}, "parameter exclude_seen must be a boolean, got 'maybe'"),
        typed(dtype(contract.INPUT_EXCLUDE, "FP32"), (u, (contract.INPUT_EXCLUDE, np.array([[1.0]], np.float32), "FP32"))),
        BadRequest("exclude_rows_mismatch", (_users(known_user, known_user), (contract.INPUT_EXCLUDE, np.array([[1, 2]], np.int64), "INT64")),
                   triton=True, message=mismatch),
        BadRequest("exclude_rank3", (u, (contract.INPUT_EXCLUDE, np.ones((1, 2, 2), np.int64), "INT64")), triton=True,
                   message=shape(contract.INPUT_EXCLUDE, "-1,-1", "1,2,2")),
        BadRequest("exclude_too_wide", (u, (contract.INPUT_EXCLUDE, np.ones((1, max_exclude + 1), np.int64), "INT64")),
                   message=rf"input 'exclude_item_ids' has {max_exclude + 1} ids per user, over the maximum of {max_exclude}"),
        typed(dtype(feature, "BYTES"), (u, (feature, np.array([[b"young"]], np.object_), "BYTES"))),
        typed(dtype(feature, "FP32"), (u, (feature, np.array([[2.5]], np.float32), "FP32"))),
        BadRequest("feature_out_of_range", (u, (feature, np.array([[-7]], np.int64), "INT64")),
                   message=rf"input '{feature}' holds -7; raw feature ids are >= 0, or -1 for 'not given'"),
        BadRequest("feature_rows_mismatch", (_users(known_user, known_user), (feature, np.array([[1]], np.int64), "INT64")),
                   triton=True, message=mismatch),
        BadRequest("unknown_input", (u, ("favourite_colour", np.array([[1]], np.int64), "INT64")), triton=True,
                   message=rf"unexpected inference input 'favourite_colour' for model '{model}'"),
        # 16 MB: our validation refuses it over gRPC; over HTTP the guard does, before Triton buffers it.
        BadRequest("huge_payload", (u, (contract.INPUT_EXCLUDE, np.ones((1, huge), np.int64), "INT64")),
                   message=rf"input 'exclude_item_ids' has {huge} ids per user, over the maximum of {max_exclude}",
                   http_message=rf"request body of \d+ bytes is over the maximum of {max_request_bytes}", http_status=413),
    ]


HISTORY_CASES = 6  # history_corpus's size for a model with a history input (1 for one without)


def history_corpus(history_length: int, max_history: int, known_user: int, max_request_bytes: int = 8 << 20) -> list[BadRequest]:
    """Hostile `history_item_ids` inputs: HISTORY_CASES of them for a model with a history input
    (history_length > 0), else the one case of a model that has none (Triton refuses the input)."""
    model, name = contract.MODEL_NAME, contract.INPUT_HISTORY
    u = _users(known_user)
    if not history_length:
        return [BadRequest("history_not_declared", (u, (name, np.array([[1, 2]], np.int64), "INT64")), triton=True,
                           message=rf"unexpected inference input '{name}' for model '{model}'")]

    def dtype(got, array):
        return BadRequest(f"history_{got.lower()}", (u, (name, array, got)), triton=True,
                          message=rf"inference input '{name}' data-type is '{got}', but model '{model}' expects 'INT64'",
                          message_2_36=rf"inference input data-type is '{got}', model expects 'INT64' for '{model}'")

    huge = 2_000_000
    return [
        dtype("FP32", np.array([[1.0, 2.0]], np.float32)),
        dtype("INT32", np.array([[1, 2]], np.int32)),
        BadRequest("history_rows_mismatch", (_users(known_user, known_user), (name, np.array([[1, 2]], np.int64), "INT64")),
                   triton=True, message=rf"input 'user_id' batch size does not match other inputs for '{model}'"),
        BadRequest("history_rank3", (u, (name, np.ones((1, 2, 2), np.int64), "INT64")), triton=True,
                   message=(rf"unexpected shape for input '{name}' for model '{model}'\. Expected \[-1,-1\], got \[1,2,2\]\. "
                            r"NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension.*")),
        BadRequest("history_too_wide", (u, (name, np.ones((1, max_history + 1), np.int64), "INT64")),
                   message=rf"input '{name}' has {max_history + 1} ids per user, over the maximum of {max_history}"),
        # 16 MB: our validation refuses it over gRPC; over HTTP the guard does, before Triton buffers it.
        BadRequest("history_huge_payload", (u, (name, np.ones((1, huge), np.int64), "INT64")),
                   message=rf"input '{name}' has {huge} ids per user, over the maximum of {max_history}",
                   http_message=rf"request body of \d+ bytes is over the maximum of {max_request_bytes}", http_status=413),
    ]


def send(client_module, client, model: str, case: BadRequest):
    """Sends a case with a raw tritonclient client; returns the exception raised (None if answered)."""
    inputs = []
    for name, array, dtype in case.inputs:
        tensor = client_module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    try:
        client.infer(model, inputs, parameters=case.params or None)
    except Exception as e:  # noqa: BLE001 - any failure is what we look at
        return e
    return None
