"""Progress for long work, with units and rates: a tqdm bar on a terminal, a log line otherwise.

Output captured to a file (CI, `make train > log`) gets one INFO line per 30 s instead of a bar's
carriage returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from tqdm import tqdm

LOG = logging.getLogger("progress")

# Below this many units progress is not worth a line; RETRIEVAL_PROGRESS=0 silences it all.
MIN_TOTAL = 1_000_000
LOG_EVERY_S = 30.0


class LogProgress:
    """tqdm's `update`/`disable` for captured output: a log line every LOG_EVERY_S seconds."""

    disable = False

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.started = 0, time.perf_counter()
        self.last = self.started

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            rate = self.n / (now - self.started)
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            LOG.info("%s: %s/%s %s (%.0f%%), %s %s/s, about %.0f s left", self.desc, f"{self.n:,}", f"{self.total:,}", self.unit,
                     100 * self.n / max(self.total, 1), f"{rate:,.0f}", self.unit, left)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, min_total: int = MIN_TOTAL):
    """Progress of `total` units of `unit`: tqdm on a terminal, log lines otherwise, nothing when small.

    Args:
        total: units of work expected.
        desc: what is being done.
        unit: the unit counted (rows, examples, scores).
        min_total: totals below it show no progress.
    """
    if total < min_total or os.environ.get("RETRIEVAL_PROGRESS", "1") == "0":
        with tqdm(total=total, disable=True) as bar:
            yield bar
        return
    if not sys.stderr.isatty():
        yield LogProgress(total, desc, unit)
        return
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, mininterval=5.0, file=sys.stderr,
              dynamic_ncols=True, leave=False) as bar:
        yield bar
