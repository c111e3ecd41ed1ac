"""The request path without Triton: validate requests, merge them, run the graph once, split.

The Triton model (`ensemble.triton_model`) is a thin shell around `RetrievalExecutor`; the
in-process pipeline and the tests call the same code, so server and in-process answers agree.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from merlin.dag import postorder_iter_nodes
from merlin.table import TensorTable

from common import contract
from common.errors import RequestError
from ensemble.ops.search import EXCLUDE_SEEN, TOP_K

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request may ask for; set from the model config's parameters.

    Attributes:
        max_batch_size: most users per request.
        default_top_k: top_k when a request does not give one.
        max_top_k: the largest top_k accepted (also capped by the catalogue size).
        max_exclude: the most excluded item ids per user.
        exclude_seen: default of the `exclude_seen` request parameter.
        user_features: names of the optional raw user-feature inputs.
    """

    max_batch_size: int = 256
    default_top_k: int = 10
    max_top_k: int = 1000
    max_exclude: int = 1000
    exclude_seen: bool = False
    user_features: tuple[str, ...] = ()

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], max_batch_size: int) -> "Limits":
        def get(name, cast, default):
            return cast(params[name]) if name in params else default

        return cls(
            max_batch_size=max_batch_size,
            default_top_k=get("default_top_k", int, cls.default_top_k),
            max_top_k=get("max_top_k", int, cls.max_top_k),
            max_exclude=get("max_exclude", int, cls.max_exclude),
            exclude_seen=get("exclude_seen", lambda v: v.lower() == "true", cls.exclude_seen),
            user_features=get("user_features", lambda v: tuple(n for n in v.split(",") if n), ()),
        )


@dataclass(frozen=True)
class ParsedRequest:
    """One valid request, as the graph needs it.

    Attributes:
        user_ids: [b] int64.
        top_k: items per user.
        exclude: [b, n] int64 raw item ids, padded with -1 (n may be 0).
        exclude_seen: leave out the users' training positives.
        features: raw user-feature values sent with the request, name -> [b] int64
            (FEATURE_NOT_GIVEN where a row has none).
    """

    user_ids: np.ndarray
    top_k: int
    exclude: np.ndarray
    exclude_seen: bool
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.user_ids)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise RequestError(f"parameter {name} must be an integer, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        if float(number) != int(number):
            raise ValueError
        return int(number)
    except (ValueError, OverflowError) as e:
        raise RequestError(f"parameter {name} must be an integer, got {value!r}") from e


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(f"parameter {name} must be a boolean, got {value!r}")


def parse_request(tensors: Mapping[str, np.ndarray | None], params: Mapping[str, Any], limits: Limits, n_items: int) -> ParsedRequest:
    """Checks one request and returns it in graph form.

    Args:
        tensors: input name -> array (None or absent when not sent).
        params: the request's parameters.
        limits: what requests may ask for.
        n_items: catalogue size (top_k cannot exceed it).

    Raises:
        RequestError: saying what was expected and what arrived.
    """
    unknown = set(params) - {contract.PARAM_TOP_K, contract.PARAM_EXCLUDE_SEEN}
    if unknown:
        raise RequestError(f"unknown request parameters {sorted(unknown)}; expected {contract.PARAM_TOP_K!r}, 'exclude_seen'")
    users = tensors.get(contract.INPUT_USER_ID)
    if users is None:
        raise RequestError(f"missing input {contract.INPUT_USER_ID!r} ({contract.DTYPES[contract.INPUT_USER_ID]} [batch, 1])")
    if users.dtype != np.int64:
        raise RequestError(f"input {contract.INPUT_USER_ID!r} must be INT64, got {users.dtype}")
    if users.ndim != 2 or users.shape[1] != 1:
        raise RequestError(f"input {contract.INPUT_USER_ID!r} must have shape [batch, 1], got {list(users.shape)}")
    batch = users.shape[0]
    if batch < 1:
        raise RequestError(f"input {contract.INPUT_USER_ID!r} holds no users; send 1 to {limits.max_batch_size}")
    if batch > limits.max_batch_size:
        raise RequestError(f"batch of {batch} users is over the maximum of {limits.max_batch_size}")

    top_k = _as_int(params.get(contract.PARAM_TOP_K, limits.default_top_k), contract.PARAM_TOP_K)
    cap = min(limits.max_top_k, n_items)
    if not 1 <= top_k <= cap:
        raise RequestError(f"parameter {contract.PARAM_TOP_K} must be in 1..{cap}, got {top_k}")
    exclude_seen = _as_bool(params.get(contract.PARAM_EXCLUDE_SEEN, limits.exclude_seen), contract.PARAM_EXCLUDE_SEEN)

    exclude = tensors.get(contract.INPUT_EXCLUDE)
    if exclude is None:
        exclude = np.zeros((batch, 0), dtype=np.int64)
    else:
        if exclude.dtype != np.int64:
            raise RequestError(f"input {contract.INPUT_EXCLUDE!r} must be INT64, got {exclude.dtype}")
        if exclude.ndim != 2 or exclude.shape[0] != batch:
            raise RequestError(
                f"input {contract.INPUT_EXCLUDE!r} must have shape [{batch}, n] (one row per user, padded with "
                f"{contract.EXCLUDE_PAD}), got {list(exclude.shape)}"
            )
        if exclude.shape[1] > limits.max_exclude:
            raise RequestError(f"input {contract.INPUT_EXCLUDE!r} has {exclude.shape[1]} ids per user, over the maximum of {limits.max_exclude}")
    features = {}
    for name in limits.user_features:
        values = tensors.get(name)
        if values is None:
            continue
        if values.dtype != np.int64:
            raise RequestError(f"input {name!r} must be INT64 raw feature ids, got {values.dtype}")
        if values.shape != (batch, 1):
            raise RequestError(f"input {name!r} must have shape [{batch}, 1], got {list(values.shape)}")
        if (values < contract.FEATURE_NOT_GIVEN).any():
            bad = int(values[values < contract.FEATURE_NOT_GIVEN][0])
            raise RequestError(
                f"input {name!r} holds {bad}; raw feature ids are >= 0, or {contract.FEATURE_NOT_GIVEN} for 'not given'"
            )
        features[name] = values.reshape(-1)
    return ParsedRequest(users.reshape(-1).astype(np.int64, copy=False), top_k, exclude, exclude_seen, features)


def merge(requests: list[ParsedRequest], feature_names: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Concatenates requests into one batch of graph inputs (exclusions padded to one width)."""
    width = max(r.exclude.shape[1] for r in requests)
    exclude = np.full((sum(r.batch for r in requests), width), contract.EXCLUDE_PAD, dtype=np.int64)
    row = 0
    for r in requests:
        exclude[row : row + r.batch, : r.exclude.shape[1]] = r.exclude
        row += r.batch
    features = {
        name: np.concatenate([r.features.get(name, np.full(r.batch, contract.FEATURE_NOT_GIVEN, np.int64)) for r in requests])
        for name in feature_names
    }
    return {
        **features,
        contract.INPUT_USER_ID: np.concatenate([r.user_ids for r in requests]),
        TOP_K: np.concatenate([np.full(r.batch, r.top_k, dtype=np.int32) for r in requests]),
        contract.INPUT_EXCLUDE: exclude,
        EXCLUDE_SEEN: np.concatenate([np.full(r.batch, r.exclude_seen, dtype=bool) for r in requests]),
    }


def split(outputs: Mapping[str, np.ndarray], requests: list[ParsedRequest]) -> list[dict[str, np.ndarray]]:
    """Cuts a merged result back into one response per request, each with its own top_k."""
    responses, row = [], 0
    for r in requests:
        rows = slice(row, row + r.batch)
        responses.append({
            contract.OUTPUT_ITEM_IDS: np.ascontiguousarray(outputs[contract.OUTPUT_ITEM_IDS][rows, : r.top_k]),
            contract.OUTPUT_SCORES: np.ascontiguousarray(outputs[contract.OUTPUT_SCORES][rows, : r.top_k]),
            contract.OUTPUT_UNKNOWN: outputs[contract.OUTPUT_UNKNOWN][rows].reshape(-1, 1).astype(bool),
        })
        row += r.batch
    return responses


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
        parse_s: validation and merging.
        stages_s: operator label -> seconds in the graph.
    """

    ok: int = 0
    invalid: int = 0
    users: int = 0
    unknown_users: int = 0
    excluded_items: int = 0
    exclude_seen_users: int = 0
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

    def warm_up(self) -> None:
        """Runs the graph once at 1 and at the largest batch so the first request pays no tracing."""
        for batch in sorted({1, self.limits.max_batch_size}):
            users = np.arange(batch, dtype=np.int64).reshape(-1, 1)
            request = ParsedRequest(users.ravel(), min(self.limits.default_top_k, self.n_items), np.zeros((batch, 0), np.int64), False)
            self.runner.run(merge([request], self.limits.user_features))
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
                answers[i] = e
        report = BatchReport(ok=len(good), invalid=len(requests) - len(good))
        if good:
            merged = merge(good, self.limits.user_features)
            report.parse_s = time.perf_counter() - started
            outputs = self.runner.run(merged)
            for i, answer in zip(where, split(outputs, good)):
                answers[i] = answer
            report.users = len(merged[contract.INPUT_USER_ID])
            report.unknown_users = int(np.count_nonzero(outputs[contract.OUTPUT_UNKNOWN]))
            report.excluded_items = int(np.count_nonzero(merged[contract.INPUT_EXCLUDE] != contract.EXCLUDE_PAD))
            report.exclude_seen_users = int(np.count_nonzero(merged[EXCLUDE_SEEN]))
            report.stages_s = dict(self.runner.last_run_s)
            self.stats["batches"] += 1
        self.stats["requests"] += len(requests)
        self.stats["invalid"] += report.invalid
        self.stats["users"] += report.users
        self.last = report
        return answers  # type: ignore[return-value]


def store_namespace(manifest: dict) -> str:
    """The key prefix of an export in a shared feature store."""
    return f"{contract.MODEL_NAME}:{manifest['artifacts_id']}"


def parse_parameters(raw: str | None) -> dict[str, Any]:
    """A Triton request's parameters JSON -> dict (empty when absent)."""
    if not raw:
        return {}
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"request parameters are not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise RequestError(f"request parameters must be a JSON object, got {type(params).__name__}")
    return params


def model_parameters(model_dir: str | Path, version: int | None = None) -> tuple[dict[str, str], int]:
    """(parameters, max_batch_size) of a model's config.pbtxt (of `version`'s own copy if kept)."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    path = Path(model_dir) / f"config.v{version}.pbtxt"
    if version is None or not path.is_file():
        path = Path(model_dir) / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}, config.max_batch_size or 1


def load_model_in_process(repository: str | Path, name: str = contract.MODEL_NAME, version: int = 1) -> RetrievalExecutor:
    """The served request path of a model repository, loaded in this process (no server)."""
    params, max_batch = model_parameters(Path(repository) / name, version)
    return load_executor(Path(repository) / name / str(version) / "ensemble", Limits.from_parameters(params, max_batch),
                         int(params.get("threads", "1")), params.get("feature_store", "embedded"))


def load_executor(ensemble_dir: str | Path, limits: Limits, threads: int = 1, feature_store: str = "embedded") -> RetrievalExecutor:
    """Loads a saved ensemble and its artifacts into an executor (in the server or in-process)."""
    from merlin.systems.dag import Ensemble

    from ensemble.ops.lookup import LookupUserFeatures
    from ensemble.ops.search import SearchItems
    from ensemble.ops.tower import configure_threads

    configure_threads(threads)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(threads)
    threadpool_limits(threads)  # BLAS (the compiled tower's matmuls)
    ensemble = Ensemble.load(str(ensemble_dir))
    runner = GraphRunner(ensemble)
    n_items = 0
    for node in runner.nodes:
        if isinstance(node.op, LookupUserFeatures) and feature_store != "embedded":
            from ensemble.redis_store import RedisFeatureStore

            manifest = json.loads((Path(ensemble_dir).parent / contract.MANIFEST).read_text())
            node.op.set_store(RedisFeatureStore(feature_store, store_namespace(manifest), node.op.feature_names))
        if node.op is not None:
            node.op.load_artifacts(str(ensemble_dir))
            if isinstance(node.op, SearchItems):
                n_items = node.op.n_items
    executor = RetrievalExecutor(runner, limits, n_items)
    executor.warm_up()
    return executor
