"""NVTabular ETL: Categorify ids and features, tag users and items, keep positives.

The fitted feature workflow is what serving runs, so it holds no Filter: the positives-only
step filters its output frames (a Filter on the label cannot run on a request, which carries no
label). Categorify is fitted on every training impression, clicked or
not, so that the catalogue holds every item users were shown.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nvtabular as nvt
import pandas as pd
from merlin.io import Dataset
from merlin.schema import Tags
from nvtabular import ops

from common import contract
from common.config import DataConfig
from common.errors import DataError

LOG = logging.getLogger(__name__)

TRAIN_DIR = "train"
VALID_DIR = "valid"
USERS_RAW = "users_raw.parquet"
USERS_ENCODED = "users_encoded.parquet"
ITEMS_RAW = "items_raw.parquet"
ITEMS_ENCODED = "items_encoded.parquet"


@dataclass(frozen=True)
class EtlResult:
    """Paths and sizes of the ETL output.

    Attributes:
        workflow_dir: the fitted feature workflow (nvt.Workflow.save).
        train_dir: encoded positive training interactions (parquet).
        valid_dir: encoded positive validation interactions (parquet).
        train_rows: positive training rows written.
        valid_rows: positive validation rows written.
        rows_per_s: input impressions processed per second (fit + both transforms).
        input_rows: input impressions (train and valid).
        workers: Dask workers the ETL ran on (0: in this process).
    """

    workflow_dir: Path
    train_dir: Path
    valid_dir: Path
    train_rows: int
    valid_rows: int
    rows_per_s: float
    input_rows: int = 0
    workers: int = 0

    @property
    def root(self) -> Path:
        return self.workflow_dir.parent


def read_encoded(folder: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Reads an ETL output folder (parquet parts beside merlin's schema files) into pandas."""
    parts = sorted(Path(folder).glob("*.parquet"))
    if not parts:
        raise DataError(f"{folder} holds no parquet files")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)


def feature_workflow(cfg: DataConfig, stats_dir: Path) -> nvt.Workflow:
    """The workflow of the seed notebook without its Filter: Categorify plus user/item tags.

    Args:
        stats_dir: where Categorify writes its vocabularies while fitting (NVTabular's default
            is ./categories in the working directory).
    """
    cat = lambda: ops.Categorify(dtype="int32", out_path=str(stats_dir))  # noqa: E731
    user_id = [cfg.user_id] >> cat() >> ops.TagAsUserID()
    item_id = [cfg.item_id] >> cat() >> ops.TagAsItemID()
    user_features = list(cfg.user_features) >> cat() >> ops.TagAsUserFeatures()
    item_features = list(cfg.item_features) >> cat() >> ops.TagAsItemFeatures()
    label = [cfg.label] >> ops.AddMetadata(tags=[Tags.BINARY_CLASSIFICATION, Tags.TARGET])
    return nvt.Workflow(user_id + item_id + user_features + item_features + label)


@contextlib.contextmanager
def dask_cluster(scheduler: str | None):
    """NVTabular's Dask client for the ETL: none, an existing scheduler, or a local cluster."""
    if not scheduler:
        yield None
        return
    from distributed import Client
    from merlin.core.utils import Distributed

    if scheduler.startswith("local:"):
        with Distributed(cluster_type="cpu", force_new=True, n_workers=int(scheduler[6:]), threads_per_worker=1,
                         processes=True, dashboard_address=None) as dist:
            LOG.info("ETL on a local Dask cluster of %d workers", len(dist.client.scheduler_info()["workers"]))
            yield dist.client
        return
    client = Client(scheduler)
    try:
        with Distributed(client=client):
            LOG.info("ETL on the Dask cluster at %s (%d workers)", scheduler, len(client.scheduler_info()["workers"]))
            yield client
    finally:
        client.close()


def user_workflow(workflow: nvt.Workflow, cfg: DataConfig) -> nvt.Workflow:
    """The user-side part of a fitted feature workflow: raw user columns in, encoded out.

    `Workflow.remove_inputs` edits the graph in place and returns it, so it works on a copy.
    """
    return copy.deepcopy(workflow).remove_inputs([*cfg.item_columns, cfg.label])


def item_workflow(workflow: nvt.Workflow, cfg: DataConfig) -> nvt.Workflow:
    """The item-side part of a fitted feature workflow (on a copy, as `user_workflow`)."""
    return copy.deepcopy(workflow).remove_inputs([*cfg.user_columns, cfg.label])


def _entity_tables(raw: Dataset, part: nvt.Workflow, columns: tuple[str, ...], out: Path, raw_name: str, encoded_name: str) -> int:
    """Writes one row per entity (its last training impression), raw and encoded, row-aligned."""
    ddf = raw.to_ddf()[list(columns)]
    table = ddf.drop_duplicates(subset=[columns[0]], keep="last").compute()
    table = table.sort_values(columns[0]).reset_index(drop=True)
    # `transform(Dataset)` of a `remove_inputs` workflow can fail in merlin 23.08 (a ConcatColumns
    # node loses its parents; IndexError in the Dask executor); the in-memory path is sound.
    encoded = part._transform_df(table).reset_index(drop=True)
    table.to_parquet(out / raw_name, index=False)
    encoded[list(columns)].to_parquet(out / encoded_name, index=False)
    return len(table)


def run_etl(cfg: DataConfig, train_path: str | Path, valid_path: str | Path, out_dir: str | Path) -> EtlResult:
    """Fits the feature workflow on the training split and writes encoded positives.

    Args:
        cfg: the data section (column names, label and its positive value).
        train_path: raw training impressions (parquet file or folder).
        valid_path: raw validation impressions.
        out_dir: folder for `workflow/`, `train/` and `valid/`.
    """
    with dask_cluster(cfg.dask_scheduler) as client:
        workers = len(client.scheduler_info()["workers"]) if client else 0
        result = _run_etl(cfg, train_path, valid_path, Path(out_dir))
    return dataclasses.replace(result, workers=workers)


def _run_etl(cfg: DataConfig, train_path, valid_path, out: Path) -> EtlResult:
    started = time.perf_counter()
    train_raw = Dataset(str(train_path), engine="parquet")
    valid_raw = Dataset(str(valid_path), engine="parquet")
    n_rows = train_raw.num_rows + valid_raw.num_rows

    workflow = feature_workflow(cfg, out / "fit_stats")
    workflow.fit(train_raw)
    workflow_dir = out / contract.ARTIFACT_WORKFLOW
    workflow.save(str(workflow_dir))

    n_users = _entity_tables(train_raw, user_workflow(workflow, cfg), cfg.user_columns, out, USERS_RAW, USERS_ENCODED)
    n_items = _entity_tables(train_raw, item_workflow(workflow, cfg), cfg.item_columns, out, ITEMS_RAW, ITEMS_ENCODED)
    LOG.info("feature tables: %d users, %d items", n_users, n_items)

    counts = {}
    for name, raw in ((TRAIN_DIR, train_raw), (VALID_DIR, valid_raw)):
        encoded = workflow.transform(raw)
        # The positives filter on the encoded frames directly: a second workflow's fit_transform
        # computes the feature workflow's transform twice per split (fit, then transform).
        ddf = encoded.to_ddf()
        kept = ddf[ddf[cfg.label] >= cfg.positive_min] if cfg.positive_min is not None else ddf[ddf[cfg.label] == cfg.positive_value]
        Dataset(kept, schema=encoded.schema).to_parquet(str(out / name), output_files=1)
        counts[name] = Dataset(str(out / name), engine="parquet").num_rows
    elapsed = time.perf_counter() - started
    LOG.info(
        "ETL: %d impressions in %.1f s (%.0f rows/s); %d train and %d valid positives",
        n_rows, elapsed, n_rows / elapsed, counts[TRAIN_DIR], counts[VALID_DIR],
    )
    return EtlResult(workflow_dir, out / TRAIN_DIR, out / VALID_DIR, counts[TRAIN_DIR], counts[VALID_DIR], n_rows / elapsed, n_rows)
