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

It stays off, and the load log says why, where that reasoning does not hold: a Redis store
(written while the model serves), a model with a history input (its metrics count each request's
stored history ids), the TensorFlow tower (its rows depend on the batch), or a table whose cache
would pass `serve.query_cache_mb`.
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

BLOCK = 1024  # users per block while building


@dataclass
class QueryCache:
    """The columns the steps before `cut` carry past it, one row per stored user.

    Attributes:
        cut: the graph step the cached columns feed (the search).
        user_ids: the stored users' raw ids, sorted.
        columns: (step, column) -> [users, ...] array, row i for user_ids[i].
        build_s: seconds the build took.
    """

    cut: int
    user_ids: np.ndarray
    columns: dict[Source, np.ndarray]
    build_s: float = 0.0

    @classmethod
    def build(cls, runner: GraphRunner, cut: int, user_ids: np.ndarray,
              inputs_for: Callable[[np.ndarray], Mapping[str, np.ndarray]], block: int = BLOCK) -> "QueryCache":
        """Runs the steps before `cut` on every user, `block` users at a time.

        Args:
            runner: the model's graph runner.
            cut: the step to cache up to.
            user_ids: the stored users' raw ids, sorted, unique.
            inputs_for: raw ids -> the graph's inputs for one request of those users that sends
                nothing but their ids.
        """
        started = time.perf_counter()
        columns: dict[Source, np.ndarray] = {}
        for start in range(0, len(user_ids), block):
            part = runner.run_prefix(inputs_for(user_ids[start : start + block]), cut)
            for source, value in part.items():
                if source not in columns:
                    columns[source] = np.empty((len(user_ids), *value.shape[1:]), value.dtype)
                columns[source][start : start + len(value)] = value
        runner.last_run_s = {}
        for value in columns.values():
            value.flags.writeable = False
        return cls(cut, np.asarray(user_ids, dtype=np.int64), columns, time.perf_counter() - started)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.columns.values()) + self.user_ids.nbytes

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Raw user ids -> their cache rows (-1 for a user the cache lacks)."""
        if not len(self.user_ids):
            return np.full(len(user_ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.user_ids, user_ids), len(self.user_ids) - 1)
        return np.where(self.user_ids[pos] == user_ids, pos, -1)

    def gather(self, rows: np.ndarray) -> dict[Source, np.ndarray]:
        """The cached columns of `rows` (fresh arrays; a row of -1 gets another user's values, to be replaced)."""
        return {source: value[rows] for source, value in self.columns.items()}

    def describe(self) -> str:
        return f"on, {len(self.user_ids):,} users, {self.nbytes / 2**20:.1f} MB, built in {self.build_s:.2f} s"


def bytes_per_user(runner: GraphRunner, cut: int, inputs: Mapping[str, np.ndarray]) -> int:
    """What one user's row of a QueryCache takes, from one run of the steps before `cut` on `inputs`."""
    part = runner.run_prefix(inputs, cut)
    runner.last_run_s = {}
    rows = len(next(iter(inputs.values())))
    return 8 + sum(v.nbytes for v in part.values()) // max(rows, 1)


def why_not(runner: GraphRunner, max_mb: float) -> str | None:
    """Why a QueryCache would not be exact (or is not wanted) for this graph; None when it may be built."""
    ops = {type(node.op): node.op for node in runner.nodes if node.op is not None}
    lookup, tower, cut = ops.get(LookupUserFeatures), ops.get(QueryTower), runner.step_of(SearchItems.__name__)
    if max_mb <= 0:
        return "serve.query_cache_mb is 0"
    if lookup is None or tower is None or cut is None:
        return "the graph is not lookup -> transform -> tower -> search"
    if not isinstance(lookup.store, ParquetFeatureStore):
        return "the feature store is shared (Redis): its rows can change while the model serves"
    if lookup.history_length:
        return "the model takes a history input (its metrics count every request's stored history ids)"
    if tower.runtime != "numpy":
        return "the TensorFlow tower computes a row differently in different batches"
    per_request = runner.inputs_read(cut) - {contract.INPUT_USER_ID, *lookup.feature_names}
    if per_request:
        return f"the steps before the search read request inputs other than the user's id and features: {sorted(per_request)}"
    return None
