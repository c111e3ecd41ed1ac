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
    """One malformed request.

    Attributes:
        name: short id of the case.
        inputs: (tensor name, array, Triton datatype) to send.
        params: request parameters.
        error: regular expression the error message must match (over gRPC and HTTP).
    """

    name: str
    inputs: tuple[tuple[str, np.ndarray, str], ...]
    params: dict = field(default_factory=dict)
    error: str = ""


def _users(*ids) -> tuple[str, np.ndarray, str]:
    return (contract.INPUT_USER_ID, np.array(ids, dtype=np.int64).reshape(-1, 1), "INT64")


def corpus(max_batch_size: int, max_top_k: int, max_exclude: int, feature: str, known_user: int) -> list[BadRequest]:
    """At least 20 bad requests for a model with these limits and a user feature named `feature`."""
    u = _users(known_user)
    dtype = r"data-type is '\w+', but model '\w+' expects 'INT64'"
    shape = r"(?i)(unexpected shape|shape)"
    return [
        BadRequest("missing_user_id", ((contract.INPUT_EXCLUDE, np.array([[1]], np.int64), "INT64"),),
                   error=r"(?i)(expected 1 inputs|missing|user_id)"),
        BadRequest("user_id_fp32", ((contract.INPUT_USER_ID, np.array([[1.0]], np.float32), "FP32"),), error=dtype),
        BadRequest("user_id_int32", ((contract.INPUT_USER_ID, np.array([[1]], np.int32), "INT32"),), error=dtype),
        BadRequest("user_id_bytes", ((contract.INPUT_USER_ID, np.array([[b"11"]], np.object_), "BYTES"),), error=dtype),
        BadRequest("user_id_rank1", ((contract.INPUT_USER_ID, np.array([1, 2, 3], np.int64), "INT64"),), error=shape),
        BadRequest("user_id_two_columns", ((contract.INPUT_USER_ID, np.array([[1, 2]], np.int64), "INT64"),), error=shape),
        BadRequest("empty_batch", ((contract.INPUT_USER_ID, np.zeros((0, 1), np.int64), "INT64"),),
                   error=r"(?i)(holds no users|batch.size|must be|empty|0)"),
        BadRequest("batch_over_maximum", (_users(*range(max_batch_size + 1)),), error=r"(?i)batch.size must be <= " + str(max_batch_size)),
        BadRequest("top_k_zero", (u,), {"top_k": 0}, r"top_k must be in 1\.\.\d+, got 0"),
        BadRequest("top_k_negative", (u,), {"top_k": -5}, r"top_k must be in 1\.\.\d+, got -5"),
        BadRequest("top_k_over_maximum", (u,), {"top_k": max_top_k + 1}, rf"top_k must be in 1\.\.\d+, got {max_top_k + 1}"),
        BadRequest("top_k_text", (u,), {"top_k": "ten"}, "top_k must be an integer, got 'ten'"),
        BadRequest("top_k_fraction", (u,), {"top_k": "2.5"}, "top_k must be an integer, got '2.5'"),
        BadRequest("top_k_bool", (u,), {"top_k": True}, "top_k must be an integer, got True"),
        BadRequest("unknown_parameter", (u,), {"topk": 5}, r"unknown request parameters \['topk'\]"),
        BadRequest("exclude_seen_not_bool", (u,), {"exclude_seen": "maybe"}, "exclude_seen must be a boolean"),
        BadRequest("exclude_fp32", (u, (contract.INPUT_EXCLUDE, np.array([[1.0]], np.float32), "FP32")), error=dtype),
        BadRequest("exclude_rows_mismatch", (_users(known_user, known_user), (contract.INPUT_EXCLUDE, np.array([[1, 2]], np.int64), "INT64")),
                   error=r"(?i)(exclude_item_ids.*shape \[2, n\]|batch)"),
        BadRequest("exclude_rank3", (u, (contract.INPUT_EXCLUDE, np.ones((1, 2, 2), np.int64), "INT64")), error=shape),
        BadRequest("exclude_too_wide", (u, (contract.INPUT_EXCLUDE, np.ones((1, max_exclude + 1), np.int64), "INT64")),
                   error=rf"has {max_exclude + 1} ids per user, over the maximum of {max_exclude}"),
        BadRequest("feature_text", (u, (feature, np.array([[b"young"]], np.object_), "BYTES")), error=dtype),
        BadRequest("feature_fp32", (u, (feature, np.array([[2.5]], np.float32), "FP32")), error=dtype),
        BadRequest("feature_out_of_range", (u, (feature, np.array([[-7]], np.int64), "INT64")), error=r"holds -7; raw feature ids are >= 0"),
        BadRequest("feature_rows_mismatch", (_users(known_user, known_user), (feature, np.array([[1]], np.int64), "INT64")),
                   error=rf"(?i)({feature}.*shape \[2, 1\]|batch)"),
        BadRequest("unknown_input", (u, ("favourite_colour", np.array([[1]], np.int64), "INT64")), error=r"(?i)unexpected inference input"),
        BadRequest("huge_payload", (u, (contract.INPUT_EXCLUDE, np.ones((1, 2_000_000), np.int64), "INT64")),
                   error=r"(?i)(over the maximum|too large|exceed|size)"),
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
