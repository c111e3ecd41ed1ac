"""One request's boundary: its limits, its validation, and merging a dynamic batch and splitting it back.

Everything here works on plain numpy arrays and raises RequestError with a message that says
what was expected and what arrived; the Triton model answers each one with its own error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from common import contract
from common.config import MAX_HISTORY
from common.errors import RequestError
from ensemble.ops.search import EXCLUDE_SEEN, TOP_K

@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request may ask for; set from the model config's parameters.

    Attributes:
        max_batch_size: most users per request.
        default_top_k: top_k when a request does not give one.
        max_top_k: the largest top_k accepted (also capped by the catalogue size).
        max_exclude: the most excluded item ids per user.
        exclude_seen: default of the `exclude_seen` request parameter.
        user_features: names of the optional raw user-feature inputs.
        history_length: N, the model's history length (0: the model takes no history input).
        max_history: the most history ids per user a request may send.
    """

    max_batch_size: int = 256
    default_top_k: int = 10
    max_top_k: int = 1000
    max_exclude: int = 1000
    exclude_seen: bool = False
    user_features: tuple[str, ...] = ()
    history_length: int = 0
    max_history: int = MAX_HISTORY

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], max_batch_size: int) -> "Limits":
        def get(name, cast, default):
            return cast(params[name]) if name in params else default

        return cls(
            max_batch_size=max_batch_size,
            default_top_k=get("default_top_k", int, cls.default_top_k),
            max_top_k=get("max_top_k", int, cls.max_top_k),
            max_exclude=get("max_exclude", int, cls.max_exclude),
            exclude_seen=get("exclude_seen", lambda v: v.lower() == "true", cls.exclude_seen),
            user_features=get("user_features", lambda v: tuple(n for n in v.split(",") if n), ()),
            history_length=get("history_length", int, cls.history_length),
        )


@dataclass(frozen=True)
class ParsedRequest:
    """One valid request, as the graph needs it.

    Attributes:
        user_ids: [b] int64.
        top_k: items per user.
        exclude: [b, n] int64 raw item ids, padded with -1 (n may be 0).
        exclude_seen: leave out the users' training positives.
        features: raw user-feature values sent with the request, name -> [b] int64
            (FEATURE_NOT_GIVEN where a row has none).
        history: [b, n] int64 raw item ids of the users' latest interactions, oldest first,
            padded with HISTORY_PAD, or None when not sent.
    """

    user_ids: np.ndarray
    top_k: int
    exclude: np.ndarray
    exclude_seen: bool
    features: dict[str, np.ndarray] = field(default_factory=dict)
    history: np.ndarray | None = None

    @property
    def batch(self) -> int:
        return len(self.user_ids)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise RequestError(f"parameter {name} must be an integer, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        if float(number) != int(number):
            raise ValueError
        return int(number)
    except (ValueError, OverflowError) as e:
        raise RequestError(f"parameter {name} must be an integer, got {value!r}") from e


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(f"parameter {name} must be a boolean, got {value!r}")


def parse_request(tensors: Mapping[str, np.ndarray | None], params: Mapping[str, Any], limits: Limits, n_items: int) -> ParsedRequest:
    """Checks one request and returns it in graph form.

    Args:
        tensors: input name -> array (None or absent when not sent).
        params: the request's parameters.
        limits: what requests may ask for.
        n_items: catalogue size (top_k cannot exceed it).

    Raises:
        RequestError: saying what was expected and what arrived.
    """
    unknown = set(params) - {contract.PARAM_TOP_K, contract.PARAM_EXCLUDE_SEEN} if params else ()
    if unknown:
        raise RequestError(f"unknown request parameters {sorted(unknown)}; expected {contract.PARAM_TOP_K!r}, 'exclude_seen'")
    users = tensors.get(contract.INPUT_USER_ID)
    if users is None:
        raise RequestError(f"missing input {contract.INPUT_USER_ID!r} ({contract.DTYPES[contract.INPUT_USER_ID]} [batch, 1])")
    if users.dtype != np.int64:
        raise RequestError(f"input {contract.INPUT_USER_ID!r} must be INT64, got {users.dtype}")
    if users.ndim != 2 or users.shape[1] != 1:
        raise RequestError(f"input {contract.INPUT_USER_ID!r} must have shape [batch, 1], got {list(users.shape)}")
    batch = users.shape[0]
    if batch < 1:
        raise RequestError(f"input {contract.INPUT_USER_ID!r} holds no users; send 1 to {limits.max_batch_size}")
    if batch > limits.max_batch_size:
        raise RequestError(f"batch of {batch} users is over the maximum of {limits.max_batch_size}")

    top_k = _as_int(params[contract.PARAM_TOP_K], contract.PARAM_TOP_K) if contract.PARAM_TOP_K in params else limits.default_top_k
    cap = min(limits.max_top_k, n_items)
    if not 1 <= top_k <= cap:
        raise RequestError(f"parameter {contract.PARAM_TOP_K} must be in 1..{cap}, got {top_k}")
    exclude_seen = (_as_bool(params[contract.PARAM_EXCLUDE_SEEN], contract.PARAM_EXCLUDE_SEEN)
                    if contract.PARAM_EXCLUDE_SEEN in params else limits.exclude_seen)

    exclude = tensors.get(contract.INPUT_EXCLUDE)
    if exclude is None:
        exclude = np.zeros((batch, 0), dtype=np.int64)
    else:
        _check_id_rows(exclude, contract.INPUT_EXCLUDE, batch, limits.max_exclude, "",
                       f"one row per user, padded with {contract.EXCLUDE_PAD}")
    features = {}
    # Most requests send the user id alone: the feature inputs are looked at only when others came.
    for name in limits.user_features if len(tensors) > 1 else ():
        values = tensors.get(name)
        if values is None:
            continue
        if values.dtype != np.int64:
            raise RequestError(f"input {name!r} must be INT64 raw feature ids, got {values.dtype}")
        if values.shape != (batch, 1):
            raise RequestError(f"input {name!r} must have shape [{batch}, 1], got {list(values.shape)}")
        if (values < contract.FEATURE_NOT_GIVEN).any():
            bad = int(values[values < contract.FEATURE_NOT_GIVEN][0])
            raise RequestError(
                f"input {name!r} holds {bad}; raw feature ids are >= 0, or {contract.FEATURE_NOT_GIVEN} for 'not given'"
            )
        features[name] = values.reshape(-1)
    history = _parse_history(tensors.get(contract.INPUT_HISTORY), batch, limits)
    return ParsedRequest(users.reshape(-1).astype(np.int64, copy=False), top_k, exclude, exclude_seen, features, history)


def _parse_history(history: np.ndarray | None, batch: int, limits: Limits) -> np.ndarray | None:
    """The request's history_item_ids, checked like exclude_item_ids (None when not sent)."""
    name = contract.INPUT_HISTORY
    if history is None:
        return None
    if not limits.history_length:
        raise RequestError(f"input {name!r} is not accepted: this model was trained without a history input (train.history_length 0)")
    _check_id_rows(history, name, batch, limits.max_history, " raw item ids",
                   f"one row per user, oldest first, padded with {contract.HISTORY_PAD}")
    return history


def _check_id_rows(values: np.ndarray, name: str, batch: int, maximum: int, dtype_hint: str, layout: str) -> None:
    """An INT64 [batch, n] input of raw item ids (exclusions, history) with n <= maximum."""
    if values.dtype != np.int64:
        raise RequestError(f"input {name!r} must be INT64{dtype_hint}, got {values.dtype}")
    if values.ndim != 2 or values.shape[0] != batch:
        raise RequestError(f"input {name!r} must have shape [{batch}, n] ({layout}), got {list(values.shape)}")
    if values.shape[1] > maximum:
        raise RequestError(f"input {name!r} has {values.shape[1]} ids per user, over the maximum of {maximum}")


def _padded(rows: list[np.ndarray | None], batches: list[int], total: int, pad: int) -> np.ndarray:
    """Per-request [b, n] matrices (None: [b, 0]) stacked into one, padded to the widest."""
    width = max((r.shape[1] for r in rows if r is not None), default=0)
    if not width:  # nobody sent any: the usual request
        return np.zeros((total, 0), dtype=np.int64)
    out = np.full((total, width), pad, dtype=np.int64)
    row = 0
    for r, b in zip(rows, batches):
        if r is not None:
            out[row : row + b, : r.shape[1]] = r
        row += b
    return out


def merge(requests: list[ParsedRequest], feature_names: tuple[str, ...] = (), history: bool = False) -> dict[str, np.ndarray]:
    """Concatenates requests into one batch of graph inputs (exclusions and, for a model with a
    history input, histories padded to one width)."""
    batches = [r.batch for r in requests]
    total = sum(batches)
    exclude = _padded([r.exclude for r in requests], batches, total, contract.EXCLUDE_PAD)
    # The usual case is that nobody sent a feature: every such feature gets the same read-only
    # array of "not given" (11 features, one allocation; a write into it would raise).
    not_given = np.full(total, contract.FEATURE_NOT_GIVEN, np.int64)
    not_given.flags.writeable = False
    sent = set().union(*[r.features for r in requests])
    features = {
        name: np.concatenate([r.features.get(name, np.full(r.batch, contract.FEATURE_NOT_GIVEN, np.int64)) for r in requests])
        if name in sent else not_given
        for name in feature_names
    }
    if history:
        features[contract.INPUT_HISTORY] = _padded([r.history for r in requests], batches, total, contract.HISTORY_PAD)
    if len(requests) == 1:
        only = requests[0]
        return {
            **features,
            contract.INPUT_USER_ID: only.user_ids.copy(),  # a fresh array, as concatenate gives
            TOP_K: np.full(total, only.top_k, dtype=np.int32),
            contract.INPUT_EXCLUDE: exclude,
            EXCLUDE_SEEN: np.full(total, only.exclude_seen, dtype=bool),
        }
    return {
        **features,
        contract.INPUT_USER_ID: np.concatenate([r.user_ids for r in requests]),
        TOP_K: np.repeat(np.array([r.top_k for r in requests], dtype=np.int32), batches),
        contract.INPUT_EXCLUDE: exclude,
        EXCLUDE_SEEN: np.repeat(np.array([r.exclude_seen for r in requests], dtype=bool), batches),
    }


def split(outputs: Mapping[str, np.ndarray], requests: list[ParsedRequest]) -> list[dict[str, np.ndarray]]:
    """Cuts a merged result back into one response per request, each with its own top_k."""
    responses, row = [], 0
    for r in requests:
        rows = slice(row, row + r.batch)
        responses.append({
            contract.OUTPUT_ITEM_IDS: np.ascontiguousarray(outputs[contract.OUTPUT_ITEM_IDS][rows, : r.top_k]),
            contract.OUTPUT_SCORES: np.ascontiguousarray(outputs[contract.OUTPUT_SCORES][rows, : r.top_k]),
            contract.OUTPUT_UNKNOWN: outputs[contract.OUTPUT_UNKNOWN][rows].reshape(-1, 1).astype(bool),
        })
        row += r.batch
    return responses


def parse_parameters(raw: str | None) -> dict[str, Any]:
    """A Triton request's parameters JSON -> dict (empty when absent)."""
    if not raw or raw == "{}":  # what the backend hands over for a request without parameters
        return {}
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"request parameters are not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise RequestError(f"request parameters must be a JSON object, got {type(params).__name__}")
    return params

