"""A shared online feature store for several server replicas: Redis, written by `materialize`.

Why Redis directly and not Feast: merlin-systems' `QueryFeast` targets Feast 0.31 with its Redis
online store, but Feast 0.31.1 resolves only with pyarrow 11 (the pinned stack needs 12.0.1 for
numpy 1.23), and newer Feast wants protobuf < 4.23.4 or dask >= 2024. The store here keeps
Feast's layout in spirit (one entry per entity, written in bulk from the offline table) with
one MGET per batch on the request path.

Layout: `<namespace>:u:<user_id>` -> the user's raw feature values as little-endian int64, in
the order of `<namespace>:meta`'s "features". The namespace is the artifacts' id, so a new
export is materialized beside the one being served and a version switch never mixes them.

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

from common.errors import ArtifactError, FeatureStoreError

LOG = logging.getLogger(__name__)

CHUNK = 5000


def _client(url: str, timeout_s: float = 5.0):
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def materialize(url: str, namespace: str, table_path: Path, id_column: str, feature_names: tuple[str, ...]) -> int:
    """Writes every user's features to Redis; the meta key goes last, so a reader sees all or nothing."""
    table = pd.read_parquet(table_path, columns=[id_column, *feature_names])
    client = _client(url)
    ids = table[id_column].to_numpy(np.int64)
    values = table[list(feature_names)].to_numpy(np.int64)
    for start in range(0, len(ids), CHUNK):
        pipe = client.pipeline(transaction=False)
        for uid, row in zip(ids[start : start + CHUNK], values[start : start + CHUNK]):
            pipe.set(f"{namespace}:u:{int(uid)}", row.astype("<i8").tobytes())
        pipe.execute()
    client.set(f"{namespace}:meta", json.dumps({"features": list(feature_names), "users": int(len(ids))}))
    LOG.info("materialized %d users x %d features into %s under %s", len(ids), len(feature_names), url, namespace)
    return len(ids)


class RedisFeatureStore:
    """FeatureStore over Redis (see the module docstring for the layout).

    Args:
        url: redis://host:port/db.
        namespace: this export's key prefix.
        feature_names: the features the model needs, in order.
        timeout_s: bound of every connect and every answer.

    Raises:
        ArtifactError: at load, the namespace holds other features than the model needs.
    """

    def __init__(self, url: str, namespace: str, feature_names: tuple[str, ...], timeout_s: float = 0.5):
        from ensemble.ops import MISSING

        self.url, self.namespace, self.timeout_s = url, namespace, timeout_s
        self.feature_names = tuple(feature_names)
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
        stored = tuple(json.loads(meta)["features"])
        if stored != self.feature_names:
            raise ArtifactError(f"{self.url} {self.namespace} holds features {list(stored)}, the model needs {list(self.feature_names)}")

    def get(self, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        keys = [self._meta_key, *(f"{self.namespace}:u:{int(u)}" for u in ids)]
        meta, *raw = self._call(lambda: self._client.mget(keys))
        self._check_meta(meta)
        found = np.array([r is not None for r in raw], dtype=bool)
        matrix = np.frombuffer(b"".join(r if r is not None else self._missing for r in raw), dtype="<i8")
        matrix = matrix.reshape(len(ids), len(self.feature_names))
        return {name: matrix[:, i].astype(np.int64) for i, name in enumerate(self.feature_names)}, found
