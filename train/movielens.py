"""MovieLens-100k as declared-dataset files, taken from the recbole wheel on PyPI.

GroupLens' own site is out of reach from these machines, but recbole ships ml-100k in its
wheel (`recbole/dataset_example/ml-100k`). This downloads that wheel (not installed, no
dependencies), reads the three atomic files and writes interactions.csv (user_id, item_id,
rating, timestamp), users.csv (user_id, age, gender, occupation, zip_code) and items.csv
(item_id, release_year, genre: the first of the movie's genres). `configs/movielens-100k.yaml`
declares them.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from common.errors import DataError

LOG = logging.getLogger(__name__)

WHEEL = "recbole==1.2.1"
PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


def _atomic(z: zipfile.ZipFile, suffix: str) -> pd.DataFrame:
    """A recbole atomic file: tab-separated, header `name:type`."""
    with z.open(f"{PREFIX}.{suffix}") as f:
        frame = pd.read_csv(io.TextIOWrapper(f, encoding="utf-8"), sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def fetch_movielens(out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", WHEEL, "-d", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"could not download {WHEEL} from PyPI: {done.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            inter, users, items = (_atomic(z, s) for s in ("inter", "user", "item"))
    inter = inter.astype({"user_id": int, "item_id": int, "rating": float, "timestamp": float}).astype({"timestamp": int})
    users = users.astype({"user_id": int, "age": int})
    items = pd.DataFrame({
        "item_id": items["item_id"].astype(int),
        "release_year": pd.to_numeric(items["release_year"], errors="coerce").fillna(0).astype(int),
        "genre": items["class"].str.split(" ").str[0].replace("", "unknown"),
    })
    paths = {"interactions": out / "interactions.csv", "users": out / "users.csv", "items": out / "items.csv"}
    inter[["user_id", "item_id", "rating", "timestamp"]].to_csv(paths["interactions"], index=False)
    users[["user_id", "age", "gender", "occupation", "zip_code"]].to_csv(paths["users"], index=False)
    items.to_csv(paths["items"], index=False)
    LOG.info("MovieLens-100k: %d ratings, %d users, %d items -> %s", len(inter), len(users), len(items), out)
    return paths
