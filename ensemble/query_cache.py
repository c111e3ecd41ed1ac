"""Each stored user's query, computed once at load: an exact memo of the steps before the search.

With the embedded feature store a known user's stored features cannot change while a model
version is loaded (the table is one of the version's checksummed files), and every step before
the search computes a row from that row alone: the lookup and the transform are row-wise, and the
compiled tower gives a row the same bits in every batch (`ensemble.ops.tower.rowwise_matmul`). So
what those steps hand on to the search for such a user (its query vector, its unknown-user flag)
is the same in every batch; `QueryCache` computes it for every stored user at load, in blocks, and
a request gathers it instead of running the lookup, the transform and the tower. A request that
sends features, or a user the store lacks, still runs those steps; a batch that mixes both runs
them on its other rows only.

It stays off, and the load log says why, where that reasoning does not hold: steps before the
search other than those three, a Redis store (written while the model serves), a model with a
history input (its metrics count each request's stored history ids), a transform that runs on
NVTabular (operators beyond Categorify, whose rows may depend on the batch), the TensorFlow tower
(its rows depend on the batch), or a table whose cache would pass `serve.query_cache_mb`. If the
lookup's store is replaced after load, the executor drops the cache (`QueryCache.current`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from common import contract
from ensemble.feature_store import ParquetFeatureStore
from ensemble.graph import GraphRunner, Source
from ensemble.ops.lookup import LookupUserFeatures
from ensemble.ops.search import SearchItems
from ensemble.ops.tower import QueryTower
from ensemble.ops.transform import TransformUserFeatures

BLOCK = 1024  # users per block while building


@dataclass
class QueryCache:
    """The columns the steps before `cut` carry past it, one row per stored user.

    Attributes:
        cut: the graph step the cached columns feed (the search).
        lookup: the graph's LookupUserFeatures.
        store: the store it was built from (the lookup's at build time).
        columns: (step, column) -> [users, ...] array, row i for store.user_ids[i].
        build_s: seconds the build took.
    """

    cut: int
    lookup: LookupUserFeatures
    store: ParquetFeatureStore
    columns: dict[Source, np.ndarray]
    build_s: float = 0.0

    @classmethod
    def build(cls, runner: GraphRunner, inputs_for: Callable[[np.ndarray], Mapping[str, np.ndarray]],
              block: int = BLOCK) -> "QueryCache":
        """Runs the steps before the search on every stored user, `block` users at a time (call
        `why_not` first).

        Args:
            runner: the model's graph runner.
            inputs_for: raw ids -> the graph's inputs for one request of those users that sends
                nothing but their ids.
        """
        started = time.perf_counter()
        cut = runner.step_of(SearchItems.__name__)
        lookup = runner.ops_before(cut)[0]
        store = lookup.store
        user_ids = store.user_ids
        columns: dict[Source, np.ndarray] = {}
        for start in range(0, len(user_ids), block):
            part = runner.run_prefix(inputs_for(user_ids[start : start + block]), cut)
            for source, value in part.items():
                if source not in columns:
                    columns[source] = np.empty((len(user_ids), *value.shape[1:]), value.dtype)
                columns[source][start : start + len(value)] = value
        for value in columns.values():
            value.flags.writeable = False
        return cls(cut, lookup, store, columns, time.perf_counter() - started)

    @property
    def user_ids(self) -> np.ndarray:
        """The cached users' raw ids, sorted (the store's own array)."""
        return self.store.user_ids

    @property
    def nbytes(self) -> int:
        """What the cache adds to the model (the ids are the store's)."""
        return sum(v.nbytes for v in self.columns.values())

    def current(self) -> bool:
        """Whether the lookup still reads the store the cache was built from."""
        return self.lookup.store is self.store

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Raw user ids -> their cache rows (-1 for a user the cache lacks)."""
        pos, found = self.store.positions(user_ids)
        return np.where(found, pos, -1)

    def gather(self, rows: np.ndarray) -> dict[Source, np.ndarray]:
        """The cached columns of `rows` (fresh arrays; a row of -1 gets another user's values, to be replaced)."""
        return {source: value[rows] for source, value in self.columns.items()}

    def describe(self) -> str:
        return f"on, {len(self.user_ids):,} users, {self.nbytes / 2**20:.1f} MB, built in {self.build_s:.2f} s"


def bytes_per_user(runner: GraphRunner, inputs: Mapping[str, np.ndarray]) -> int:
    """What one user's row of a QueryCache takes, from one run of the steps before the search on `inputs`."""
    part = runner.run_prefix(inputs, runner.step_of(SearchItems.__name__))
    rows = len(next(iter(inputs.values())))
    return -(-sum(v.nbytes for v in part.values()) // max(rows, 1))


def why_not(runner: GraphRunner, max_mb: float | None) -> str | None:
    """Why a QueryCache would not be exact (or is not wanted) for this graph; None when it may be built."""
    if max_mb is None:
        return "the model's config has no query_cache_mb (exported before the query cache; `make ensemble` again)"
    if max_mb <= 0:
        return "serve.query_cache_mb is 0"
    cut = runner.step_of(SearchItems.__name__)
    before = runner.ops_before(cut) if cut is not None else []
    expected = (LookupUserFeatures, TransformUserFeatures, QueryTower)
    if len(before) != len(expected) or not all(isinstance(op, kind) for op, kind in zip(before, expected)):
        return f"the steps before the search are not lookup -> transform -> tower: {[type(op).__name__ for op in before]}"
    lookup, transform, tower = before
    if not isinstance(lookup.store, ParquetFeatureStore):
        return "the feature store is shared (Redis): its rows can change while the model serves"
    if lookup.history_length:
        return "the model takes a history input (its metrics count every request's stored history ids)"
    if not transform.compiled:
        return "the workflow transform runs on NVTabular (operators beyond Categorify), whose rows may depend on the batch"
    if tower.runtime != "numpy":
        return "the TensorFlow tower computes a row differently in different batches"
    per_request = runner.inputs_read(cut) - {contract.INPUT_USER_ID, *lookup.feature_names}
    if per_request:
        return f"the steps before the search read request inputs other than the user's id and features: {sorted(per_request)}"
    return None
