"""Converts the real Ali-CCP raw CSV files (Tianchi) into our raw parquet splits.

Tianchi's folder holds `train/sample_skeleton_train.csv`, `train/common_features_train.csv` and
the `test/` pair. A skeleton line is `sample_id,click,conversion,common_index,n,features` and a
common-features line is `common_index,n,features`; `features` is a \\x01-separated list of
`field\\x02feature_id\\x03value`. The user fields live in the common features, the item fields
in the skeleton.

merlin-models ships `prepare_aliccp` for this, with bugs this module avoids (a test shows them):
the rows after the last full `file_size` chunk are never written (a sample smaller than one
chunk yields no file at all and then an error), and fields absent from a line become nulls that
NVTabular's CPU Categorify cannot encode later. Here every row is written, and absent fields get
the value 0, a category of its own. Multi-valued fields keep their last value, as merlin does.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import ALICCP_ITEM_FEATURES, ALICCP_USER_FEATURES, DataConfig
from common.errors import DataError

LOG = logging.getLogger(__name__)

# Ali-CCP field ids of the columns we keep (merlin's mapping).
USER_FIELDS = {
    "101": "user_id", "109_14": "user_categories", "110_14": "user_shops", "127_14": "user_brands",
    "150_14": "user_intentions", "121": "user_profile", "122": "user_group", "124": "user_gender",
    "125": "user_age", "127": "user_consumption_2", "128": "user_is_occupied", "129": "user_geography",
}
ITEM_FIELDS = {"205": "item_id", "206": "item_category", "207": "item_shop", "216": "item_brand"}
ABSENT = 0
CHUNK_ROWS = 200_000
PROGRESS_EVERY = 1_000_000  # lines between progress lines (the real train skeleton has 42M)
COLUMNS = ["user_id", *ALICCP_USER_FEATURES, "item_id", *ALICCP_ITEM_FEATURES, "click"]


def parse_features(text: str, fields: dict[str, str]) -> dict[str, int]:
    """`field\\x02id\\x03value\\x01...` -> {column: feature id} for the wanted fields."""
    out = {}
    for entry in text.split("\x01"):
        field, _, rest = entry.partition("\x02")
        column = fields.get(field)
        if column is not None:
            out[column] = int(rest.partition("\x03")[0])
    return out


def read_common_features(path: Path) -> dict[str, dict[str, int]]:
    """common_index -> the user's feature ids."""
    common = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split(",", 2)
            if len(parts) != 3:
                raise DataError(f"{path}:{n}: expected 3 comma-separated fields, got {len(parts)}")
            common[parts[0]] = parse_features(parts[2], USER_FIELDS)
    LOG.info("read %d common-feature rows from %s", len(common), path)
    return common


def convert_split(folder: Path, split: str, out_path: Path, max_rows: int | None = None) -> int:
    """Streams one split's skeleton into a parquet file, chunk by chunk; returns rows written."""
    skeleton = folder / split / f"sample_skeleton_{split}.csv"
    common_path = folder / split / f"common_features_{split}.csv"
    for path in (skeleton, common_path):
        if not path.is_file():
            raise DataError(f"Ali-CCP file {path} is missing (expected Tianchi's layout {folder}/{split}/...)")
    common = read_common_features(common_path)
    schema = pa.schema([(c, pa.int64()) for c in COLUMNS])
    rows, written, missing_common = [], 0, 0
    started = time.perf_counter()
    with open(skeleton, encoding="utf-8") as f, pq.ParquetWriter(out_path, schema) as writer:
        for n, line in enumerate(f, 1):
            if max_rows is not None and n > max_rows:
                break
            if n % PROGRESS_EVERY == 0:
                LOG.info("%s: %d lines read, %d rows written (%.0f lines/s)", skeleton.name, n, written, n / (time.perf_counter() - started))
            parts = line.rstrip("\n").split(",", 5)
            if len(parts) != 6:
                raise DataError(f"{skeleton}:{n}: expected 6 comma-separated fields, got {len(parts)}")
            click, conversion = int(parts[1]), int(parts[2])
            if click == 0 and conversion == 1:
                continue  # a conversion without a click is an invalid record in Ali-CCP
            user = common.get(parts[3])
            if user is None:
                missing_common += 1
                user = {}
            record = {**user, **parse_features(parts[5], ITEM_FIELDS), "click": click}
            rows.append([record.get(c, ABSENT) for c in COLUMNS])
            if len(rows) >= CHUNK_ROWS:
                writer.write_table(pa.Table.from_arrays(list(np.array(rows, dtype=np.int64).T), schema=schema))
                written += len(rows)
                rows = []
        if rows:
            writer.write_table(pa.Table.from_arrays(list(np.array(rows, dtype=np.int64).T), schema=schema))
            written += len(rows)
    if missing_common:
        LOG.warning("%s: %d rows referenced unknown common features (user fields set to %d)", skeleton, missing_common, ABSENT)
    LOG.info("converted %d %s rows from %s", written, split, skeleton)
    return written


def convert_aliccp(folder: str | Path, cfg: DataConfig, out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tianchi's train split becomes our training split and its test split our validation split.

    The converted files are written to out_dir (the input folder is only read).
    """
    folder, out_dir = Path(folder), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for split in ("train", "test"):
        out = out_dir / f"aliccp_{split}.parquet"
        convert_split(folder, split, out, cfg.aliccp_max_rows)
        frames.append(pd.read_parquet(out))
    return frames[0], frames[1]
