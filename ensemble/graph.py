"""Runs a merlin-systems ensemble graph on plain numpy columns, each node once per batch."""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
from merlin.dag import postorder_iter_nodes
from merlin.table import TensorTable

# merlin's column plumbing: these nodes only select, group or concatenate columns.
PLUMBING = {"SelectionOp", "ConcatColumns", "SubsetColumns", "GroupingOp"}

# Where a column comes from: (None, name) for the request's inputs, (step, name) for an operator's output.
Source = tuple


class GraphRunner:
    """Runs an ensemble graph once per batch: each node once, parents first, numpy columns.

    merlin's LocalExecutor re-runs a node for every path that reaches it, builds a TensorTable
    per node and converts formats between nodes; this runner computes each node's output once
    and hands plain arrays to the operators' `run`.
    Column lookup follows merlin's rules: a node reads its inputs from its parents' outputs
    (later parents win on a name clash) and takes what they lack from the request.
    All of that is resolved once, here: the plumbing nodes disappear and each operator's input
    columns point straight at the request or at the operator that computes them, so a batch
    only runs the operators.
    """

    def __init__(self, ensemble):
        self.ensemble = ensemble
        self.nodes = list(postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True))
        self.output_names = ensemble.graph.output_schema.column_names
        self.timings_s: dict[str, float] = {}  # cumulative seconds per operator
        self.last_run_s: dict[str, float] = {}  # seconds per operator in the latest run
        self._steps: list[tuple] = []  # (label, op, [(name, source)], output names, transform selector or None)
        self._outputs: list[tuple[str, Source]] = []
        self._carried: dict[int, tuple[Source, ...]] = {}  # cut -> carried(cut), found once
        self._plan()

    def _plan(self) -> None:
        resolved: dict[int, dict[str, Source]] = {}  # node id -> its output name -> source
        for node in self.nodes:
            available: dict[str, Source] = {}
            for parent in node.parents_with_dependencies:
                available.update(resolved.get(id(parent), {}))
            names = node.input_schema.column_names
            columns = {n: available.get(n, (None, n)) for n in names}
            label = type(node.op).__name__ if node.op is not None else None
            if node.op is None or label in PLUMBING:
                resolved[id(node)] = {n: columns[n] for n in node.output_schema.column_names}
                continue
            step = len(self._steps)
            selector = None if hasattr(node.op, "run") else node.input_columns.resolve(node.input_schema)
            outputs = tuple(node.output_schema.column_names)
            self._steps.append((label, node.op, tuple(columns.items()), outputs, selector))
            resolved[id(node)] = {n: (step, n) for n in outputs}
        last = resolved[id(self.nodes[-1])]
        self._outputs = [(n, last[n]) for n in self.output_names]

    def step_of(self, label: str) -> int | None:
        """The position of the first operator step named `label` (None when the graph has none)."""
        return next((i for i, step in enumerate(self._steps) if step[0] == label), None)

    def ops_before(self, cut: int) -> list:
        """The operators of the steps before `cut`, in order."""
        return [step[1] for step in self._steps[:cut]]

    def carried(self, cut: int) -> tuple[Source, ...]:
        """The columns the steps before `cut` produce that later steps or the outputs read."""
        if cut not in self._carried:
            read = {source for step in self._steps[cut:] for _, source in step[2]} | {source for _, source in self._outputs}
            self._carried[cut] = tuple(sorted(s for s in read if s[0] is not None and s[0] < cut))
        return self._carried[cut]

    def inputs_read(self, cut: int) -> set[str]:
        """The request inputs the steps before `cut` read."""
        return {c for step in self._steps[:cut] for _, (source, c) in step[2] if source is None}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every step on one batch; the graph's outputs."""
        return self.run_from(inputs, 0, {})

    def run_prefix(self, inputs: Mapping[str, np.ndarray], cut: int) -> dict[Source, np.ndarray]:
        """The steps before `cut` on one batch; the columns they carry past it (`carried`)."""
        self.last_run_s = {}
        produced = self._run_steps(inputs, [], 0, cut)
        return {(step, c): produced[step][c] for step, c in self.carried(cut)}

    def run_from(self, inputs: Mapping[str, np.ndarray], cut: int, carried: Mapping[Source, np.ndarray],
                 after_prefix: bool = False) -> dict[str, np.ndarray]:
        """The steps from `cut` on, the earlier steps' columns given (`carried`); the graph's outputs.

        after_prefix: this batch's carried columns were partly computed by `run_prefix` just
            before (on some of its rows), whose seconds last_run_s keeps.
        """
        if not after_prefix:
            self.last_run_s = {}
        produced: list[dict[str, np.ndarray]] = [{} for _ in range(cut)]
        for (step, c), value in carried.items():
            produced[step][c] = value
        produced = self._run_steps(inputs, produced, cut, len(self._steps))
        return {n: inputs[c] if step is None else produced[step][c] for n, (step, c) in self._outputs}

    def _run_steps(self, inputs: Mapping[str, np.ndarray], produced: list, start: int, stop: int) -> list:
        last_run_s = self.last_run_s
        for label, op, columns, outputs, selector in self._steps[start:stop]:
            args = {n: inputs[c] if step is None else produced[step][c] for n, (step, c) in columns}
            started = time.perf_counter()
            if selector is None:
                result = op.run(args)
            else:
                table = op.transform(selector, TensorTable(args))
                result = {n: table[n].values for n in table.columns}
            elapsed = time.perf_counter() - started
            self.timings_s[label] = self.timings_s.get(label, 0.0) + elapsed
            last_run_s[label] = last_run_s.get(label, 0.0) + elapsed
            produced.append({n: result[n] for n in outputs})
        return produced
