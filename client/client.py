"""Client library for the retrieval model over gRPC (default) or HTTP.

Errors from tritonclient, gRPC and the HTTP stack are translated into `ClientError` with a
one-line message at this boundary.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from common import contract
from common.errors import ClientError

LOG = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class Recommendations:
    """The answer for a batch of users, in request order.

    Attributes:
        user_ids: [batch] int64 raw user ids.
        item_ids: [batch, k] int64 raw item ids, best first (-1 pads when the catalogue runs out).
        scores: [batch, k] float32, non-increasing along k.
        unknown_user: [batch] bool, true for ids the model never saw in training.
        model_version: the model version that answered.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    scores: np.ndarray
    unknown_user: np.ndarray
    model_version: str = ""

    def as_dicts(self) -> list[dict]:
        return [
            {"user_id": int(u), "unknown_user": bool(unk), "item_ids": ids.tolist(), "scores": [float(s) for s in sc]}
            for u, unk, ids, sc in zip(self.user_ids, self.unknown_user, self.item_ids, self.scores)
        ]

    def check(self, top_k: int | None = None, catalogue: np.ndarray | None = None) -> None:
        """Raises ClientError unless the answer is well formed.

        Checks shapes and dtypes, distinct ids per user, non-increasing scores, the requested k
        and, given the catalogue's raw ids, that every returned id is in it.
        """
        b = len(self.user_ids)
        if self.item_ids.dtype != np.int64 or self.scores.dtype != np.float32:
            raise ClientError(f"wrong dtypes: item_ids {self.item_ids.dtype}, scores {self.scores.dtype}")
        if self.item_ids.shape != self.scores.shape or self.item_ids.shape[0] != b:
            raise ClientError(f"wrong shapes: item_ids {self.item_ids.shape}, scores {self.scores.shape} for {b} users")
        if top_k is not None and self.item_ids.shape[1] != top_k:
            raise ClientError(f"asked for {top_k} items per user, got {self.item_ids.shape[1]}")
        for u, ids, sc in zip(self.user_ids, self.item_ids, self.scores):
            real = ids[ids >= 0]
            if len(np.unique(real)) != len(real):
                raise ClientError(f"user {u}: repeated item ids {ids.tolist()}")
            if np.any(np.diff(sc) > 1e-6):
                raise ClientError(f"user {u}: scores are not best-first {sc.tolist()}")
            if catalogue is not None and not np.isin(real, catalogue).all():
                raise ClientError(f"user {u}: ids outside the catalogue {np.setdiff1d(real, catalogue).tolist()}")


def _exclusion_matrix(exclude: Sequence[Sequence[int]] | None, batch: int, what: str = "exclude",
                      pad: int = contract.EXCLUDE_PAD) -> np.ndarray | None:
    """Ragged per-user lists -> [batch, n] int64 padded with `pad`."""
    if exclude is None:
        return None
    if len(exclude) != batch:
        raise ClientError(f"{what} must have one list per user: {batch} users, {len(exclude)} lists")
    width = max((len(e) for e in exclude), default=0)
    out = np.full((batch, max(width, 1)), pad, dtype=np.int64)
    for i, items in enumerate(exclude):
        out[i, : len(items)] = np.asarray(items, dtype=np.int64)
    return out


def grpc_channel_args(tc) -> list[tuple]:
    """tritonclient's own channel options, plus reconnect backoff capped at 1 s: gRPC's default
    grows to 120 s, so a client that saw the server restart kept failing for seconds after the
    server was ready again."""
    keepalive = tc.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


class RetrievalClient:
    """Asks the retrieval model for each user's top-k items.

    Args:
        url: host:port of the server's gRPC (default 127.0.0.1:8001) or HTTP endpoint.
        protocol: "grpc" or "http".
        timeout_s: network timeout per call.
        model: model name (the contract's by default).
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 30.0, model: str = contract.MODEL_NAME):
        if protocol not in PROTOCOLS:
            raise ClientError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        port = contract.DEFAULT_GRPC_PORT if protocol == "grpc" else contract.DEFAULT_HTTP_PORT
        self.url = url or f"{contract.DEFAULT_HOST}:{port}"
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.model = model
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        try:
            if protocol == "grpc":
                self._client = tc.InferenceServerClient(self.url, channel_args=grpc_channel_args(tc))
            else:
                self._client = tc.InferenceServerClient(self.url, connection_timeout=timeout_s, network_timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - bad URL and friends
            raise ClientError(f"cannot create a {protocol} client for {self.url}: {e}") from e

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RetrievalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClientError:
            raise
        except Exception as e:  # noqa: BLE001 - tritonclient, grpc, gevent and socket errors alike
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "is restricted, expecting header" in message:
                raise ClientError(f"{what} refused by {self.url}: {message.split('] ', 1)[-1]} "
                                  f"(it needs the server's admin key, ${contract.ADMIN_KEY_ENV})") from e
            if "feature store unavailable" in message:
                raise ClientError(f"{what} failed ({self.protocol} {self.url}): the server's {message.split('] ', 1)[-1]}") from e
            if isinstance(e, (ConnectionError, OSError)) or "UNAVAILABLE" in message or "failed to connect" in message.lower():
                raise ClientError(f"cannot reach the server at {self.url} over {self.protocol}: {message}") from e
            raise ClientError(f"{what} failed ({self.protocol} {self.url}): {message}") from e

    def server_ready(self) -> bool:
        return bool(self._call("readiness check", self._client.is_server_ready))

    def model_ready(self) -> bool:
        return bool(self._call("model readiness check", self._client.is_model_ready, self.model))

    def repository_index(self, admin_key: str | None = None) -> list[dict]:
        """The server's model list with states (Triton's repository index, a restricted API: it
        needs the server's admin key, by default from $RETRIEVAL_ADMIN_KEY)."""
        key = admin_key or os.environ.get(contract.ADMIN_KEY_ENV)
        header = contract.GRPC_ADMIN_KEY_HEADER if self.protocol == "grpc" else contract.ADMIN_KEY_HEADER
        index = self._call("repository index", self._client.get_model_repository_index, headers={header: key} if key else None)
        if self.protocol == "grpc":
            return [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]
        return list(index)

    def recommend(
        self,
        user_ids: Sequence[int] | np.ndarray,
        top_k: int | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
        exclude_seen: bool | None = None,
        features: Mapping[str, Sequence[int | None]] | None = None,
        history: Sequence[Sequence[int]] | None = None,
    ) -> Recommendations:
        """Top-k raw item ids and scores per user.

        Args:
            user_ids: raw user ids, 1 to the server's max batch size.
            top_k: items per user (server default when None).
            exclude: one list of raw item ids per user to leave out.
            exclude_seen: leave out what each user clicked in training (server default when None).
            features: raw user-feature values, name -> one value per user (None: not given);
                they replace stored values, and are how a new user's features are sent.
            history: one list of raw item ids per user, oldest first: their latest interactions,
                appended to the stored history (models trained with a history input only).
        """
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1, 1)
        inputs = [self._input(contract.INPUT_USER_ID, users)]
        excl = _exclusion_matrix(exclude, len(users))
        if excl is not None:
            inputs.append(self._input(contract.INPUT_EXCLUDE, excl))
        hist = _exclusion_matrix(history, len(users), "history", contract.HISTORY_PAD)
        if hist is not None:
            inputs.append(self._input(contract.INPUT_HISTORY, hist))
        for name, values in (features or {}).items():
            if len(values) != len(users):
                raise ClientError(f"feature {name!r} needs one value per user: {len(users)} users, {len(values)} values")
            column = [contract.FEATURE_NOT_GIVEN if v is None else int(v) for v in values]
            inputs.append(self._input(name, np.asarray(column, dtype=np.int64).reshape(-1, 1), "INT64"))
        params = {}
        if top_k is not None:
            params[contract.PARAM_TOP_K] = int(top_k)
        if exclude_seen is not None:
            params[contract.PARAM_EXCLUDE_SEEN] = bool(exclude_seen)
        outputs = [self._tc.InferRequestedOutput(n) for n in (contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES, contract.OUTPUT_UNKNOWN)]
        kwargs = {"parameters": params or None, "outputs": outputs}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        result = self._call("inference", self._client.infer, self.model, inputs, **kwargs)
        response = result.get_response()
        version = response.model_version if self.protocol == "grpc" else response.get("model_version", "")
        return Recommendations(
            user_ids=users.reshape(-1),
            item_ids=result.as_numpy(contract.OUTPUT_ITEM_IDS),
            scores=result.as_numpy(contract.OUTPUT_SCORES),
            unknown_user=result.as_numpy(contract.OUTPUT_UNKNOWN).reshape(-1),
            model_version=str(version),
        )

    def _input(self, name: str, array: np.ndarray, dtype: str | None = None):
        tensor = self._tc.InferInput(name, list(array.shape), dtype or contract.DTYPES[name])
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        return tensor
