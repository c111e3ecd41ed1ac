"""The request path without Triton: validate requests, merge them, run the graph once, split.

The Triton model (`ensemble.triton_model`) is a thin shell around `RetrievalExecutor`; the
in-process pipeline and the tests call the same code, so server and in-process answers agree.
Loading it from a model repository is `ensemble.loader`'s job.
"""

from __future__ import annotations

import functools

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from common import contract
from common.errors import RequestError
from ensemble.graph import GraphRunner
from ensemble.ops.search import EXCLUDE_SEEN
from ensemble.request import Limits, ParsedRequest, merge, parse_request, split

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
    parse_s: float = 0.0
    stages_s: dict = field(default_factory=dict)


@dataclass
class RetrievalExecutor:
    """Validates, merges, runs and splits: the whole request path for a list of requests.

    Attributes:
        runner: the graph runner.
        limits: request limits.
        n_items: catalogue size.
    """

    runner: GraphRunner
    limits: Limits
    n_items: int
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

    def warm_up(self) -> None:
        """Runs the graph once at 1 and at the largest batch so the first request pays no tracing."""
        for batch in sorted({1, self.limits.max_batch_size}):
            users = np.arange(batch, dtype=np.int64).reshape(-1, 1)
            request = ParsedRequest(users.ravel(), min(self.limits.default_top_k, self.n_items), np.zeros((batch, 0), np.int64), False)
            self.runner.run(merge([request], self.limits.user_features, history=self.history))
        self.runner.timings_s.clear()

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
            outputs = self.runner.run(merged)
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

