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
from common.errors import ArtifactError, ConfigError
from ensemble.ops import ArrayOperator
from ensemble.ops.probe_split import SplitRefineSearch, expected_codes, split_unsupported
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


def in_answer_order(scores: np.ndarray, keep: np.ndarray) -> bool:
    """Whether every row is already in answer order: kept hits first, scores strictly falling.

    Then the answer's sort by (kept first, score falling, catalogue row) is the identity, as it is
    for a search with no exclusions and no exact ties (FAISS returns its hits best first, padding
    last), and the sort and its gathers are skipped. Rows past their kept hits are masked out
    whatever their order. A tie, an excluded hit or padding before a hit anywhere in the batch
    sends the batch through the sort.
    """
    later = keep[:, 1:]
    return not (later & ~keep[:, :-1]).any() and bool((~later | (scores[:, 1:] < scores[:, :-1])).all())


# FAISS's GPU k-selection handles at most this many neighbours per query (GPU_MAX_SELECTION_K in
# 1.7.2 and 1.8); deeper searches go to the CPU copy of the index instead of failing.
GPU_MAX_SELECTION_K = 2048
# Per-call search parameters came with FAISS 1.7.3; the Merlin 23.08 container has 1.7.2.
SEARCH_PARAMETERS = hasattr(faiss, "SearchParametersIVF")
INDEX_DEVICES = ("cpu", "gpu", "auto")


def ivf_of(index: faiss.Index):
    """The IVF index inside `index` (under an IndexRefine too), or None.

    FAISS 1.7.2's extract_index_ivf does not look inside IndexRefine, so the refine wrapper is
    opened here; the same index file then serves on 1.7.2 and 1.8.
    """
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    if hasattr(faiss, "try_extract_index_ivf"):
        return faiss.try_extract_index_ivf(index)
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_quantizer(index: faiss.Index):
    """The HNSW graph an IVF index finds its cells with, or None (a flat quantizer, or no IVF)."""
    ivf = ivf_of(index)
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def gpu_count() -> int:
    """GPUs this FAISS build can use (0 for a CPU-only build)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def place_index(index: faiss.Index, device: str) -> tuple[faiss.Index, bool]:
    """(the index to search, whether it is on GPU) for the `index_device` setting.

    Raises:
        ConfigError: "gpu" was asked for and this FAISS build sees no GPU, or the device is unknown.
    """
    if device not in INDEX_DEVICES:
        raise ConfigError(f"index_device must be one of {INDEX_DEVICES}, got {device!r}")
    if device == "cpu" or (device == "auto" and gpu_count() < 1):
        return index, False
    if gpu_count() < 1:
        raise ConfigError(f"index_device=gpu, but FAISS {faiss.__version__} sees no GPU (a CPU-only build, or no device visible)")
    if isinstance(index, (faiss.IndexHNSW, faiss.IndexRefine)):
        LOG.warning("index_device=%s: FAISS has no GPU %s; the index stays on CPU", device, type(index).__name__)
        return index, False
    LOG.info("moving the FAISS index (%d vectors) to GPU 0", index.ntotal)
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index), True


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
    _RUNTIME = ("_index", "_cpu_index", "_device_max_k", "_split", "_split_note", "_item_ids", "_id_order",
                "_sorted_ids", "_seen_users", "_seen_indptr", "_seen_indices")

    def __init__(self, index_path: str | Path, item_ids_path: str | Path, seen_path: str | Path, search_params: dict | None = None):
        super().__init__()
        self.index_path = str(index_path)
        self.item_ids_path = str(item_ids_path)
        self.seen_path = str(seen_path)
        self.search_params = dict(search_params or {})
        self.device = "cpu"  # index_device, set by the loader from the model config (default there: auto)
        self.probe_split_min_codes = 0  # serve.probe_split_min_codes, set by the loader (ensemble.ops.probe_split)
        self._index = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("device", "cpu")
        self.__dict__.setdefault("probe_split_min_codes", 0)
        self._index = None

    def save_artifacts(self, artifact_path: str) -> None:
        for path in (self.index_path, self.item_ids_path, self.seen_path):
            shutil.copy2(path, Path(artifact_path) / Path(path).name)

    def load_artifacts(self, artifact_path: str | None = None) -> None:
        def where(path: str) -> Path:
            return Path(artifact_path) / Path(path).name if artifact_path else Path(path)

        faiss.cvar.distance_compute_blas_threshold = NO_BLAS_BELOW
        try:
            index = faiss.read_index(str(where(self.index_path)))
        except RuntimeError as e:  # FAISS raises RuntimeError with a C++ message and no file name
            raise ArtifactError(f"{where(self.index_path)} is not a readable FAISS index: {str(e).splitlines()[0]}") from None
        if "nprobe" in self.search_params:
            ivf_of(index).nprobe = int(self.search_params["nprobe"])
        if "k_factor" in self.search_params:
            index.k_factor = float(self.search_params["k_factor"])
        if "ef_search" in self.search_params:
            index.hnsw.efSearch = int(self.search_params["ef_search"])
        if "quantizer_ef_search" in self.search_params:  # IVF cells found in an HNSW graph over the centroids
            hnsw_quantizer(index).hnsw.efSearch = int(self.search_params["quantizer_ef_search"])
        self._cpu_index = index
        self._index, on_gpu = place_index(index, self.device)
        self._device_max_k = GPU_MAX_SELECTION_K if on_gpu else None
        self._item_ids = np.load(where(self.item_ids_path)).astype(np.int64)
        self._id_order = np.argsort(self._item_ids, kind="stable")
        self._sorted_ids = self._item_ids[self._id_order]
        with np.load(where(self.seen_path)) as seen:
            self._seen_users = seen["user_ids"].astype(np.int64)
            self._seen_indptr = seen["indptr"].astype(np.int64)
            self._seen_indices = seen["indices"].astype(np.int64)
        if self._index.ntotal != len(self._item_ids):
            raise ArtifactError(f"{where(self.index_path)} holds {self._index.ntotal} vectors but {where(self.item_ids_path)} "
                                f"has {len(self._item_ids)} item ids")
        self._split, self._split_note = None, ""
        reason = "the index is on GPU" if on_gpu else split_unsupported(index, self.probe_split_min_codes)
        if reason is None:
            self._split = SplitRefineSearch(index)
            self._split_note = (f", a lone query's cells split over {faiss.omp_get_max_threads()} threads "
                                f"({expected_codes(index):,.0f} codes a query)" if self._split.split else
                                f", one thread a query (FAISS {faiss.__version__} cannot split a query's cells)")

    @property
    def n_items(self) -> int:
        return len(self._item_ids)

    def describe(self) -> str:
        """Index, device and how search settings are passed (for the load log)."""
        ivf = ivf_of(self._cpu_index)
        kind = f"IVF{ivf.nlist} nprobe {ivf.nprobe}" if ivf is not None else type(self._cpu_index).__name__
        quantizer = hnsw_quantizer(self._cpu_index)
        if quantizer is not None:
            kind += f" (cells found by HNSW, efSearch {quantizer.hnsw.efSearch})"
        if isinstance(self._cpu_index, faiss.IndexRefine):
            kind += f", re-ranked by {type(faiss.downcast_index(self._cpu_index.refine_index)).__name__} (k_factor {self._cpu_index.k_factor:g})"
        device = f"GPU 0 (searches deeper than {GPU_MAX_SELECTION_K} on CPU)" if self._device_max_k else "CPU"
        params = "per-call SearchParameters" if SEARCH_PARAMETERS else "no SearchParameters (FAISS < 1.7.3): wider probes set on the index"
        return f"FAISS {faiss.__version__}, {self.n_items} items, {kind}{self._split_note} on {device}, {params}"

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
        if self._split is not None:
            self._split.note_batch(batch)
        top_k = np.minimum(np.asarray(top_k, dtype=np.int64).reshape(-1), self.n_items)
        kmax = int(top_k.max()) if batch else 0
        owners, excluded = self._exclusions(user_ids, exclude, exclude_seen)
        if len(owners):
            excluded_keys = np.unique(owners * self.n_items + excluded)
            per_row = np.bincount(excluded_keys // self.n_items, minlength=batch)
            wanted, deepest = np.minimum(top_k, self.n_items - per_row), int(per_row.max())
        else:  # the usual request: nothing to leave out
            excluded_keys, wanted, deepest = None, top_k, 0
        depth = int(min(self.n_items, kmax + deepest + TIE_MARGIN)) if batch else 0

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

        if in_answer_order(scores, keep):  # FAISS's own order is the answer's: no sort needed
            rows, scores, keep = rows[:, :kmax], scores[:, :kmax], keep[:, :kmax]
        else:
            order = np.lexsort((rows, -scores, ~keep), axis=1)[:, :kmax]
            rows = np.take_along_axis(rows, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
            keep = np.take_along_axis(keep, order, axis=1)
        valid = keep & (np.arange(kmax)[None, :] < top_k[:, None])
        ids = np.where(valid, self._item_ids[np.maximum(rows, 0)], -1)
        return ids, np.where(valid, scores, PAD_SCORE).astype(np.float32)

    def _keep(self, rows: np.ndarray, batch_rows: np.ndarray, excluded_keys: np.ndarray | None) -> np.ndarray:
        keep = rows >= 0
        if excluded_keys is not None:
            keys = batch_rows[:, None] * self.n_items + rows
            keep &= ~np.isin(keys, excluded_keys)
        return keep

    def _raw_search(self, queries: np.ndarray, depth: int, widen: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search; widen > 1 multiplies nprobe / efSearch for this call only.

        A GPU index searches at most GPU_MAX_SELECTION_K deep; deeper calls, and wider probes
        (which GPU FAISS takes no per-call parameters for), use the CPU copy of the index.
        """
        if depth == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        deep = self._device_max_k is not None and depth > self._device_max_k
        index = self._cpu_index if (deep or widen > 1) else self._index
        search = self._split.search if self._split is not None and index is self._cpu_index else index.search
        if widen == 1:
            return search(queries, depth)
        ivf = ivf_of(index)
        if ivf is not None:
            owner, attr, value = ivf, "nprobe", min(ivf.nlist, ivf.nprobe * widen)
            # IndexRefine takes only its own parameter type; the probe is set on its IVF instead.
            refine = isinstance(index, faiss.IndexRefine)
            params = faiss.SearchParametersIVF(nprobe=value) if SEARCH_PARAMETERS and not refine else None
        elif isinstance(index, faiss.IndexHNSW):
            owner, attr, value = index.hnsw, "efSearch", index.hnsw.efSearch * widen
            params = faiss.SearchParametersHNSW(efSearch=value) if SEARCH_PARAMETERS else None
        else:
            return index.search(queries, depth)
        if params is not None:
            return index.search(queries, depth, params=params)
        # FAISS < 1.7.3, or an IndexRefine: set the wider probe on the index for this call and put it back. A model
        # instance runs one batch at a time, so no other search sees the change.
        before = getattr(owner, attr)
        setattr(owner, attr, value)
        try:
            return search(queries, depth)
        finally:
            setattr(owner, attr, before)

    def run(self, columns: dict) -> dict:
        ids, scores = self.search(columns[QUERY_EMBEDDING], columns[TOP_K], columns.get(contract.INPUT_USER_ID),
                                  columns.get(contract.INPUT_EXCLUDE), columns.get(EXCLUDE_SEEN))
        return {contract.OUTPUT_ITEM_IDS: ids, contract.OUTPUT_SCORES: scores}
