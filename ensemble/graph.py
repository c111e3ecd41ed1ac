"""Runs a merlin-systems ensemble graph on plain numpy columns, each node once per batch."""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
from merlin.dag import postorder_iter_nodes
from merlin.table import TensorTable

# merlin's column plumbing: these nodes only select, group or concatenate columns.
PLUMBING = {"SelectionOp", "ConcatColumns", "SubsetColumns", "GroupingOp"}


class GraphRunner:
    """Runs an ensemble graph once per batch: each node once, parents first, numpy columns.

    merlin's LocalExecutor re-runs a node for every path that reaches it, builds a TensorTable
    per node and converts formats between nodes; this runner computes each node's output once,
    does the column plumbing itself and hands plain arrays to the operators' `run`.
    Column lookup follows merlin's rules: a node reads its inputs from its parents' outputs
    (later parents win on a name clash) and takes what they lack from the request.
    """

    def __init__(self, ensemble):
        self.ensemble = ensemble
        self.nodes = list(postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True))
        self.output_names = ensemble.graph.output_schema.column_names
        self.timings_s: dict[str, float] = {}  # cumulative seconds per operator
        self.last_run_s: dict[str, float] = {}  # seconds per operator in the latest run

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        produced: dict[int, dict[str, np.ndarray]] = {}
        self.last_run_s = {}
        for node in self.nodes:
            available: dict[str, np.ndarray] = {}
            for parent in node.parents_with_dependencies:
                available.update(produced.get(id(parent), {}))
            names = node.input_schema.column_names
            columns = {n: available[n] if n in available else inputs[n] for n in names}
            label = type(node.op).__name__ if node.op is not None else None
            if node.op is None or label in PLUMBING:
                produced[id(node)] = {n: columns[n] for n in node.output_schema.column_names}
                continue
            started = time.perf_counter()
            if hasattr(node.op, "run"):
                result = node.op.run(columns)
            else:
                table = node.op.transform(node.input_columns.resolve(node.input_schema), TensorTable(columns))
                result = {n: table[n].values for n in table.columns}
            elapsed = time.perf_counter() - started
            self.timings_s[label] = self.timings_s.get(label, 0.0) + elapsed
            self.last_run_s[label] = self.last_run_s.get(label, 0.0) + elapsed
            produced[id(node)] = {n: result[n] for n in node.output_schema.column_names}
        last = produced[id(self.nodes[-1])]
        return {n: last[n] for n in self.output_names}

