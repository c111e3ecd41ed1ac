"""CLI: ask the retrieval server for users' top-k items.

    python -m client --url 127.0.0.1:8001 --user-id 11 42 7 --top-k 10 --json
    python -m client --http --url 127.0.0.1:8000 --user-id 11 --exclude 11:38252,9585
    python -m client --user-id 99999 --feature user_age=3 --feature user_gender=1   # a new user
    python -m client --user-id 99999 --history 12,40,7    # their latest clicks (a model with a history input)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.cli import int64, run_cli
from common.errors import ClientError


def _exclusion(text: str) -> tuple[int, list[int]]:
    user, sep, items = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--exclude expects USER:ITEM[,ITEM...], got {text!r}")
    try:
        return int64(user), [int64(i) for i in items.split(",") if i.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--exclude expects INT64 integer ids, got {text!r}") from e


def _history(text: str) -> tuple[int | None, list[int]]:
    user, sep, items = text.rpartition(":")
    try:
        return (int64(user) if sep else None), [int64(i) for i in items.split(",") if i.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--history expects [USER:]ITEM[,ITEM...] with INT64 integer ids, got {text!r}") from e


def _feature(text: str) -> tuple[str, list[int | None]]:
    name, sep, values = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--feature expects NAME=VALUE[,VALUE...], got {text!r}")
    try:
        return name, [None if v.strip() in ("", "-") else int(v) for v in values.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--feature expects integer values (or - for none), got {text!r}") from e


def history_lists(given: list[tuple[int | None, list[int]]], user_ids: list[int]) -> list[list[int]] | None:
    """--history values -> one list per --user-id (None when none was given); a value without
    USER: goes to every user, values for the same user are joined in order."""
    if not given:
        return None
    history: dict[int, list[int]] = {u: [] for u in user_ids}
    for user, items in given:
        if user is not None and user not in history:
            raise ClientError(f"--history names user {user}, who is not among --user-id {user_ids}")
        for u in ([user] if user is not None else history):
            history[u] = history[u] + items
    return [history[u] for u in user_ids]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="host:port (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--http", action="store_true", help="use HTTP/REST instead of gRPC")
    parser.add_argument("--user-id", dest="user_ids", type=int64, nargs="+", required=True, metavar="ID", help="raw user ids")
    parser.add_argument("--top-k", type=int, help="items per user (server default when omitted)")
    parser.add_argument("--exclude", type=_exclusion, action="append", default=[], metavar="USER:ITEM,...",
                        help="raw item ids to leave out for one user (repeatable)")
    parser.add_argument("--exclude-seen", action="store_true", help="leave out items each user clicked in training")
    parser.add_argument("--feature", type=_feature, action="append", default=[], metavar="NAME=V[,V...]",
                        help="raw user feature, one value per user (- for none); replaces the stored value (repeatable)")
    parser.add_argument("--history", type=_history, action="append", default=[], metavar="[USER:]ITEM,...",
                        help="latest raw item ids, oldest first, for one user (USER:) or every user; "
                             "appended to the stored history (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--catalogue", type=Path, help="item_ids.npy of the artifacts: fail if an id is outside it")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from client.client import RetrievalClient

    args = parse_args(argv)
    per_user = {}
    for user, items in args.exclude:
        if user not in args.user_ids:
            raise ClientError(f"--exclude names user {user}, who is not among --user-id {args.user_ids}")
        per_user.setdefault(user, []).extend(items)
    exclude = [per_user.get(u, []) for u in args.user_ids] if per_user else None
    features = dict(args.feature)
    for name, values in features.items():
        if len(values) == 1 and len(args.user_ids) > 1:
            features[name] = values * len(args.user_ids)
    history = history_lists(args.history, args.user_ids)
    protocol = "http" if args.http else "grpc"
    with RetrievalClient(args.url, protocol, timeout_s=args.timeout_s) as client:
        recs = client.recommend(args.user_ids, top_k=args.top_k, exclude=exclude, exclude_seen=args.exclude_seen or None,
                                features=features or None, history=history)
    catalogue = np.load(args.catalogue) if args.catalogue else None
    recs.check(args.top_k, catalogue)
    for user, items in per_user.items():
        row = recs.item_ids[args.user_ids.index(user)]
        if np.isin(row, items).any():
            raise ClientError(f"user {user}: the answer holds excluded items {np.intersect1d(row, items).tolist()}")
    if args.json:
        print(json.dumps({"url": client.url, "protocol": protocol, "results": recs.as_dicts()}, indent=2))
    else:
        for row in recs.as_dicts():
            flag = " (unknown user)" if row["unknown_user"] else ""
            pairs = "  ".join(f"{i}:{s:.4f}" for i, s in zip(row["item_ids"], row["scores"]))
            print(f"user {row['user_id']}{flag}: {pairs}")
    return 0


if __name__ == "__main__":
    run_cli(main)
