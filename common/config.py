"""Typed pipeline configuration: defaults < YAML file < environment < command-line overrides.

Every field has a documented default and is validated in `__post_init__`. Unknown keys anywhere
are an error that lists the valid ones. Environment variables are `RETRIEVAL_<SECTION>__<FIELD>`,
for example `RETRIEVAL_TRAIN__EPOCHS=3`; overrides are `section.field=value` strings.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from common import contract
from common.errors import ConfigError

ENV_PREFIX = "RETRIEVAL_"

ALICCP_USER_FEATURES = (
    "user_shops",
    "user_profile",
    "user_group",
    "user_gender",
    "user_age",
    "user_consumption_2",
    "user_is_occupied",
    "user_geography",
    "user_intentions",
    "user_brands",
    "user_categories",
)
ALICCP_ITEM_FEATURES = ("item_category", "item_shop", "item_brand")


MAX_HISTORY = 200  # the most positives a query may pool (the request's history_item_ids width limit too)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where interactions come from and how they are split.

    Attributes:
        source: "synthetic" (our generator with known user/item tastes, the default),
            "merlin" (merlin's `generate_data("aliccp-raw")`, which has no signal),
            "aliccp" (the real Tianchi Ali-CCP raw CSV files in `aliccp_dir`), or
            "files" (any dataset declared by the fields below: `interactions`, optional
            `users_table` / `items_table`, the column names, the label and `timestamp`).
        aliccp_dir: folder holding `train/sample_skeleton_train.csv` and
            `train/common_features_train.csv` (and the `test/` pair) from Tianchi.
        aliccp_max_rows: read at most this many skeleton rows per split (None: all).
        interactions: source=files: interactions as a parquet or CSV file (or a folder of them),
            one row per interaction with the user id, the item id, the label and optionally
            the timestamp and any feature columns.
        users_table: source=files: optional parquet/CSV with the user id and user features.
        items_table: source=files: optional parquet/CSV with the item id and item features.
        timestamp: optional timestamp column; when set, each user's latest interactions are
            held out (a split by time), otherwise a random share of each user's.
        num_users: users generated (synthetic sources).
        num_items: items generated (synthetic sources).
        num_impressions: impression rows generated, clicked or not (synthetic sources).
        latent_dim: size of the hidden taste vectors behind the synthetic clicks.
        popularity_exponent: Zipf exponent of item exposure (synthetic; 1.0 is a steep head).
        personal_taste: weight of each user's own taste against the one shared with their
            demographic group (synthetic; 0 makes users of a group identical).
        affinity_scale: how sharply clicks follow the user-item affinity (synthetic).
        valid_fraction: share of each user's held-out candidates (see `holdout`) held out for
            validation.
        holdout: what can be held out: "all" interactions (impressions, clicked or not) or
            "positives" only (every non-positive then stays in training).
        holdout_by: "time" (each user's latest, needs `timestamp`), "random", or "auto" (time
            when `timestamp` is set, random otherwise).
        holdout_min: at least this many held out per user who has more candidates than that
            (users with fewer stay entirely in training).
        seen: what each user's full-catalogue ranking leaves out, for every method alike: their
            training "positives", or "all" their training interactions (ratings: a user rates a
            movie once, so the low-rated ones cannot come back either).
        cold_users: users (a seeded sample of those with a positive) removed before training
            entirely, with every interaction, into `cold.parquet`: the new users of the
            cold-start evaluation. At most a fifth of those users are taken.
        seed: seed of every random draw in data generation and splitting.
        user_id: column holding the user id.
        item_id: column holding the item id.
        user_features: categorical user feature columns (the query tower's inputs besides the id).
        item_features: categorical item feature columns.
        label: interaction label column.
        positive_value: label value that marks a positive interaction.
        positive_min: when set, a label >= positive_min marks a positive instead (ratings, say).
        dask_scheduler: run the NVTabular ETL on a Dask cluster: a scheduler address
            (tcp://host:8786), or "local:N" for a local cluster of N worker processes made for
            the run. None (the default) runs it in this process.
    """

    source: str = "synthetic"
    aliccp_dir: str | None = None
    aliccp_max_rows: int | None = None
    interactions: str | None = None
    users_table: str | None = None
    items_table: str | None = None
    timestamp: str | None = None
    num_users: int = 5_000
    num_items: int = 2_000
    num_impressions: int = 250_000
    latent_dim: int = 8
    popularity_exponent: float = 0.7
    personal_taste: float = 0.7
    affinity_scale: float = 12.0
    valid_fraction: float = 0.2
    holdout: str = "all"
    holdout_by: str = "auto"
    holdout_min: int = 0
    seen: str = "positives"
    cold_users: int = 200
    seed: int = 42
    user_id: str = "user_id"
    item_id: str = "item_id"
    user_features: tuple[str, ...] = ALICCP_USER_FEATURES
    item_features: tuple[str, ...] = ALICCP_ITEM_FEATURES
    label: str = "click"
    positive_value: int = 1
    positive_min: float | None = None
    dask_scheduler: str | None = None

    def __post_init__(self) -> None:
        sources = ("synthetic", "merlin", "aliccp", "files")
        _check(self.source in sources, f"data.source must be one of {sources}, got {self.source!r}")
        if self.source == "aliccp":
            _check(bool(self.aliccp_dir), "data.source=aliccp needs data.aliccp_dir")
        if self.dask_scheduler:
            _check(self.dask_scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")) or
                   (self.dask_scheduler.startswith("local:") and self.dask_scheduler[6:].isdigit() and int(self.dask_scheduler[6:]) >= 1),
                   f"data.dask_scheduler must be a scheduler address (tcp://host:port) or local:N, got {self.dask_scheduler!r}")
        if self.source == "files":
            _check(bool(self.interactions), "data.source=files needs data.interactions (a parquet or CSV path)")
        _check(self.num_users >= 2, f"data.num_users must be >= 2, got {self.num_users}")
        _check(self.num_items >= 2, f"data.num_items must be >= 2, got {self.num_items}")
        _check(self.num_impressions >= 10, "data.num_impressions must be >= 10")
        _check(self.latent_dim >= 1, "data.latent_dim must be >= 1")
        _check(self.popularity_exponent >= 0, "data.popularity_exponent must be >= 0")
        _check(self.personal_taste >= 0, "data.personal_taste must be >= 0")
        _check(self.affinity_scale > 0, "data.affinity_scale must be > 0")
        _check(0.0 < self.valid_fraction < 1.0, "data.valid_fraction must be in (0, 1)")
        _check(self.holdout in ("all", "positives"), f"data.holdout must be all or positives, got {self.holdout!r}")
        _check(self.holdout_by in ("auto", "time", "random"), f"data.holdout_by must be auto, time or random, got {self.holdout_by!r}")
        _check(self.holdout_by != "time" or bool(self.timestamp), "data.holdout_by=time needs data.timestamp")
        _check(self.holdout_min >= 0, f"data.holdout_min must be >= 0, got {self.holdout_min}")
        _check(self.seen in ("positives", "all"), f"data.seen must be positives or all, got {self.seen!r}")
        _check(self.cold_users >= 0, f"data.cold_users must be >= 0, got {self.cold_users}")
        reserved = {contract.INPUT_USER_ID, contract.INPUT_EXCLUDE, contract.INPUT_HISTORY, contract.OUTPUT_ITEM_IDS, contract.OUTPUT_SCORES,
                    contract.OUTPUT_UNKNOWN, contract.PARAM_TOP_K, contract.PARAM_EXCLUDE_SEEN, "query_embedding"}
        clash = sorted(reserved & set(self.user_features))
        _check(not clash, f"user features cannot use the serving contract's names {clash}; rename them in the data")
        columns = [self.user_id, self.item_id, *self.user_features, *self.item_features, self.label]
        if self.timestamp:
            columns.append(self.timestamp)
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        _check(not duplicates, f"data columns must be distinct, repeated: {duplicates}")

    def is_positive(self, labels):
        """Boolean mask of positive interactions for an array or Series of labels."""
        return labels >= self.positive_min if self.positive_min is not None else labels == self.positive_value

    @property
    def split_by_time(self) -> bool:
        """Whether the hold-out takes each user's latest interactions (else a random share)."""
        return self.holdout_by == "time" or (self.holdout_by == "auto" and bool(self.timestamp))

    @property
    def user_columns(self) -> tuple[str, ...]:
        return (self.user_id, *self.user_features)

    @property
    def item_columns(self) -> tuple[str, ...]:
        return (self.item_id, *self.item_features)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Two-tower model and its training.

    Attributes:
        query_mlp: hidden sizes of the query (user) tower; the last is the embedding size.
        item_mlp: hidden sizes of the item tower; its last must equal query_mlp's.
        embedding_dim: size of every categorical embedding table feeding the towers.
        batch_size: training batch size, which is also the number of in-batch negatives.
        epochs: maximum training epochs.
        optimizer: "adam" or "adagrad". Keras 2.12's Adam updates every row of every embedding
            table at each step (its moments decay everywhere), so a step costs O(table rows);
            Adagrad touches only the rows a batch uses, which is what large catalogues need.
        learning_rate: the optimizer's learning rate.
        temperature: logits are divided by it before the in-batch softmax.
        logq_correction: weight of the log-popularity correction of in-batch logits (0: off).
        dropout: dropout after each hidden MLP layer.
        mask_user_id: share of training examples whose user id is replaced by the unknown-id code
            (NVTabular's out-of-vocabulary index 2), so that the row every new user hits is trained.
        mask_features: share of training examples in which each user feature, independently, is
            replaced by the missing-value code (index 1: a feature not sent) or, for as many again,
            by the unseen-value code (index 2: a value training never saw).
        history_length: the user's latest N training positives (oldest first) become a query-tower
            input, pooled over the item-id embedding the item tower uses (one shared table); each
            training example sees the N positives before it. 0: no history input.
        mask_history: share of training examples whose history is emptied (a user the server
            knows nothing of yet sends none), independently of the other masks.
        mask_new_user: share of training examples made to look like a brand-new user: the
            unknown id and an empty history together (what a new user without clicks sends).
        early_stopping_patience: epochs without a better validation recall before stopping (0: off).
        eval_ks: cut-offs of the full-catalogue evaluation.
        seed: seed of TensorFlow and NumPy during training.
    """

    query_mlp: tuple[int, ...] = (128, 64)
    item_mlp: tuple[int, ...] = (128, 64)
    embedding_dim: int = 32
    batch_size: int = 1024
    epochs: int = 12
    optimizer: str = "adam"
    learning_rate: float = 0.005
    temperature: float = 0.05
    logq_correction: float = 1.0
    dropout: float = 0.2
    mask_user_id: float = 0.1
    mask_features: float = 0.05
    history_length: int = 20
    mask_history: float = 0.0
    mask_new_user: float = 0.0
    early_stopping_patience: int = 3
    eval_ks: tuple[int, ...] = (10, 50, 100)
    seed: int = 42

    def __post_init__(self) -> None:
        _check(len(self.query_mlp) >= 1 and min(self.query_mlp) >= 1, "train.query_mlp needs sizes >= 1")
        _check(len(self.item_mlp) >= 1 and min(self.item_mlp) >= 1, "train.item_mlp needs sizes >= 1")
        _check(
            self.query_mlp[-1] == self.item_mlp[-1],
            f"the towers must end in the same size: query {self.query_mlp[-1]}, item {self.item_mlp[-1]}",
        )
        _check(self.embedding_dim >= 1, "train.embedding_dim must be >= 1")
        _check(self.batch_size >= 2, "train.batch_size must be >= 2 (in-batch negatives)")
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.optimizer in ("adam", "adagrad"), f"train.optimizer must be adam or adagrad, got {self.optimizer!r}")
        _check(self.learning_rate > 0, "train.learning_rate must be > 0")
        _check(self.temperature > 0, "train.temperature must be > 0")
        _check(self.logq_correction >= 0, "train.logq_correction must be >= 0")
        _check(0 <= self.dropout < 1, "train.dropout must be in [0, 1)")
        _check(0 <= self.mask_user_id < 1, f"train.mask_user_id must be in [0, 1), got {self.mask_user_id}")
        _check(0 <= self.mask_features <= 0.5, f"train.mask_features must be in [0, 0.5], got {self.mask_features}")
        _check(0 <= self.history_length <= MAX_HISTORY, f"train.history_length must be in [0, {MAX_HISTORY}], got {self.history_length}")
        _check(0 <= self.mask_history < 1, f"train.mask_history must be in [0, 1), got {self.mask_history}")
        _check(0 <= self.mask_new_user < 1, f"train.mask_new_user must be in [0, 1), got {self.mask_new_user}")
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0")
        _check(len(self.eval_ks) >= 1 and min(self.eval_ks) >= 1, "train.eval_ks needs cut-offs >= 1")

    @property
    def embedding_size(self) -> int:
        return self.query_mlp[-1]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The full-catalogue evaluation: which users, how many seeds, how sure.

    Users with a held-out positive are split once (seeded by `data.seed`) into tuning users
    (early stopping, ALS tuning) and reported users; the two never overlap.

    Attributes:
        seeds: models trained and scored per method (the two-tower model with train.seed,
            train.seed + 1, ...; the baselines with their own seeds); tables show the mean.
            The artifacts serve the first seed's model.
        max_users: reported users, a seeded sample when more have held-out positives (None: all).
        tune_fraction: share of the users with held-out positives set aside for tuning.
        max_tune_users: at most this many tuning users (a seeded sample).
        bootstrap: paired bootstrap resamples of the reported users for each interval.
        confidence: the intervals' coverage; a verdict says BEATS or LOSES TO only when the
            interval of (two-tower minus baseline) excludes zero, TIES otherwise.
        als_budget_s: the ALS baseline's grid search stops starting new settings after this
            many seconds (the settings are tried from the likeliest; at least one always runs).
        segment: user features whose raw values define the segments of the "popular within
            segment" baseline of the cold-start table; "name/10" buckets a number by tens (age
            decades). Features the data does not have are left out.
        cold_history: the second cold-start table gives each new user's first N positives (time
            order where there is a timestamp) as their history and looks for the rest (users with
            more than N positives); ALS folds the same N in. 0: no second table.
    """

    seeds: int = 3
    max_users: int | None = 20_000
    tune_fraction: float = 0.5
    max_tune_users: int = 5_000
    bootstrap: int = 1000
    confidence: float = 0.95
    als_budget_s: float = 600.0
    segment: tuple[str, ...] = ("user_gender", "user_age")
    cold_history: int = 5

    def __post_init__(self) -> None:
        _check(0 <= self.cold_history <= MAX_HISTORY, f"eval.cold_history must be in [0, {MAX_HISTORY}], got {self.cold_history}")
        _check(self.seeds >= 1, f"eval.seeds must be >= 1, got {self.seeds}")
        _check(self.max_users is None or self.max_users >= 1, f"eval.max_users must be >= 1 or null, got {self.max_users}")
        _check(0.0 < self.tune_fraction < 1.0, f"eval.tune_fraction must be in (0, 1), got {self.tune_fraction}")
        _check(self.max_tune_users >= 1, f"eval.max_tune_users must be >= 1, got {self.max_tune_users}")
        _check(self.bootstrap >= 100, f"eval.bootstrap must be >= 100, got {self.bootstrap}")
        _check(0.5 < self.confidence < 1.0, f"eval.confidence must be in (0.5, 1), got {self.confidence}")
        _check(self.als_budget_s > 0, f"eval.als_budget_s must be > 0, got {self.als_budget_s}")
        for entry in self.segment:
            name, _, width = entry.partition("/")
            _check(bool(name) and (not width or (width.isdigit() and int(width) >= 1)),
                   f"eval.segment entries are a feature name or name/width (width >= 1), got {entry!r}")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """The FAISS index served for top-K search.

    Attributes:
        kind: "auto" (flat up to flat_max_items, IVF-Flat up to ivf_max_items, IVF-PQ above),
            "flat" (exact inner product), "ivf" (IVF-Flat), "ivf_sq" (IVF whose lists hold
            scalar-quantized codes, `sq_type`: a quarter of the memory at SQ8), "ivf_pq" (IVF
            whose lists hold 4-bit product-quantized codes scanned with SIMD lookups, the best
            refine_k_factor x k re-ranked by the `refine` codes) or "hnsw" (HNSW-Flat).
            Measured by `make bench` at 10M synthetic items, one query at a time, 18 deep as
            served, in one run: IVF-PQ (4096 cells found by HNSW, nprobe 64, a 4-bit residual code
            per dimension, 4 x k re-ranked by fp16 codes) 1.02 ms for recall@10 0.975 in 1.6 GB;
            with a code per pair of dimensions and 512 x k re-ranked, 3.9 ms for 0.985 (the
            candidates' fp16 codes are read at random from 1.3 GB); IVF-SQ8 (nprobe 64) 4.3 ms for
            0.969 (README, "What comes out").
            At 1M items the search stage took 0.56 ms a request in-process with IVF-PQ (1024
            cells) and 1.13 ms with IVF-Flat (1024 cells, nprobe 32) (`python -m bench.stub_profile`).
            HNSW32 reached 0.68 at ef 128 at 1M on these inner-product embeddings.
        flat_max_items: the largest catalogue that "auto" serves with an exact index.
        ivf_max_items: the largest catalogue that "auto" serves with IVF-Flat (float vectors in
            the lists); above it, "auto" builds ivf_pq. Over the seed-size preset's 489k trained
            items, at the same nprobe (22) and recall@10 (0.953), IVF-PQ with 1,024 cells searched in
            0.12 ms back to back and 0.25 after an idle millisecond, against 0.25 and 0.36 for
            IVF-Flat, in 83 MB instead of 129; at 300k items 0.071 / 0.165 ms against 0.118 / 0.19.
        nlist: IVF-Flat cells; capped at the catalogue size / 39 so that k-means has data.
        nprobe: IVF-Flat cells visited per query.
        sq_nlist: IVF-SQ cells (capped as nlist is).
        sq_nprobe: IVF-SQ cells visited per query.
        sq_type: the code of each vector in IVF-SQ lists: "SQ8" (1 byte a dimension), "SQ6",
            "SQ4" or "SQfp16" (2 bytes a dimension).
        pq_nlist: IVF-PQ cells; 0: the smallest power of two at least the square root of the
            catalogue size (1,024 from 262k to 1M items, 4,096 at 10M); capped as nlist is. The
            nearest power of two instead gave the seed size's 489k items 512 cells, which needed
            nprobe 49 for what 1,024 cells held at 21 (0.33 ms a query against 0.08), and a
            200k-item catalogue nprobe 131.
        pq_nprobe: IVF-PQ cells visited per query ("auto" widens it by half until the recall
            floor holds, then settles on the narrowest width that holds it: `train.index.narrowest_probe`).
        pq_m: IVF-PQ sub-quantizers, 4 bits each (pq_m / 2 bytes a vector); must divide the
            embedding size; 0: the embedding size (a 4-bit code per dimension).
        pq_hnsw_cells: IVF-PQ with at least this many cells finds a query's cells in an HNSW32 graph
            over the centroids instead of scanning them all (0: always scan). At 10M items (4,096
            cells): nprobe 40 held recall@10 0.955 either way; a query took 0.45 ms back to back
            with the graph, 0.64 with the scan at nprobe 37, and the build 168 s instead of 416
            (each vector's cell found in the graph too).
        pq_quantizer_ef: the graph's search width (efSearch) when it finds nprobe cells (it returns
            at least nprobe whatever this says).
        pq_residual: IVF-PQ codes each vector's offset from its cell's centroid (FAISS's
            by_residual, factory suffix "fsr") instead of the vector itself. At 1M items it reached
            recall@10 0.951 at nprobe 12 with 4 x k re-ranked (0.14 ms a query) where plain codes
            needed nprobe 24 and 16 x k for 0.949 (0.23 ms).
        refine: codes the IVF-PQ short list is re-ranked with: "SQfp16" (2 bytes a dimension,
            scores within about 1e-4 of exact), "SQ8", "Flat" (exact, 4 bytes a dimension) or
            "none".
        refine_k_factor: IVF-PQ returns refine_k_factor x k candidates for re-ranking (k: the
            search depth, top_k + exclusions + 8 for ties).
        train_points_per_cell: IVF k-means is trained on a seeded sample of this many vectors
            per cell (FAISS itself caps at 256), not on the whole catalogue.
        add_chunk: vectors added to an IVF index per call, which bounds the temporary memory
            of assigning them to cells.
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW search-time beam width.
        min_recall_at_10: the export fails when the index's recall@10 against exact search is lower.
        recall_sample: query vectors used to measure that recall.
    """

    kind: str = "auto"
    flat_max_items: int = 20_000
    ivf_max_items: int = 300_000
    nlist: int = 1024
    nprobe: int = 16
    sq_nlist: int = 4096
    sq_nprobe: int = 64
    sq_type: str = "SQ8"
    pq_nlist: int = 0
    pq_nprobe: int = 16
    pq_m: int = 0
    pq_hnsw_cells: int = 4096
    pq_quantizer_ef: int = 64
    pq_residual: bool = True
    refine: str = "SQfp16"
    refine_k_factor: float = 4.0
    train_points_per_cell: int = 64
    add_chunk: int = 1_000_000
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    min_recall_at_10: float = 0.95
    recall_sample: int = 1000

    def __post_init__(self) -> None:
        kinds = ("auto", "flat", "ivf", "ivf_sq", "ivf_pq", "hnsw")
        _check(self.kind in kinds, f"index.kind must be one of {kinds}, got {self.kind!r}")
        _check(self.nlist >= 1, f"index.nlist must be >= 1, got {self.nlist}")
        _check(1 <= self.nprobe <= self.nlist, f"index.nprobe must be in 1..nlist={self.nlist}, got {self.nprobe}")
        _check(self.flat_max_items >= 1, f"index.flat_max_items must be >= 1, got {self.flat_max_items}")
        _check(self.ivf_max_items >= self.flat_max_items,
               f"index.ivf_max_items must be >= flat_max_items={self.flat_max_items}, got {self.ivf_max_items}")
        _check(self.sq_nlist >= 1, f"index.sq_nlist must be >= 1, got {self.sq_nlist}")
        _check(1 <= self.sq_nprobe <= self.sq_nlist, f"index.sq_nprobe must be in 1..sq_nlist={self.sq_nlist}, got {self.sq_nprobe}")
        sq_types = ("SQ8", "SQ6", "SQ4", "SQfp16")
        _check(self.sq_type in sq_types, f"index.sq_type must be one of {sq_types}, got {self.sq_type!r}")
        _check(self.pq_nlist >= 0, f"index.pq_nlist must be >= 0 (0: the power of two at or above the square root of the catalogue size), got {self.pq_nlist}")
        _check(self.pq_nprobe >= 1, f"index.pq_nprobe must be >= 1, got {self.pq_nprobe}")
        _check(not self.pq_nlist or self.pq_nprobe <= self.pq_nlist, f"index.pq_nprobe must be in 1..pq_nlist={self.pq_nlist}, got {self.pq_nprobe}")
        _check(self.pq_m >= 0 and self.pq_m % 2 == 0, f"index.pq_m must be 0 (the embedding size) or a positive even number, got {self.pq_m}")
        _check(self.pq_hnsw_cells >= 0, f"index.pq_hnsw_cells must be >= 0 (0: never), got {self.pq_hnsw_cells}")
        _check(self.pq_quantizer_ef >= 1, f"index.pq_quantizer_ef must be >= 1, got {self.pq_quantizer_ef}")
        refines = ("none", "SQfp16", "SQ8", "Flat")
        _check(self.refine in refines, f"index.refine must be one of {refines}, got {self.refine!r}")
        _check(self.refine_k_factor >= 1, f"index.refine_k_factor must be >= 1, got {self.refine_k_factor}")
        _check(self.train_points_per_cell >= 39, f"index.train_points_per_cell must be >= 39, got {self.train_points_per_cell}")
        _check(self.add_chunk >= 1, f"index.add_chunk must be >= 1, got {self.add_chunk}")
        _check(self.hnsw_m >= 2, f"index.hnsw_m must be >= 2, got {self.hnsw_m}")
        _check(self.ef_construction >= 1, f"index.ef_construction must be >= 1, got {self.ef_construction}")
        _check(self.ef_search >= 1, f"index.ef_search must be >= 1, got {self.ef_search}")
        _check(0 <= self.min_recall_at_10 <= 1, f"index.min_recall_at_10 must be in [0, 1], got {self.min_recall_at_10}")
        _check(self.recall_sample >= 1, f"index.recall_sample must be >= 1, got {self.recall_sample}")

    def resolved_kind(self, n_items: int) -> str:
        """The index kind actually built for a catalogue of n_items."""
        if self.kind != "auto":
            return self.kind
        if n_items <= self.flat_max_items:
            return "flat"
        return "ivf" if n_items <= self.ivf_max_items else "ivf_pq"


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The Triton model repository and server.

    Attributes:
        host: address every endpoint binds to; loopback unless deliberately exposed.
        http_port: HTTP/REST port.
        grpc_port: gRPC port.
        metrics_port: Prometheus metrics port.
        max_batch_size: most users in one request, and in one dynamically merged batch.
        default_top_k: items returned per user when a request does not say.
        max_top_k: the largest top_k a request may ask for.
        max_exclude: the most excluded items a request may send per user.
        max_queue_delay_us: how long the dynamic batcher waits for more requests before it runs
            a batch. 0 runs at once when idle; requests that queue while a batch runs are still
            merged into the next one.
        instance_count: executor model instances (each a Python process).
        threads: FAISS's search threads (OpenMP, over the queries of a batch) and TensorFlow's
            intra-op threads in each instance; BLAS (the compiled tower) always runs on one.
            2 by default: at 1M items a batch of 5 searches in 0.8 ms instead of 1.3, and at
            concurrency 8 the server answers 1,719 against 1,389 infer/s (README, "Serving speed").
            FAISS's idle threads spin for about a millisecond after each search (libgomp's
            default), a second core's worth of CPU at concurrency 1; OMP_WAIT_POLICY=PASSIVE in
            the server's environment stops that, at a cost (measured there too).
        tower_runtime: "numpy" (the compiled tower, the default) or "tensorflow" (the SavedModel).
        feature_store: "embedded" (the exported parquet table in each server's memory) or a
            Redis URL (redis://host:port/db) shared by replicas; fill it with
            `python -m ensemble materialize` first.
        feature_store_timeout_s: the longest one feature-store call may take (connect or
            answer); past it the batch's requests fail with UNAVAILABLE and a clear message.
        index_device: where FAISS searches: "cpu", "gpu" (GPU 0; the load fails without one) or
            "auto" (GPU 0 when this FAISS build sees one). Logged at load.
        query_cache_mb: the most memory each model instance may give to its query cache
            (`ensemble.query_cache`): with the embedded store, every stored user's query vector is
            computed at load, and a request that sends only user ids skips the lookup, the
            transform and the tower (the same bits as computing them). 0 turns it off; a table
            that needs more stays uncached (the load log says so). About 260 bytes a user at d=64.
        probe_split_min_codes: from how many codes a query scans on average (items x nprobe /
            cells) one query's IVF cells are split over the FAISS threads instead of one thread a
            query (`ensemble.ops.probe_split`; IVF-PQ indexes, FAISS 1.7.3 on). Where it applies, every
            batch is re-ranked its way (a user's answer is the same split or not, alone or in a batch),
            which is not quite the index's own IndexRefine answer (its list cut and its sums differ).
            50,000 by default: at 10M items (97k codes) the search after an idle millisecond took
            0.60-0.66 ms against 0.68-0.77; at 1M (23k codes) it was slower. 0 turns it off.
        ready_timeout_s: how long `serve` waits for the server to become ready.
        health_port: port of the supervisor's own health endpoints (/live, /ready), whose
            readiness comes from a canary request through the model.
        http_guard: put ensemble.guard in front of tritonserver's HTTP port (tritonserver then
            listens on a loopback port of its own): it refuses the requests that crash
            tritonserver 2.51's HTTP front end.
        max_request_bytes: the largest HTTP request body the guard accepts.
        canary_interval_s: seconds between canary requests.
        canary_timeout_s: how long a canary may take before it counts as failed.
        recover_after_failures: consecutive canary failures of a dead model (not of the feature
            store) after which the supervisor restarts tritonserver.
        max_restarts: restarts within `restart_window_s` after which the supervisor reports a
            crash loop (ERROR log, /status) and waits longer before each further restart
            (doubling, at most 60 s); it never gives up on its own.
        restart_window_s: the window of `max_restarts`.
    """

    host: str = contract.DEFAULT_HOST
    http_port: int = contract.DEFAULT_HTTP_PORT
    grpc_port: int = contract.DEFAULT_GRPC_PORT
    metrics_port: int = contract.DEFAULT_METRICS_PORT
    max_batch_size: int = 256
    default_top_k: int = 10
    max_top_k: int = 1000
    max_exclude: int = 1000
    max_queue_delay_us: int = 0
    instance_count: int = 1
    threads: int = 2
    tower_runtime: str = "numpy"
    feature_store: str = "embedded"
    feature_store_timeout_s: float = 0.5
    index_device: str = "auto"
    query_cache_mb: int = 256
    probe_split_min_codes: int = 50_000
    ready_timeout_s: float = 180.0
    health_port: int = contract.DEFAULT_HEALTH_PORT
    http_guard: bool = True
    max_request_bytes: int = 8 << 20
    canary_interval_s: float = 1.0
    canary_timeout_s: float = 2.0
    recover_after_failures: int = 2
    max_restarts: int = 10
    restart_window_s: float = 300.0

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port, self.health_port)
        _check(all(0 < p < 65536 for p in ports), f"serve ports must be in 1..65535, got {ports}")
        _check(len(set(ports)) == 4, f"serve ports must differ, got {ports}")
        _check(self.max_batch_size >= 1, "serve.max_batch_size must be >= 1")
        _check(self.max_top_k >= 1, "serve.max_top_k must be >= 1")
        _check(
            1 <= self.default_top_k <= self.max_top_k,
            f"serve.default_top_k must be in 1..max_top_k={self.max_top_k}, got {self.default_top_k}",
        )
        _check(self.max_exclude >= 0, "serve.max_exclude must be >= 0")
        _check(self.max_queue_delay_us >= 0, "serve.max_queue_delay_us must be >= 0")
        _check(self.instance_count >= 1, "serve.instance_count must be >= 1")
        _check(self.threads >= 1, "serve.threads must be >= 1")
        _check(self.feature_store == "embedded" or self.feature_store.startswith(("redis://", "rediss://", "unix://")),
               f"serve.feature_store must be 'embedded' or a redis:// URL, got {self.feature_store!r}")
        _check(self.tower_runtime in ("numpy", "tensorflow"), f"serve.tower_runtime must be numpy or tensorflow, got {self.tower_runtime!r}")
        _check(self.ready_timeout_s > 0, "serve.ready_timeout_s must be > 0")
        _check(0 < self.feature_store_timeout_s <= 30, f"serve.feature_store_timeout_s must be in (0, 30], got {self.feature_store_timeout_s}")
        _check(self.query_cache_mb >= 0, f"serve.query_cache_mb must be >= 0 (0: off), got {self.query_cache_mb}")
        _check(self.probe_split_min_codes >= 0, f"serve.probe_split_min_codes must be >= 0 (0: off), got {self.probe_split_min_codes}")
        _check(self.index_device in ("cpu", "gpu", "auto"), f"serve.index_device must be cpu, gpu or auto, got {self.index_device!r}")
        _check(self.max_request_bytes >= 1024, f"serve.max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        _check(self.canary_interval_s > 0, f"serve.canary_interval_s must be > 0, got {self.canary_interval_s}")
        _check(self.canary_timeout_s > 0, f"serve.canary_timeout_s must be > 0, got {self.canary_timeout_s}")
        _check(self.recover_after_failures >= 1, f"serve.recover_after_failures must be >= 1, got {self.recover_after_failures}")
        _check(self.max_restarts >= 1, f"serve.max_restarts must be >= 1, got {self.max_restarts}")
        _check(self.restart_window_s > 0, f"serve.restart_window_s must be > 0, got {self.restart_window_s}")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """All stages' settings; each stage reads its own section."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "index": IndexConfig, "serve": ServeConfig}


def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    """Turns a YAML or string value into the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    where = f"{section}.{name}"
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} cannot be null")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)][0]
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        return _coerce(section, name, inner, value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} expects a list, got {value!r}")
        return tuple(_coerce(section, name, args[0], v) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value).strip()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} expects {hint.__name__}, got {value!r}") from e
    return value


def _apply(base: PipelineConfig, updates: Mapping[str, Mapping[str, Any]], origin: str) -> PipelineConfig:
    sections = {}
    for section, values in updates.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"unknown config section {section!r} in {origin}; valid: {sorted(_SECTION_TYPES)}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} in {origin} must be a mapping")
        cls = _SECTION_TYPES[section]
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        coerced = {}
        for name, value in values.items():
            if name not in valid:
                raise ConfigError(f"unknown key {section}.{name} in {origin}; valid: {valid}")
            coerced[name] = _coerce(section, name, hints[name], value)
        sections[section] = dataclasses.replace(getattr(base, section), **coerced)
    return dataclasses.replace(base, **sections)


def _parse_overrides(overrides: Sequence[str], origin: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"{origin} override {item!r} must look like section.field=value")
        out.setdefault(section, {})[name] = value
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            section, _, name = key[len(ENV_PREFIX) :].lower().partition("__")
            out.setdefault(section, {})[name] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    base: PipelineConfig | None = None,
) -> PipelineConfig:
    """Builds the configuration: defaults, then the YAML file, the environment, the overrides.

    Args:
        base: starting point instead of the defaults (the settings stored with artifacts, say).
        path: optional YAML file with `data:`, `train:`, `index:`, `serve:` sections.
        overrides: `section.field=value` strings, applied last.
        environ: environment to read `RETRIEVAL_<SECTION>__<FIELD>` from (default os.environ).

    Raises:
        ConfigError: unknown section or key, a value of the wrong type, or a failed validation.
    """
    cfg = base or PipelineConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        cfg = _apply(cfg, loaded, str(path))
    cfg = _apply(cfg, _from_env(os.environ if environ is None else environ), "the environment")
    return _apply(cfg, _parse_overrides(overrides, "command-line"), "the command line")


def config_from_dict(values: Mapping[str, Mapping[str, Any]]) -> PipelineConfig:
    """Rebuilds a configuration saved with `PipelineConfig.to_dict` (in a manifest, say)."""
    return _apply(PipelineConfig(), values, "a saved configuration")
