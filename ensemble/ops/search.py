"""Operator: FAISS top-K over the item embeddings, exclusions applied, rows mapped to raw item ids.

merlin-systems' `QueryFaiss` flattens a batch of queries into one id array, returns no scores,
and has no way to leave items out. This operator answers each row with its own top-k raw item
ids and scores, best first. Excluded items are removed after a deeper search (k plus the
number of exclusions), so a user still gets k items whenever the catalogue has them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema

from common import contract
from ensemble.ops import ArrayOperator
from ensemble.ops.tower import QUERY_EMBEDDING

LOG = logging.getLogger(__name__)

PAD_SCORE = np.float32(np.finfo(np.float32).min)  # score of a padding slot (item id -1)
# FAISS computes exact inner products with BLAS from 20 queries on and with its own SIMD loop
# below; the two round differently, which reorders near-tied items when a user shares a batch.
# One code path for every batch size keeps each user's answer independent of the batch.
NO_BLAS_BELOW = 1 << 30
# Exactly tied scores come back from FAISS in heap order, which depends on how deep it searched.
# Results are ordered by (score, catalogue row) over a few extra candidates instead, so a tie at
# the k-th place is settled the same way at any depth.
TIE_MARGIN = 8
TOP_K = "top_k"
EXCLUDE_SEEN = "exclude_seen"


def ragged_gather(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR rows -> (row position per value, values), without a Python loop over rows."""
    starts, stops = indptr[rows], indptr[rows + 1]
    lengths = stops - starts
    owner = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, indices[np.repeat(starts, lengths) + offsets]


def use_gpu_index(index: faiss.Index) -> faiss.Index:
    """Moves a Flat or IVF index to GPU 0 when this FAISS build has a GPU; HNSW stays on CPU."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    if isinstance(index, faiss.IndexHNSW):
        return index
    LOG.info("moving the FAISS index to GPU 0")
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


class SearchItems(ArrayOperator, BaseOperator):
    """Top-k search with per-row k and per-row exclusions.

    Inputs: `query_embedding` [batch, dim] float32, `top_k` [batch] int32, `user_id` [batch]
    int64, `exclude_item_ids` [batch, n] int64 raw ids padded with -1, `exclude_seen` [batch]
    bool (leave out the user's training positives).
    Outputs: `item_ids` [batch, max(top_k)] int64 raw ids, `scores` [batch, max(top_k)] float32;
    a row asking for fewer than max(top_k) is padded with id -1 and PAD_SCORE.

    Args:
        index_path: FAISS index whose labels are catalogue rows.
        item_ids_path: [n_items] raw item id per catalogue row (.npy).
        seen_path: training positives per user (.npz with user_ids, indptr, indices).
        search_params: nprobe / efSearch to set after loading ({"nprobe": 32} say).
    """

    # Loaded by load_artifacts, never pickled into the ensemble.
    _RUNTIME = ("_index", "_item_ids", "_id_order", "_sorted_ids", "_seen_users", "_seen_indptr", "_seen_indices")

    def __init__(self, index_path: str | Path, item_ids_path: str | Path, seen_path: str | Path, search_params: dict | None = None):
        super().__init__()
        self.index_path = str(index_path)
        self.item_ids_path = str(item_ids_path)
        self.seen_path = str(seen_path)
        self.search_params = dict(search_params or {})
        self._index = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index = None

    def save_artifacts(self, artifact_path: str) -> None:
        for path in (self.index_path, self.item_ids_path, self.seen_path):
            shutil.copy2(path, Path(artifact_path) / Path(path).name)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        def where(path: str) -> Path:
            return Path(artifact_path) / Path(path).name if artifact_path else Path(path)

        faiss.cvar.distance_compute_blas_threshold = NO_BLAS_BELOW
        index = faiss.read_index(str(where(self.index_path)))
        if "nprobe" in self.search_params:
            faiss.extract_index_ivf(index).nprobe = int(self.search_params["nprobe"])
        if "ef_search" in self.search_params:
            index.hnsw.efSearch = int(self.search_params["ef_search"])
        self._index = use_gpu_index(index)
        self._item_ids = np.load(where(self.item_ids_path)).astype(np.int64)
        self._id_order = np.argsort(self._item_ids, kind="stable")
        self._sorted_ids = self._item_ids[self._id_order]
        with np.load(where(self.seen_path)) as seen:
            self._seen_users = seen["user_ids"].astype(np.int64)
            self._seen_indptr = seen["indptr"].astype(np.int64)
            self._seen_indices = seen["indices"].astype(np.int64)
        if self._index.ntotal != len(self._item_ids):
            raise ValueError(f"index holds {self._index.ntotal} vectors but there are {len(self._item_ids)} item ids")

    @property
    def n_items(self) -> int:
        return len(self._item_ids)

    def compute_input_schema(self, root_schema, parents_schema, deps_schema, selector) -> Schema:
        names = [QUERY_EMBEDDING, TOP_K, contract.INPUT_USER_ID, contract.INPUT_EXCLUDE, EXCLUDE_SEEN]
        return (parents_schema + deps_schema).select_by_name(names)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema=None) -> Schema:
        return Schema([
            ColumnSchema(contract.OUTPUT_ITEM_IDS, dtype=np.int64, dims=(None, None)),
            ColumnSchema(contract.OUTPUT_SCORES, dtype=np.float32, dims=(None, None)),
        ])

    def rows_of(self, raw_ids: np.ndarray) -> np.ndarray:
        """Raw item ids -> catalogue rows (-1 for ids not in the catalogue)."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, raw_ids)
        pos_c = np.minimum(pos, len(self._sorted_ids) - 1)
        found = (pos < len(self._sorted_ids)) & (self._sorted_ids[pos_c] == raw_ids)
        return np.where(found, self._id_order[pos_c], -1)

    def _exclusions(self, user_ids, exclude, exclude_seen) -> tuple[np.ndarray, np.ndarray]:
        """(row position, catalogue row) pairs to leave out, duplicates allowed."""
        owners, rows = [], []
        if exclude is not None and exclude.size:
            r, c = np.nonzero(exclude != contract.EXCLUDE_PAD)
            item_rows = self.rows_of(exclude[r, c])
            owners.append(r[item_rows >= 0])
            rows.append(item_rows[item_rows >= 0])
        if exclude_seen is not None and exclude_seen.any():
            batch_rows = np.flatnonzero(exclude_seen)
            pos = np.searchsorted(self._seen_users, user_ids[batch_rows])
            pos_c = np.minimum(pos, len(self._seen_users) - 1)
            known = (pos < len(self._seen_users)) & (self._seen_users[pos_c] == user_ids[batch_rows])
            owner, seen_rows = ragged_gather(self._seen_indptr, self._seen_indices, pos_c[known])
            owners.append(batch_rows[known][owner])
            rows.append(seen_rows)
        if not owners:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(owners), np.concatenate(rows)

    def search(self, queries: np.ndarray, top_k: np.ndarray, user_ids: np.ndarray | None = None,
               exclude: np.ndarray | None = None, exclude_seen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One batched search for every row.

        Args:
            queries: [batch, dim] float32.
            top_k: [batch] items wanted per row (capped at the catalogue size).
            user_ids: [batch] raw user ids (needed with exclude_seen).
            exclude: [batch, n] raw item ids to leave out, padded with -1.
            exclude_seen: [batch] bool, leave out the user's training positives.

        Returns:
            (item ids [batch, max(top_k)] int64, scores [batch, max(top_k)] float32).
        """
        if self._index is None:
            self.load_artifacts()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        batch = len(queries)
        top_k = np.minimum(np.asarray(top_k, dtype=np.int64).reshape(-1), self.n_items)
        kmax = int(top_k.max()) if batch else 0
        owners, excluded = self._exclusions(user_ids, exclude, exclude_seen)
        excluded_keys = np.unique(owners * self.n_items + excluded)
        per_row = np.bincount(excluded_keys // self.n_items, minlength=batch)
        wanted = np.minimum(top_k, self.n_items - per_row)
        depth = int(min(self.n_items, kmax + per_row.max() + TIE_MARGIN)) if batch else 0

        scores, rows = self._raw_search(queries, depth, widen=1)
        keep = self._keep(rows, np.arange(batch), excluded_keys)
        # An approximate index can return fewer hits than asked (few items in the probed IVF
        # cells, say): search those rows again with a wider probe until they are complete.
        widen = 1
        while widen < 64 and depth and (short := np.flatnonzero(keep.sum(axis=1) < wanted)).size:
            widen *= 4
            s_scores, s_rows = self._raw_search(queries[short], depth, widen)
            scores[short], rows[short] = s_scores, s_rows
            keep[short] = self._keep(s_rows, short, excluded_keys)

        order = np.lexsort((rows, -scores, ~keep), axis=1)[:, :kmax]
        rows = np.take_along_axis(rows, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        valid = np.take_along_axis(keep, order, axis=1) & (np.arange(kmax)[None, :] < top_k[:, None])
        ids = np.where(valid, self._item_ids[np.maximum(rows, 0)], -1)
        return ids, np.where(valid, scores, PAD_SCORE).astype(np.float32)

    def _keep(self, rows: np.ndarray, batch_rows: np.ndarray, excluded_keys: np.ndarray) -> np.ndarray:
        keep = rows >= 0
        if len(excluded_keys):
            keys = batch_rows[:, None] * self.n_items + rows
            keep &= ~np.isin(keys, excluded_keys)
        return keep

    def _raw_search(self, queries: np.ndarray, depth: int, widen: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search; widen > 1 multiplies nprobe / efSearch for this call only."""
        if depth == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = None
        if widen > 1:
            ivf = faiss.try_extract_index_ivf(self._index)
            if ivf is not None:
                params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, ivf.nprobe * widen))
            elif isinstance(self._index, faiss.IndexHNSW):
                params = faiss.SearchParametersHNSW(efSearch=self._index.hnsw.efSearch * widen)
        return self._index.search(queries, depth, params=params)

    def run(self, columns: dict) -> dict:
        ids, scores = self.search(columns[QUERY_EMBEDDING], columns[TOP_K], columns.get(contract.INPUT_USER_ID),
                                  columns.get(contract.INPUT_EXCLUDE), columns.get(EXCLUDE_SEEN))
        return {contract.OUTPUT_ITEM_IDS: ids, contract.OUTPUT_SCORES: scores}
