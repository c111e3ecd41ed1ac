"""Operator: the fitted NVTabular user workflow, run in-process and compiled to array lookups.

merlin-systems' `TransformWorkflow` is exported as a separate Triton model that runs the workflow
in pandas and is reached through a BLS hop: 20 ms of a 24 ms request on this machine. A
Categorify is a fixed map from raw value to code once fitted, so this operator asks each fitted
Categorify for the codes of its whole vocabulary, of a null and of an unseen value, and then
encodes a request with one array lookup for every column whose vocabulary spans few integers
(`DenseCodes`) and one `searchsorted` for each other column. Workflows with other operators fall
back to the workflow's own in-memory transform, still in-process.

A model with a history input also gets the users' histories encoded: [batch, m] raw item ids
(stored, then sent) -> item codes with the item id column's own fitted Categorify (the codes the
item tower was trained on, so the query tower's pooled table and the item tower's agree). Ids the
vocabulary does not know are left out and counted (`history_counts`, sent as
retrieval_history_items_total{kind}); of the rest each row keeps its latest N (the model's
history length), padded with code 0, which the tower leaves out.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from merlin.dag import BaseOperator, ColumnSelector, postorder_iter_nodes
from merlin.schema import ColumnSchema, Schema
from nvtabular.ops.categorify import NULL_OFFSET

from common import contract
from common.errors import ArtifactError
from ensemble.history import keep_latest
from ensemble.ops import MISSING, ArrayOperator
from ensemble.ops.tower import FIRST_ITEM_CODE

LOG = logging.getLogger(__name__)

WORKFLOW_DIR = "user_workflow"
HISTORY_WORKFLOW_DIR = "item_id_workflow"
HISTORY_DROPPED_CODE = 0  # padding's code: the tower pools only codes >= FIRST_ITEM_CODE
# Operators that only select columns or add schema metadata; they do not change values.
_PASSTHROUGH_OPS = {"SelectionOp", "ConcatColumns", "TagAsUserID", "TagAsUserFeatures", "TagAsItemID",
                    "TagAsItemFeatures", "AddMetadata", "AddTags", "AddProperties", "GroupingOp", "SubsetColumns"}


@dataclass(frozen=True)
class CategoryTable:
    """One column's fitted Categorify as arrays.

    Attributes:
        keys: [v] sorted raw values of the vocabulary.
        codes: [v] their codes.
        oov_code: code of a value outside the vocabulary.
        null_code: code of a missing value.
        dtype: numpy dtype of the encoded column.
    """

    keys: np.ndarray
    codes: np.ndarray
    oov_code: int
    null_code: int
    dtype: np.dtype

    def encode(self, values: np.ndarray) -> np.ndarray:
        """[n] raw values (MISSING for nulls) -> [n] codes."""
        values = np.asarray(values).reshape(-1)
        pos = np.searchsorted(self.keys, values)
        pos_c = np.minimum(pos, len(self.keys) - 1)
        found = (pos < len(self.keys)) & (self.keys[pos_c] == values)
        out = np.where(found, self.codes[pos_c], self.oov_code).astype(self.dtype)
        out[values == MISSING] = self.null_code
        return out


# Entries of the lookup table DenseCodes builds over all its columns (int64: 32 MB at most).
DENSE_MAX_ENTRIES = 1 << 22


@dataclass(frozen=True)
class DenseCodes:
    """Columns whose integer vocabularies span few values, encoded together by one array lookup.

    CategoryTable.encode costs about 8 numpy calls per column, most of a one-user request's
    transform when a model has a dozen user features. Here each column's values lo..hi get a block
    of one table (its code at value - lo, the out-of-vocabulary code where the vocabulary has a
    gap, then an out-of-vocabulary and a null slot), and every column is encoded by the same few
    calls on the [batch, columns] matrix. The codes equal CategoryTable.encode's (tested).

    Attributes:
        columns: the encoded columns, in matrix order.
        lo, hi: [columns] smallest and largest vocabulary value.
        base: [columns] where each column's block starts in `table`.
        table: the blocks, one after the other.
        dtypes: each column's encoded dtype.
    """

    columns: tuple[str, ...]
    lo: np.ndarray
    hi: np.ndarray
    base: np.ndarray
    table: np.ndarray
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def from_tables(cls, tables: dict[str, CategoryTable], max_entries: int = DENSE_MAX_ENTRIES) -> "DenseCodes | None":
        """The columns of `tables` with integer vocabularies, while their spans fit max_entries (None: none fit)."""
        chosen, blocks, used = [], [], 0
        for col, t in tables.items():
            if not len(t.keys) or not np.issubdtype(t.keys.dtype, np.integer):
                continue
            lo, hi = int(t.keys.min()), int(t.keys.max())
            span = hi - lo + 1
            if used + span + 2 > max_entries:
                continue
            block = np.full(span + 2, t.oov_code, np.int64)
            block[t.keys - lo] = t.codes
            block[span + 1] = t.null_code
            chosen.append((col, lo, hi, used, t.dtype))
            blocks.append(block)
            used += span + 2
        if not chosen:
            return None
        cols, lo, hi, base, dtypes = zip(*chosen)
        table = np.concatenate(blocks)
        if len(set(dtypes)) == 1:  # the table holds the codes in their dtype: encode hands out columns as they are
            table = table.astype(dtypes[0])
        return cls(tuple(cols), np.array(lo, np.int64), np.array(hi, np.int64), np.array(base, np.int64), table, tuple(dtypes))

    def encode(self, columns: dict) -> dict[str, np.ndarray]:
        """{column: [n] raw values (MISSING for nulls)} -> {column: [n] codes} for this object's columns."""
        x = np.array([np.asarray(columns[c]).reshape(-1) for c in self.columns], dtype=np.int64).T
        span = self.hi - self.lo + 1
        # Compared before subtracting: x - lo of a value far outside the block could wrap around.
        pos = np.where((x >= self.lo) & (x <= self.hi), x - self.lo, span)
        pos = np.where(x == MISSING, span + 1, pos)
        codes = self.table[pos + self.base]
        return {c: codes[:, j].astype(dt, copy=False) for j, (c, dt) in enumerate(zip(self.columns, self.dtypes))}


def item_id_table(workflow, path) -> CategoryTable:
    """The Categorify table of a workflow whose only output column is the item id."""
    ops = _categorify_nodes(workflow)
    if not ops or len(ops) != 1:
        raise ArtifactError(
            f"{path} must hold one Categorify of the item id column to encode histories, found outputs "
            f"{workflow.output_schema.column_names}"
        )
    (column, op), = ops.items()
    return compile_categorify(op, column, np.int32)


def _categorify_nodes(workflow) -> dict[str, object] | None:
    """Output column -> its Categorify op, or None when the workflow holds other value-changing ops."""
    found = {}
    for node in postorder_iter_nodes(workflow.output_node):
        name = type(node.op).__name__
        if name == "Categorify":
            if getattr(node.op, "encode_type", "joint") == "combo":
                return None
            for col in node.output_columns.names:
                if col in found:
                    return None
                found[col] = node.op
        elif name not in _PASSTHROUGH_OPS:
            return None
    outputs = workflow.output_schema.column_names
    return found if set(outputs) == set(found) else None


def compile_categorify(op, column: str, dtype) -> CategoryTable:
    """Asks a fitted Categorify for the codes of its vocabulary, of a null and of an unseen value."""
    vocab = pd.read_parquet(op.categories[column], columns=[column])[column].dropna()
    keys = np.unique(vocab.to_numpy())
    unseen = keys.max() + 1 if len(keys) else 0
    frame = pd.DataFrame({column: np.append(keys, unseen).astype(vocab.dtype)})
    encoded = op.transform(ColumnSelector([column]), frame)[column].to_numpy()
    # Categorify cannot encode a null in an integer column on CPU (it casts the column to the
    # vocabulary's dtype first: "cannot convert NA to integer"), so the null code is taken from
    # the constant its encoder would use.
    return CategoryTable(keys.astype(np.int64), encoded[:-1].astype(dtype), int(encoded[-1]), NULL_OFFSET, np.dtype(dtype))


class TransformUserFeatures(ArrayOperator, BaseOperator):
    """Encodes raw user columns with the fitted workflow, in the executor's process.

    Args:
        workflow_path: a saved NVTabular workflow with raw user columns in and encoded ones out
            (`train.etl.user_workflow`); copied beside the ensemble on export.
        passthrough: input columns forwarded unchanged (the unknown-user flag, say).
        history_workflow_path: for a model with a history input, a saved workflow whose only
            column is the item id (`item_id_workflow`); its Categorify encodes `history_item_ids`.
        history_length: N, the known ids each history keeps (0: all it is given).
    """

    history_workflow_path = None  # ensembles pickled before the history input have none
    history_length = 0  # ... and those pickled before the cut moved here kept what the lookup cut

    def __init__(self, workflow_path: str | Path, passthrough: tuple[str, ...] = (), history_workflow_path: str | Path | None = None,
                 history_length: int = 0):
        super().__init__()
        import nvtabular as nvt

        self.workflow_path = str(workflow_path)
        self.passthrough = tuple(passthrough)
        self.history_workflow_path = None if history_workflow_path is None else str(history_workflow_path)
        self.history_length = int(history_length)
        workflow = nvt.Workflow.load(self.workflow_path)
        self._input_schema = workflow.input_schema
        self._output_schema = workflow.output_schema
        self._workflow = None
        self._tables: dict[str, CategoryTable] | None = None
        self._dense: DenseCodes | None = None  # the columns encoded together (most or all of them)
        self._sparse: dict[str, CategoryTable] = {}  # the rest, one searchsorted each
        self._history_table: CategoryTable | None = None
        self.history_counts = (0, 0)  # (known, unknown) history ids in the latest batch

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_workflow", "_tables", "_dense", "_sparse", "_history_table")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workflow, self._tables, self._history_table = None, None, None
        self._dense, self._sparse = None, {}
        self.history_counts = (0, 0)

    @property
    def history(self) -> bool:
        return self.history_workflow_path is not None

    @property
    def compiled(self) -> bool:
        return self._tables is not None

    def save_artifacts(self, artifact_path: str) -> None:
        shutil.copytree(self.workflow_path, Path(artifact_path) / WORKFLOW_DIR, dirs_exist_ok=True)
        if self.history:
            shutil.copytree(self.history_workflow_path, Path(artifact_path) / HISTORY_WORKFLOW_DIR, dirs_exist_ok=True)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        import nvtabular as nvt

        path = Path(artifact_path) / WORKFLOW_DIR if artifact_path else Path(self.workflow_path)
        self._workflow = nvt.Workflow.load(str(path))
        if self.history:
            history_path = Path(artifact_path) / HISTORY_WORKFLOW_DIR if artifact_path else Path(self.history_workflow_path)
            self._history_table = item_id_table(nvt.Workflow.load(str(history_path)), history_path)
        ops = _categorify_nodes(self._workflow)
        if ops is None:
            LOG.warning("workflow at %s has operators beyond Categorify; running it in pandas", path)
            self._tables = None
            return
        self._tables = {
            col: compile_categorify(op, col, self._output_schema[col].dtype.to_numpy) for col, op in ops.items()
        }
        self._dense = DenseCodes.from_tables(self._tables)
        self._sparse = {c: t for c, t in self._tables.items() if self._dense is None or c not in self._dense.columns}

    def compute_input_schema(self, root_schema, parents_schema, deps_schema, selector) -> Schema:
        names = [*self._input_schema.column_names, *self.passthrough, *([contract.INPUT_HISTORY] if self.history else [])]
        return (parents_schema + deps_schema).select_by_name(names)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema=None) -> Schema:
        out = self._output_schema + input_schema.select_by_name(list(self.passthrough))
        if self.history:
            out += Schema([ColumnSchema(contract.INPUT_HISTORY, dtype=np.int32, dims=(None, None))])
        return out

    def run(self, columns: dict) -> dict:
        if self._workflow is None:
            self.load_artifacts()
        if self._tables is not None:
            out = self._dense.encode(columns) if self._dense is not None else {}
            out.update({col: table.encode(columns[col]) for col, table in self._sparse.items()})
            out = {col: out[col] for col in self._tables}  # the workflow's column order
        else:
            out = self._transform_pandas(columns)
        for col in self.passthrough:
            out[col] = columns[col]
        if self.history:
            out[contract.INPUT_HISTORY] = self.encode_history(columns[contract.INPUT_HISTORY])
        return out

    def encode_history(self, raw: np.ndarray) -> np.ndarray:
        """[batch, m] raw item ids (HISTORY_PAD for none) -> [batch, N] int32 item codes: each row's
        latest N ids the item vocabulary knows, padded with HISTORY_DROPPED_CODE; unknown ids are
        left out and counted."""
        if self._history_table is None:
            self.load_artifacts()
        raw = np.asarray(raw, np.int64)
        raw = raw.reshape(len(raw), -1)
        codes = self._history_table.encode(raw.reshape(-1)).reshape(raw.shape).astype(np.int32)
        given = raw != contract.HISTORY_PAD
        known = given & (codes >= FIRST_ITEM_CODE)
        n_given, n_known = int(np.count_nonzero(given)), int(np.count_nonzero(known))
        self.history_counts = (n_known, n_given - n_known)
        if self.history_length:  # unknown ids drop out before the cut, so they take no known id's place
            codes = keep_latest(np.where(known, codes, contract.HISTORY_PAD), self.history_length)
            return np.where(codes == contract.HISTORY_PAD, HISTORY_DROPPED_CODE, codes).astype(np.int32)
        codes[~known] = HISTORY_DROPPED_CODE
        return codes

    def _transform_pandas(self, columns: dict) -> dict[str, np.ndarray]:
        # MISSING stays as is here: an unseen value, encoded as out-of-vocabulary (see above).
        frame = pd.DataFrame({col: np.asarray(columns[col]).reshape(-1) for col in self._input_schema.column_names})
        encoded = self._workflow._transform_df(frame)
        return {col: encoded[col].to_numpy() for col in self._output_schema.column_names}
