"""A shared online feature store for several server replicas: Redis, written by `materialize`.

Why Redis directly and not Feast: merlin-systems' `QueryFeast` targets Feast 0.31 with its Redis
online store, but Feast 0.31.1 resolves only with pyarrow 11 (the pinned stack needs 12.0.1 for
numpy 1.23), and newer Feast wants protobuf < 4.23.4 or dask >= 2024. The store here keeps
Feast's layout in spirit (one entry per entity, written in bulk from the offline table) with
one MGET per batch on the request path.

Layout: `<namespace>:u:<user_id>` -> the user's raw feature values as little-endian int64, in
the order of `<namespace>:meta`'s "features". The namespace is the artifacts' id, so a new
export is materialized beside the one being served and a version switch never mixes them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import ArtifactError

LOG = logging.getLogger(__name__)

CHUNK = 5000


def _client(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


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

    Raises:
        ArtifactError: the namespace was never materialized, or with other features.
    """

    def __init__(self, url: str, namespace: str, feature_names: tuple[str, ...]):
        from ensemble.ops import MISSING

        self.url, self.namespace = url, namespace
        self.feature_names = tuple(feature_names)
        self._client = _client(url)
        try:
            meta = self._client.get(f"{namespace}:meta")
        except Exception as e:  # noqa: BLE001 - redis-py's connection errors
            raise ArtifactError(f"cannot reach the feature store at {url}: {e}") from e
        if meta is None:
            raise ArtifactError(f"{url} holds no features under {namespace}; run `python -m ensemble materialize` first")
        stored = tuple(json.loads(meta)["features"])
        if stored != self.feature_names:
            raise ArtifactError(f"{url} {namespace} holds features {list(stored)}, the model needs {list(self.feature_names)}")
        self._missing = np.full(len(self.feature_names), MISSING, dtype=np.int64).tobytes()

    def get(self, user_ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        raw = self._client.mget([f"{self.namespace}:u:{int(u)}" for u in ids]) if len(ids) else []
        found = np.array([r is not None for r in raw], dtype=bool)
        matrix = np.frombuffer(b"".join(r if r is not None else self._missing for r in raw), dtype="<i8")
        matrix = matrix.reshape(len(ids), len(self.feature_names))
        return {name: matrix[:, i].astype(np.int64) for i, name in enumerate(self.feature_names)}, found
