"""Progress bars for long work: units and rates, quiet for short work and in captured output."""

from __future__ import annotations

import contextlib
import os
import sys

from tqdm import tqdm

# Below this many units a bar is not worth a line; RETRIEVAL_PROGRESS=0 silences every bar.
MIN_TOTAL = 1_000_000


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, min_total: int = MIN_TOTAL):
    """A tqdm bar on stderr with `unit`/s, or a no-op for small totals.

    Bars refresh at most every 5 s so that logs written to files stay short.

    Args:
        total: units of work expected.
        desc: what is being done (shown before the bar).
        unit: the unit counted (rows, users, steps).
        min_total: totals below it get no bar.
    """
    disabled = total < min_total or os.environ.get("RETRIEVAL_PROGRESS", "1") == "0"
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, mininterval=5.0, disable=disabled,
              file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield bar
