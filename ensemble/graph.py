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

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        produced: list[Mapping[str, np.ndarray]] = []
        last_run_s: dict[str, float] = {}
        for label, op, columns, outputs, selector in self._steps:
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
        self.last_run_s = last_run_s
        return {n: inputs[c] if step is None else produced[step][c] for n, (step, c) in self._outputs}
