"""Training and ETL speed: our trainer against merlin-models' plain `fit` with the seed's settings."""

from __future__ import annotations

import logging
import time
from pathlib import Path

LOG = logging.getLogger(__name__)
SEED_BATCH = 4096  # the Merlin retrieval example: fit(train, batch_size=4096, epochs=1) with top-k metrics


def seed_fit_examples_per_s(etl_dir: Path, epochs: int = 2) -> dict:
    """Examples/s of the seed notebook's model and fit call on our ETL output (after one warm-up epoch).

    TwoTowerModelV2 with MLP [128, 64] towers on merlin's default embedding sizes, in-batch
    negatives, compiled with Recall@10 and NDCG@10 as training metrics, batch 4096.
    """
    import merlin.models.tf as mm
    import tensorflow as tf
    from merlin.io import Dataset

    from train.model import tower_schemas

    train = Dataset(str(etl_dir / "train"), engine="parquet")
    user_schema, item_schema = tower_schemas(train.schema)
    train.schema = user_schema + item_schema
    query = mm.Encoder(user_schema, mm.MLPBlock([128, 64], no_activation_last_layer=True))
    candidate = mm.Encoder(item_schema, mm.MLPBlock([128, 64], no_activation_last_layer=True))
    model = mm.TwoTowerModelV2(query, candidate)
    model.compile(optimizer="adam", run_eagerly=False, metrics=[mm.RecallAt(10), mm.NDCGAt(10)])
    model.fit(train, batch_size=SEED_BATCH, epochs=1, verbose=0)  # traces the graph
    started = time.perf_counter()
    model.fit(train, batch_size=SEED_BATCH, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    tf.keras.backend.clear_session()
    return {"examples_per_s": train.num_rows * epochs / seconds, "batch_size": SEED_BATCH, "epochs_timed": epochs}


def ours_from_manifest(manifest: dict) -> dict:
    """Our trainer's speed as recorded at training time (epochs after the first, fit time only)."""
    history = manifest["training"]["history"]
    later = [h["examples_per_s"] for h in history[1:]] or [h["examples_per_s"] for h in history]
    return {
        "examples_per_s": sorted(later)[len(later) // 2],
        "batch_size": manifest["config"]["train"]["batch_size"],
        "etl_rows_per_s": manifest["training"]["etl_rows_per_s"],
        "epochs": len(history),
    }
