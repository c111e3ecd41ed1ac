"""Loads a dataset declared in the config (`data.source: files`) into the pipeline's raw shape.

Interactions come from a parquet or CSV file (or a folder of them); user and item features may
sit in the interactions or in separate tables joined on the ids. The serving contract takes
integer raw ids and feature values (INT64), so:
  - the user and item id columns must hold integers;
  - a feature column of text is mapped to integers 1..n in sorted order of its values, and the
    mapping is written to `vocabularies.json` (and exported with the artifacts) so that clients
    can send a new user's features;
  - an absent feature value (a missing row in a table, an empty cell) becomes 0, a category of
    its own, as in the Ali-CCP converter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.errors import DataError

LOG = logging.getLogger(__name__)

VOCABULARIES = "vocabularies.json"
ABSENT = 0


def read_table(path: str | Path) -> pd.DataFrame:
    """A parquet or CSV file, or a folder of them."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".csv"))
        if not parts:
            raise DataError(f"{path} holds no .parquet or .csv files")
        return pd.concat([read_table(p) for p in parts], ignore_index=True)
    if not path.is_file():
        raise DataError(f"declared data file {path} does not exist")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise DataError(f"{path}: expected a .parquet or .csv file")


def _join(df: pd.DataFrame, table_path: str | None, key: str, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    if not table_path:
        return df
    table = read_table(table_path)
    missing = [c for c in (key, *columns) if c not in table.columns]
    if missing:
        raise DataError(f"{what} table {table_path} lacks the declared columns {missing}; it has {list(table.columns)}")
    if table[key].duplicated().any():
        raise DataError(f"{what} table {table_path} has repeated {key} values; one row per {what} is expected")
    df = df.drop(columns=[c for c in columns if c in df.columns])
    return df.merge(table[[key, *columns]], on=key, how="left")


def load_declared(cfg: DataConfig, out_dir: Path) -> pd.DataFrame:
    """The declared interactions with their features, integer-valued, ready to split."""
    df = read_table(cfg.interactions)
    for column in (cfg.user_id, cfg.item_id):
        if column not in df.columns:
            raise DataError(f"declared interactions {cfg.interactions} lack the id column {column!r}; they have {list(df.columns)}")
        if df[column].isna().any() or not pd.api.types.is_integer_dtype(df[column]):
            raise DataError(f"{column} must hold integers (the serving contract's ids are INT64); got {df[column].dtype}")
    df = _join(df, cfg.users_table, cfg.user_id, cfg.user_features, "user")
    df = _join(df, cfg.items_table, cfg.item_id, cfg.item_features, "item")
    wanted = [cfg.user_id, cfg.item_id, *cfg.user_features, *cfg.item_features, cfg.label, *([cfg.timestamp] if cfg.timestamp else [])]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(f"declared interactions lack the columns {missing}; they have {list(df.columns)}")
    df = df[wanted].copy()
    vocabularies = {}
    for column in (*cfg.user_features, *cfg.item_features):
        values = df[column]
        if pd.api.types.is_numeric_dtype(values) and (values.dropna() == values.dropna().round()).all():
            df[column] = values.fillna(ABSENT).astype(np.int64)
        else:
            text = values.astype("string")
            levels = sorted(text.dropna().unique())
            mapping = {level: i + 1 for i, level in enumerate(levels)}
            df[column] = text.map(mapping).fillna(ABSENT).astype(np.int64)
            vocabularies[column] = mapping
    if not pd.api.types.is_numeric_dtype(df[cfg.label]):
        raise DataError(f"label {cfg.label} must be numeric, got {df[cfg.label].dtype}")
    if cfg.timestamp and not pd.api.types.is_numeric_dtype(df[cfg.timestamp]):
        df[cfg.timestamp] = pd.to_datetime(df[cfg.timestamp]).astype("int64") // 10**9
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / VOCABULARIES).write_text(json.dumps(vocabularies, indent=1))
    LOG.info("declared dataset: %d interactions, %d users, %d items, %d positives; text features mapped: %s",
             len(df), df[cfg.user_id].nunique(), df[cfg.item_id].nunique(), int(cfg.is_positive(df[cfg.label]).sum()),
             sorted(vocabularies) or "none")
    return df
