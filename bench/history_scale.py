"""The history step's cost at a given size: each training positive's previous N positives and each
user's latest N (train.history), on random arrays shaped like the seed-size preset's.

    python -m bench.history_scale --positives 4188840 --users 199953 --items 489198 --length 20
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from train.history import latest_items, previous_items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positives", type=int, default=4_188_840)
    parser.add_argument("--users", type=int, default=199_953)
    parser.add_argument("--items", type=int, default=489_198)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    users = rng.integers(0, args.users, args.positives)
    items = rng.integers(3, args.items + 3, args.positives).astype(np.int32)
    key = rng.random(args.positives)
    started = time.perf_counter()
    rows = previous_items(users, items, key, args.length)
    per_row = time.perf_counter() - started
    started = time.perf_counter()
    latest_items(users, items, key, args.length, args.users)
    per_user = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"previous_items: {args.positives:,} positives x up to {args.length} in {per_row:.1f} s "
          f"({args.positives / per_row:,.0f} rows/s, {len(rows.values):,} ids); latest_items: {per_user:.1f} s; "
          f"peak RSS {peak:,.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
