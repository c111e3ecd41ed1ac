"""The request path without Triton: validate requests, merge them, run the graph once, split.

The Triton model (`ensemble.triton_model`) is a thin shell around `RetrievalExecutor`; the
in-process pipeline and the tests call the same code, so server and in-process answers agree.
Loading it from a model repository is `ensemble.loader`'s job.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from common import contract
from common.errors import RequestError
from ensemble.graph import GraphRunner
from ensemble.ops.search import EXCLUDE_SEEN, SearchItems
from ensemble.query_cache import QueryCache, bytes_per_user, why_not
from ensemble.request import Limits, ParsedRequest, merge, parse_request, split

LOG = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What one execute() call did (the Triton model turns it into metrics).

    Attributes:
        ok: requests answered.
        invalid: requests refused with a RequestError.
        users: users answered.
        unknown_users: of those, ids not in training.
        excluded_items: item ids sent for exclusion (padding not counted).
        exclude_seen_users: users whose training clicks were left out.
        history_known: history item ids (every stored and sent one) the item vocabulary knows.
        history_unknown: those it does not (left out of the query before its latest N are kept).
        cached_users: users whose query came from the QueryCache.
        parse_s: validation and merging.
        stages_s: operator label -> seconds in the graph.
    """

    ok: int = 0
    invalid: int = 0
    users: int = 0
    unknown_users: int = 0
    excluded_items: int = 0
    exclude_seen_users: int = 0
    history_known: int = 0
    history_unknown: int = 0
    cached_users: int = 0
    parse_s: float = 0.0
    stages_s: dict = field(default_factory=dict)


@dataclass
class RetrievalExecutor:
    """Validates, merges, runs and splits: the whole request path for a list of requests.

    Attributes:
        runner: the graph runner.
        limits: request limits.
        n_items: catalogue size.
        cache: each stored user's query, computed at load (`enable_query_cache`), or None.
        cache_note: whether the cache is on, and why not when it is off (for the load log).
    """

    runner: GraphRunner
    limits: Limits
    n_items: int
    cache: QueryCache | None = None
    cache_note: str = "off"
    stats: dict = field(default_factory=lambda: {"requests": 0, "users": 0, "invalid": 0, "batches": 0})
    last: BatchReport = field(default_factory=BatchReport)

    @property
    def history(self) -> bool:
        """Whether the model takes a history input."""
        return self.limits.history_length > 0

    @functools.cached_property
    def _history_counter(self):
        """The transform, which counts each batch's known and unknown history ids (found once)."""
        from ensemble.ops.transform import TransformUserFeatures

        return next(n.op for n in self.runner.nodes if isinstance(n.op, TransformUserFeatures))

    @property
    def search_description(self) -> str:
        """How the search stage runs (index, device, FAISS capabilities), for the load log."""
        from ensemble.ops.search import SearchItems

        ops = [n.op for n in self.runner.nodes if isinstance(n.op, SearchItems)]
        return ops[0].describe() if ops else "no search stage"

    def _plain_inputs(self, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs for one request of these users that sends nothing but their ids."""
        request = ParsedRequest(user_ids, min(self.limits.default_top_k, self.n_items), np.zeros((len(user_ids), 0), np.int64), False)
        return merge([request], self.limits.user_features, history=self.history)

    def warm_up(self) -> None:
        """Runs the graph once at 1 and at the largest batch so the first request pays no tracing."""
        for batch in sorted({1, self.limits.max_batch_size}):
            self.runner.run(self._plain_inputs(np.arange(batch, dtype=np.int64)))
        self.runner.timings_s.clear()

    def enable_query_cache(self, max_mb: float | None) -> str:
        """Builds the QueryCache when it is exact for this graph and fits in max_mb (None: the
        repository predates the setting); returns cache_note."""
        reason = why_not(self.runner, max_mb)
        if reason is None:
            store = self.runner.ops_before(self.runner.step_of(SearchItems.__name__))[0].store  # the lookup's (why_not)
            try:
                need = bytes_per_user(self.runner, self._plain_inputs(store.user_ids[:64])) * len(store)
                if need > max_mb * 2**20:
                    reason = f"{len(store):,} users would take {need / 2**20:,.0f} MB, over serve.query_cache_mb={max_mb:g}"
                else:
                    self.cache = QueryCache.build(self.runner, self._plain_inputs)
            except Exception as e:  # noqa: BLE001 - requests still run the full path, which reports its own errors
                reason = f"building it failed ({type(e).__name__}: {e}); every request runs the lookup, transform and tower"
                LOG.warning("query cache %s", reason)
        self.runner.timings_s.clear()
        self.cache_note = self.cache.describe() if self.cache is not None else f"off: {reason}"
        return self.cache_note

    def execute(self, requests: list[tuple[Mapping[str, np.ndarray | None], Mapping[str, Any]]]) -> list[dict[str, np.ndarray] | RequestError]:
        """Answers each (tensors, params) request with its outputs or its own RequestError."""
        started = time.perf_counter()
        answers: list[dict[str, np.ndarray] | RequestError | None] = [None] * len(requests)
        good, where = [], []
        for i, (tensors, params) in enumerate(requests):
            try:
                good.append(parse_request(tensors, params, self.limits, self.n_items))
                where.append(i)
            except RequestError as e:
                # A fresh error without the traceback, whose frames would keep the tensors alive.
                answers[i] = RequestError(str(e))
        report = BatchReport(ok=len(good), invalid=len(requests) - len(good))
        if good:
            merged = merge(good, self.limits.user_features, history=self.history)
            report.parse_s = time.perf_counter() - started
            outputs = self._run_graph(merged, good, report)
            for i, answer in zip(where, split(outputs, good)):
                answers[i] = answer
            report.users = len(merged[contract.INPUT_USER_ID])
            report.unknown_users = int(np.count_nonzero(outputs[contract.OUTPUT_UNKNOWN]))
            report.excluded_items = int(np.count_nonzero(merged[contract.INPUT_EXCLUDE] != contract.EXCLUDE_PAD))
            report.exclude_seen_users = int(np.count_nonzero(merged[EXCLUDE_SEEN]))
            if self.history:
                report.history_known, report.history_unknown = self._history_counter.history_counts
            report.stages_s = dict(self.runner.last_run_s)
            self.stats["batches"] += 1
        self.stats["requests"] += len(requests)
        self.stats["invalid"] += report.invalid
        self.stats["users"] += report.users
        self.last = report
        return answers  # type: ignore[return-value]

    def _run_graph(self, merged: dict[str, np.ndarray], requests: list[ParsedRequest], report: BatchReport) -> dict[str, np.ndarray]:
        """The graph on a merged batch; rows of stored users that sent nothing but their id take
        the steps before the search from the cache."""
        cache = self.cache
        if cache is None:
            return self.runner.run(merged)
        if not cache.current():  # the lookup was pointed at another store after load
            self.cache, self.cache_note = None, "off: the feature store was replaced after load"
            LOG.warning("query cache %s", self.cache_note)
            return self.runner.run(merged)
        rows = cache.rows(merged[contract.INPUT_USER_ID])
        # A row that sends a feature value or a history runs the steps itself (the cache is off for
        # models with a history input, so only features are left to check here).
        for name in set().union(*[r.features for r in requests]):
            rows[merged[name] != contract.FEATURE_NOT_GIVEN] = -1
        miss = np.flatnonzero(rows < 0)
        report.cached_users = len(rows) - len(miss)
        if len(miss) == len(rows):
            return self.runner.run(merged)
        carried = cache.gather(rows)
        if not len(miss):
            return self.runner.run_from(merged, cache.cut, carried)
        computed = self.runner.run_prefix({name: column[miss] for name, column in merged.items()}, cache.cut)
        for source, value in computed.items():
            carried[source][miss] = value
        return self.runner.run_from(merged, cache.cut, carried, after_prefix=True)

