"""A shared online feature store for several server replicas: Redis, written by `materialize`.

Why Redis directly and not Feast: merlin-systems' `QueryFeast` targets Feast 0.31 with its Redis
online store, but Feast 0.31.1 resolves only with pyarrow 11 (the pinned stack needs 12.0.1 for
numpy 1.23), and newer Feast wants protobuf < 4.23.4 or dask >= 2024. The store here keeps
Feast's layout in spirit (one entry per entity, written in bulk from the offline table) with
one MGET per batch on the request path.

Layout: `<namespace>:u:<user_id>` -> the user's raw feature values as little-endian int64, in
the order of `<namespace>:meta`'s "features". The namespace is the artifacts' id, so a new
export is materialized beside the one being served and a version switch never mixes them.
A model with a history input (meta's "history_length" N > 0) also has `<namespace>:h:<user_id>`
-> the user's latest N raw item ids, oldest first, as little-endian int64 (0 to N of them),
fetched in the same MGET. `append_click` adds clicks to it without retraining: one Lua script
appends and trims to the latest N atomically, so concurrent clicks never lose one another.

Faults: every call is bounded by a short timeout; an unreachable, frozen or flushed store makes
the batch fail with FeatureStoreError (the model answers UNAVAILABLE) and never silently serves
known users as unknown: the meta key travels in the same MGET as the users' keys, so a store
that lost this export is noticed on the request that would have been wrong.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common import contract
from common.errors import ArtifactError, FeatureStoreError
from ensemble.history import rows_from_ragged

LOG = logging.getLogger(__name__)

CHUNK = 5000


def store_namespace(manifest: dict) -> str:
    """The key prefix of an export in a shared feature store."""
    return f"{contract.MODEL_NAME}:{manifest['artifacts_id']}"


def _client(url: str, timeout_s: float = 5.0):
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


# KEYS[1]: the namespace's meta key, KEYS[2]: the user's history key; ARGV[1]: the new ids as
# little-endian int64 bytes, ARGV[2]: the most bytes to keep (8 x N). Returns the ids now stored,
# -1 when the namespace was never materialized (or was flushed), -2 - bytes when the stored value is
# not whole int64 ids (nothing appended). Atomic: Redis runs a script alone.
APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local old = redis.call('GET', KEYS[2]) or ''
if #old % 8 ~= 0 then return -2 - #old end
local v = old .. ARGV[1]
local most = tonumber(ARGV[2])
if #v > most then v = string.sub(v, #v - most + 1) end
redis.call('SET', KEYS[2], v)
return #v / 8
"""


def materialize(url: str, namespace: str, table_path: Path, id_column: str, feature_names: tuple[str, ...],
                history_length: int = 0) -> int:
    """Writes every user's features (and, with history_length N > 0, their latest N items) to Redis;
    the meta key goes last, so a reader sees all or nothing."""
    from ensemble.feature_store import ParquetFeatureStore

    table = pd.read_parquet(table_path, columns=[id_column, *feature_names])
    client = _client(url)
    ids = table[id_column].to_numpy(np.int64)
    values = table[list(feature_names)].to_numpy(np.int64)
    # The embedded store's reader: the same checks, the same rows (the latest N, padded).
    store = ParquetFeatureStore(table_path, id_column, tuple(feature_names), history_length) if history_length else None
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        histories = store.get(chunk)[0][contract.INPUT_HISTORY] if store is not None else None
        pipe = client.pipeline(transaction=False)
        for i, uid in enumerate(chunk):
            pipe.set(f"{namespace}:u:{int(uid)}", values[start + i].astype("<i8").tobytes())
            if histories is not None:
                row = histories[i]
                pipe.set(f"{namespace}:h:{int(uid)}", row[row != contract.HISTORY_PAD].astype("<i8").tobytes())
        pipe.execute()
    meta = {"features": list(feature_names), "users": int(len(ids)), "history_length": int(history_length)}
    client.set(f"{namespace}:meta", json.dumps(meta))
    LOG.info("materialized %d users x %d features%s into %s under %s", len(ids), len(feature_names),
             f" and their latest {history_length} items" if history_length else "", url, namespace)
    return len(ids)


def append_click(url: str, namespace: str, user_id: int, item_ids, timeout_s: float = 5.0) -> np.ndarray:
    """Appends raw item ids (oldest first) to a user's stored history, keeping the latest N.

    Works for any user id, known in training or not: a new user's clicks are served as their
    history while they stay `unknown_user` (no stored features).

    Returns:
        the user's stored history afterwards, [<= N] int64, oldest first.

    Raises:
        FeatureStoreError: the store cannot be reached, or holds no export under `namespace`.
        ArtifactError: the export under `namespace` has no history input (history_length 0), or an
            id is HISTORY_PAD.
    """
    import redis

    for what, value in (("user id", user_id), *(("item id", i) for i in np.asarray(item_ids, object).reshape(-1))):
        if not -(2**63) <= int(value) < 2**63:
            raise ArtifactError(f"{what} {int(value)} is outside INT64; nothing was appended")
    items = np.asarray(item_ids, np.int64).reshape(-1)
    if (items == contract.HISTORY_PAD).any():
        raise ArtifactError(f"item id {contract.HISTORY_PAD} is the history's padding, not an item; nothing was appended")
    client = _client(url, timeout_s)
    meta_key, key = f"{namespace}:meta", f"{namespace}:h:{int(user_id)}"
    try:
        meta = client.get(meta_key)
        if meta is None:
            raise FeatureStoreError(f"{url} holds no features under {namespace} (flushed, or never materialized: "
                                    "run `python -m ensemble materialize`)")
        width = int(json.loads(meta).get("history_length", 0))
        if not width:
            raise ArtifactError(f"the export under {namespace} in {url} has no history input (train.history_length 0); "
                                "there is no history to append to")
        stored = client.eval(APPEND_SCRIPT, 2, meta_key, key, items.astype("<i8").tobytes(), 8 * width)
        if int(stored) < -1:
            raise FeatureStoreError(f"{url} {key} holds {-2 - int(stored)} bytes, not whole int64 item ids; nothing was "
                                    "appended (run `python -m ensemble materialize` again)")
        if int(stored) < 0:
            raise FeatureStoreError(f"{url} lost the export under {namespace} while appending (flushed?)")
        return np.frombuffer(client.get(key) or b"", dtype="<i8").astype(np.int64)
    except redis.RedisError as e:
        raise FeatureStoreError(f"cannot append to {url}: {e}") from None


class RedisFeatureStore:
    """FeatureStore over Redis (see the module docstring for the layout).

    Args:
        url: redis://host:port/db.
        namespace: this export's key prefix.
        feature_names: the features the model needs, in order.
        timeout_s: bound of every connect and every answer.
        history_length: N, the model's history length (0: no history keys are read).

    Raises:
        ArtifactError: at load, the namespace holds other features (or another history length)
            than the model needs.
    """

    def __init__(self, url: str, namespace: str, feature_names: tuple[str, ...], timeout_s: float = 0.5,
                 history_length: int = 0):
        from ensemble.ops import MISSING

        self.url, self.namespace, self.timeout_s = url, namespace, timeout_s
        self.feature_names = tuple(feature_names)
        self.history_length = int(history_length)
        self._meta_key = f"{namespace}:meta"
        self._client = _client(url, timeout_s)
        self._missing = np.full(len(self.feature_names), MISSING, dtype=np.int64).tobytes()
        try:
            meta = self._call(lambda: self._client.get(self._meta_key))
            self._check_meta(meta)
        except FeatureStoreError as e:
            # Loading still succeeds: requests fail with UNAVAILABLE (and readiness is false)
            # until the store answers, instead of a server that cannot start without Redis.
            LOG.warning("feature store not usable at load: %s", e)

    def _call(self, fn):
        import redis

        try:
            return fn()
        except redis.TimeoutError as e:
            raise FeatureStoreError(f"{self.url} did not answer within {self.timeout_s:g} s ({e})") from None
        except redis.RedisError as e:
            raise FeatureStoreError(f"cannot reach {self.url}: {e}") from None

    def _check_meta(self, meta) -> None:
        if meta is None:
            raise FeatureStoreError(
                f"{self.url} holds no features under {self.namespace} (flushed, or never materialized: "
                "run `python -m ensemble materialize`)"
            )
        meta = json.loads(meta)
        stored = tuple(meta["features"])
        if stored != self.feature_names:
            raise ArtifactError(f"{self.url} {self.namespace} holds features {list(stored)}, the model needs {list(self.feature_names)}")
        history = int(meta.get("history_length", 0))
        if history != self.history_length:
            raise ArtifactError(f"{self.url} {self.namespace} holds histories of {history} items, the model takes {self.history_length}")

    def get(self, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        keys = [self._meta_key, *(f"{self.namespace}:u:{int(u)}" for u in ids)]
        if self.history_length:
            keys += [f"{self.namespace}:h:{int(u)}" for u in ids]
        meta, *raw = self._call(lambda: self._client.mget(keys))
        self._check_meta(meta)
        users, histories = raw[: len(ids)], raw[len(ids):]
        # A value of another length would shift every later user's bytes in the joined buffers below.
        width = 8 * len(self.feature_names)
        for i, r in enumerate(users):
            if r is not None and len(r) != width:
                raise FeatureStoreError(f"{self.url} {self.namespace}:u:{int(ids[i])} holds {len(r)} bytes, expected {width} "
                                        f"({len(self.feature_names)} int64 features); run `python -m ensemble materialize` again")
        for i, h in enumerate(histories):
            if h is not None and len(h) % 8:
                raise FeatureStoreError(f"{self.url} {self.namespace}:h:{int(ids[i])} holds {len(h)} bytes, not whole int64 "
                                        "item ids; run `python -m ensemble materialize` again")
        found = np.array([r is not None for r in users], dtype=bool)
        matrix = np.frombuffer(b"".join(r if r is not None else self._missing for r in users), dtype="<i8")
        matrix = matrix.reshape(len(ids), len(self.feature_names))
        out = {name: matrix[:, i].astype(np.int64) for i, name in enumerate(self.feature_names)}
        if self.history_length:
            histories = [h or b"" for h in histories]
            lengths = np.array([len(h) // 8 for h in histories], dtype=np.int64)
            values = np.frombuffer(b"".join(histories), dtype="<i8")
            out[contract.INPUT_HISTORY] = rows_from_ragged(values, np.cumsum(lengths) - lengths, lengths, self.history_length)
        return out, found
