"""One query's IVF cells searched by all of FAISS's threads, for a large IVF-PQ catalogue.

FAISS searches a batch one query per thread, so a one-user request (every request at
concurrency 1) scans its cells on one core while the others wait. FAISS 1.8's fast-scan search
`implem` 14 splits one query's cells over the threads instead: at 10M items (97k codes a query)
it cut the search after an idle millisecond from 0.68-0.77 to 0.60-0.66 ms; at 1M (23k codes,
held in cache) it made it slower (0.34-0.38 against 0.30), hence `serve.probe_split_min_codes`.

Its threads merge their candidates in whatever order they finish, so candidates tied in the
4-bit distance at the last place of the list come back in a different order from run to run,
and an IndexRefine would re-rank a different list. Here the fast-scan index is asked for a few
more candidates than IndexRefine would take (`SPLIT_EXTRA`), the group tied at the last place is
dropped, and what is left is exactly the set of items scoring above that last value: the same
set whatever the threads did, and whatever `implem` a batch of several queries uses. That set is
re-ranked from the index's fp16 copy of each vector in one numba call, one row's sums never mixed
with another's, and ordered by (score, catalogue row). A row left with too few (a tie group wider
than the margin) is searched again deeper by the same rule. So, for the same depth (a batch
searches as deep as its deepest row needs, as before), a user's answer is the same on any run,
split or not, alone or in a batch, and on FAISS 1.7.2 (the Merlin 23.08 container), which has no
`implem` 14 and searches one query per thread with the same answers. The answers are not those
of the index's own IndexRefine search: its list is cut at k x k_factor whatever ties there, and
its re-rank sums in another order.
"""

from __future__ import annotations

import faiss
import numba
import numpy as np
from numba.extending import register_jitable

# FAISS's fast-scan search that splits one query's cells over the OpenMP threads (heap collector;
# 1.7.3 on); 1.7.2 raises "implem 14 does not exist".
SPLIT_IMPLEM = 14
# A one-query batch is split only when this many batches before it held one query each too: under
# load the dynamic batcher merges requests, the other cores are busy, and splitting a lone query
# there cost throughput (10M items, concurrency 8: 1,328-1,412 against 1,424-1,501 infer/s).
LONE_BATCHES = 4
# Candidates asked for beyond IndexRefine's k x k_factor, so that dropping the group tied at the
# last place leaves about as many as IndexRefine re-ranks (the group is 1-6 items on user queries).
SPLIT_EXTRA = 8


def split_unsupported(index: faiss.Index, min_codes: int) -> str | None:
    """Why `index` is not searched with its cells split over the threads, or None when it is.

    It is when the index is an inner-product IVF-PQ fast-scan index (blocks of 32, sub-vectors under
    16 dimensions: each query's lookup tables then come out the same alone or in a batch) re-ranked
    from fp16 vectors (what `index.kind: ivf_pq` builds), FAISS runs more than one thread, and a
    query scans at least `min_codes` codes on average (ntotal x nprobe / nlist; 0 turns it off).
    """
    if min_codes <= 0:
        return "serve.probe_split_min_codes is 0"
    if not isinstance(index, faiss.IndexRefine):
        return "the index is not re-ranked (IndexRefine)"
    base, refine = faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
    if not isinstance(base, faiss.IndexIVFPQFastScan):
        return f"the index's first stage is {type(base).__name__}, not IndexIVFPQFastScan"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "the index does not rank by inner product"
    if base.bbs != 32 or base.pq.dsub >= 16:
        return f"the fast-scan index has blocks of {base.bbs} and {base.pq.dsub}-dimension sub-vectors (32 and under 16 split)"
    if not (isinstance(refine, faiss.IndexScalarQuantizer) and refine.sq.qtype == faiss.ScalarQuantizer.QT_fp16):
        return "the index is not re-ranked from fp16 vectors"
    if faiss.omp_get_max_threads() < 2:
        return "FAISS runs one thread (serve.threads)"
    codes = expected_codes(index)
    if codes < min_codes:
        return f"a query scans {codes:,.0f} codes, under serve.probe_split_min_codes={min_codes:,}"
    return None


def expected_codes(index: faiss.IndexRefine) -> float:
    """Codes one query of an IndexRefine(IVF...) scans on average: ntotal x nprobe / nlist."""
    base = faiss.downcast_index(index.base_index)
    return index.ntotal * base.nprobe / max(1, base.nlist)


def split_capable(base: faiss.Index) -> bool:
    """Whether this FAISS has the split search (`implem` 14): 1.7.3 on does, 1.7.2 does not."""
    before = base.implem
    base.implem = SPLIT_IMPLEM
    try:
        base.search(np.zeros((1, base.d), np.float32), 1)
        return True
    except RuntimeError:
        return False
    finally:
        base.implem = before


# 2**(e - 25) for a half's exponent field e: a normal half is (1024 + mantissa) x this, exactly.
_HALF_SCALE = np.array([2.0 ** (e - 25) for e in range(32)], np.float32)


@register_jitable
def half_to_float(h):
    """An IEEE half's bits (as an int) -> its float32 value, exactly (numba has no float16)."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(2.0 ** -24)  # zero and subnormals
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(m + 1024) * _HALF_SCALE[e]
    return -v if h & 0x8000 else v


@numba.njit(nogil=True, cache=False)
def rerank(queries, coarse, rows, halves, depth, whole):
    """Each row's candidates above its list's last fast-scan value (every candidate when the list is
    short or `whole`, the whole catalogue), scored from their fp16 vectors (`halves`, the bits) in
    float32 (NaN as -inf), the best `depth` by (score, catalogue row).

    Returns (scores, rows) [n, depth], -inf / -1 padded, and per row whether it kept fewer than
    `depth` from a cut list (a tie group too wide to leave enough). Compiled by numba at its first
    call (SplitRefineSearch makes it at load): on the request path each numpy call runs with the
    caches the scan has just emptied, some 20-30 us apiece, and this is one call for the batch.
    """
    n, width = rows.shape
    dim = queries.shape[1]
    out_scores = np.full((n, depth), -np.inf, np.float32)
    out_rows = np.full((n, depth), -1, np.int64)
    short = np.zeros(n, np.bool_)
    scores = np.empty(width, np.float32)
    kept = np.empty(width, np.int64)
    for i in range(n):
        cut = not whole and rows[i, width - 1] >= 0
        last = coarse[i, width - 1]
        count = 0
        for j in range(width):
            row = rows[i, j]
            if row < 0 or (cut and not coarse[i, j] > last):
                continue
            score = np.float32(0.0)
            for t in range(dim):
                score += half_to_float(np.int64(halves[row, t])) * queries[i, t]
            scores[count] = score if score == score else -np.inf
            kept[count] = row
            count += 1
        # best first, ties by catalogue row: sort by row, then stably by score
        by_row = np.argsort(kept[:count], kind="mergesort")
        order = by_row[np.argsort(-scores[:count][by_row], kind="mergesort")]
        take = min(count, depth)
        out_scores[i, :take] = scores[:count][order[:take]]
        out_rows[i, :take] = kept[:count][order[:take]]
        short[i] = cut and count < depth
    return out_scores, out_rows, short


class SplitRefineSearch:
    """IndexRefine(IVF-PQ fast-scan, fp16) searched with one query's cells split over the threads.

    Use `split_unsupported` first; `split` is False where this FAISS lacks `implem` 14, and then
    every query runs on one thread with the same answers. A one-query request is split only after
    LONE_BATCHES one-query requests in a row (concurrency 1, not a loaded server; `note_batch`).
    """

    def __init__(self, index: faiss.IndexRefine):
        self.index = index  # keeps the refine index, whose memory `halves` reads, alive
        self.base = faiss.downcast_index(index.base_index)
        refine = faiss.downcast_index(index.refine_index)
        # The fp16 vectors, read in place (no copy of the 1.3 GB a 10M catalogue's take), read-only.
        raw = faiss.rev_swig_ptr(refine.codes.data(), refine.ntotal * refine.code_size)
        self.halves = raw.view(np.uint16).reshape(refine.ntotal, refine.d)
        self.halves.flags.writeable = False
        self.split = split_capable(self.base)
        self.lone = 0  # how many requests in a row held one query (up to LONE_BATCHES)
        self.split_now = False  # whether this request's lone query is split (note_batch)
        self.search(np.zeros((1, index.d), np.float32), 1)  # numba compiles `rerank` now, not at the first request

    def note_batch(self, n: int) -> None:
        """A request's batch of `n` queries begins: its lone query is split after LONE_BATCHES lone ones."""
        self.split_now = self.split and n == 1 and self.lone >= LONE_BATCHES
        self.lone = min(self.lone + 1, LONE_BATCHES) if n == 1 else 0

    def candidates(self, depth: int) -> int:
        """Fast-scan candidates asked for a search `depth` deep (IndexRefine's, and SPLIT_EXTRA)."""
        return min(self.index.ntotal, max(depth, int(depth * self.index.k_factor)) + SPLIT_EXTRA)

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, catalogue rows), [n, depth] each, best first, ties by row; row -1 pads.

        A row left with fewer than `depth` by a tie group wider than the margin (many identical
        vectors) is searched again 4 times as deep, by the same rule, until it has enough or the
        list holds the whole catalogue.
        """
        width = self.candidates(depth)
        scores, rows, short = self._search(queries, depth, width)
        while (again := np.flatnonzero(short)).size:
            width = min(self.index.ntotal, width * 4)
            scores[again], rows[again], short[again] = self._search(queries[again], depth, width)
        return scores, rows

    def _search(self, queries: np.ndarray, depth: int, width: int):
        self.base.implem = SPLIT_IMPLEM if self.split_now and len(queries) == 1 else 0
        try:
            coarse, rows = self.base.search(queries, width)
        finally:
            self.base.implem = 0
        # A full list that is not the whole catalogue may end inside a tie group: that group is dropped.
        return rerank(queries, coarse, rows, self.halves, depth, width >= self.index.ntotal)
