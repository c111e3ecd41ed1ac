"""Interaction data: Ali-CCP-shaped synthetic data with known tastes, merlin's generator, or real Ali-CCP.

Every source ends as two raw parquet files, `train.parquet` and `valid.parquet`, one row per
impression with the user id, the item id, their categorical features and the click label.
The synthetic source also writes `truth.npz`, the hidden tastes the clicks were drawn from, so
that an oracle ranking can be computed (see `train.evaluate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import ALICCP_ITEM_FEATURES, ALICCP_USER_FEATURES, DataConfig
from common.errors import DataError

LOG = logging.getLogger(__name__)

TRAIN_FILE = "train.parquet"
VALID_FILE = "valid.parquet"
TRUTH_FILE = "truth.npz"

# Shape of the hidden model behind synthetic clicks (see generate_synthetic).
EXPOSURE_SCALE = 8.0  # how personalized the logging policy's personalized channel is
PERSONALIZED_SHARE = 0.8  # share of impressions from that channel (the rest: by popularity)
CLICK_THRESHOLD = 0.5  # affinity at which a click is a coin flip

# Vocabulary sizes of the demographic user features, as in Ali-CCP.
_DEMOGRAPHICS = {
    "user_gender": 2,
    "user_age": 7,
    "user_group": 13,
    "user_consumption_2": 3,
    "user_is_occupied": 2,
    "user_geography": 4,
}


@dataclass(frozen=True)
class Truth:
    """The hidden model behind synthetic clicks.

    Attributes:
        user_ids: [num_users] raw ids, row order of `user_taste`.
        item_ids: [num_items] raw ids, row order of `item_taste`.
        user_taste: [num_users, latent_dim] float32, unit rows.
        item_taste: [num_items, latent_dim] float32, unit rows.
        item_log_pop: [num_items] log exposure probability of the popularity channel.
        affinity_scale: how sharply the click probability follows user_taste . item_taste.
        exposure_scale: how sharply the personalized exposure channel follows it.
        personalized_share: share of impressions drawn from the personalized channel.
        click_bias: logit offset that sets the click-through rate.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_taste: np.ndarray
    item_taste: np.ndarray
    item_log_pop: np.ndarray
    affinity_scale: float
    exposure_scale: float
    personalized_share: float
    click_bias: float

    def positive_log_prob(self, user_rows: np.ndarray) -> np.ndarray:
        """Log-probability (up to a per-user constant) that an item is the user's next click.

        P(click on i | u) is proportional to P(i shown to u) * P(click | u, i), which is what the
        generator draws; ranking by it is the best any model can do.

        Args:
            user_rows: [n] row numbers into `user_ids`.

        Returns:
            [n, num_items] float32.
        """
        affinity = self.user_taste[user_rows] @ self.item_taste.T
        exposure = _exposure(affinity, self.item_log_pop, self.exposure_scale, self.personalized_share)
        click = -np.logaddexp(0.0, -(self.affinity_scale * affinity + self.click_bias))
        return (np.log(exposure + 1e-30) + click).astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in self.__dict__.items()})

    @classmethod
    def load(cls, path: Path) -> "Truth":
        with np.load(path) as z:
            values = {k: z[k] for k in z.files}
        for k in ("affinity_scale", "exposure_scale", "personalized_share", "click_bias"):
            values[k] = float(values[k])
        return cls(**values)


def _exposure(affinity: np.ndarray, log_pop: np.ndarray, scale: float, share: float) -> np.ndarray:
    """[n, items] probability that each item is the one shown in an impression."""
    pop = np.exp(log_pop - log_pop.max())
    pop = pop / pop.sum()
    logits = scale * affinity + log_pop
    logits -= logits.max(axis=1, keepdims=True)
    personal = np.exp(logits)
    personal /= personal.sum(axis=1, keepdims=True)
    return (1.0 - share) * pop[None, :] + share * personal


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _pick_within(groups: np.ndarray, wanted: np.ndarray, n_groups: int, rng) -> np.ndarray:
    """For each wanted group, a random member index of `groups` with that group (any if none)."""
    order = np.argsort(groups, kind="stable")
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    c = counts[wanted]
    fallback = rng.integers(0, len(groups), size=len(wanted))
    pick = order[np.minimum(starts[wanted] + (rng.random(len(wanted)) * np.maximum(c, 1)).astype(int), len(groups) - 1)]
    return np.where(c > 0, pick, fallback)


def _noisy_argmax(taste: np.ndarray, vectors: np.ndarray, noise: float, rng, chunk: int = 4096) -> np.ndarray:
    """Row-wise argmax of taste . vectors plus Gumbel noise: the user's favourite of a vocabulary."""
    out = np.empty(len(taste), dtype=np.int64)
    for start in range(0, len(taste), chunk):
        scores = taste[start : start + chunk] @ vectors.T
        scores += noise * rng.gumbel(size=scores.shape)
        out[start : start + chunk] = scores.argmax(axis=1)
    return out


def generate_synthetic(cfg: DataConfig) -> tuple[pd.DataFrame, Truth]:
    """Draws Ali-CCP-shaped impressions whose clicks follow hidden user and item tastes.

    Items get a taste from their category, shop and brand; users get one from their demographics
    plus a personal part, and their history features (favourite category, shop, brand,
    intention) are noisy argmaxes of that taste. Exposure mixes a Zipf popularity channel with a
    personalized one; clicks are Bernoulli(sigmoid(scale * affinity + bias)).

    Args:
        cfg: sizes, latent dimension and seed.

    Returns:
        (impressions with the Ali-CCP columns and `click`, the Truth behind them).
    """
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items, dim = cfg.num_users, cfg.num_items, cfg.latent_dim
    n_cat = int(np.clip(n_items // 50, 4, 2000))
    n_shop = int(np.clip(n_items // 8, 8, 20000))
    n_brand = int(np.clip(n_items // 10, 8, 20000))
    n_intent = 2 * n_cat

    cat_vec = rng.normal(size=(n_cat, dim))
    shop_vec = rng.normal(size=(n_shop, dim))
    brand_vec = rng.normal(size=(n_brand, dim))
    shop_cat = rng.integers(0, n_cat, n_shop)
    brand_cat = rng.integers(0, n_cat, n_brand)
    cat_p = 1.0 / np.arange(1, n_cat + 1) ** 0.8
    item_cat = rng.choice(n_cat, size=n_items, p=cat_p / cat_p.sum())
    item_shop = _pick_within(shop_cat, item_cat, n_cat, rng)
    item_brand = _pick_within(brand_cat, item_cat, n_cat, rng)
    item_taste = _unit(
        cat_vec[item_cat] + 0.6 * shop_vec[item_shop] + 0.4 * brand_vec[item_brand]
        + 0.3 * rng.normal(size=(n_items, dim))
    )
    item_log_pop = -cfg.popularity_exponent * np.log(rng.permutation(np.arange(1, n_items + 1)).astype(np.float64))

    demo = {name: rng.integers(0, size, n_users) for name, size in _DEMOGRAPHICS.items()}
    demo_vec = {name: rng.normal(size=(size, dim)) for name, size in _DEMOGRAPHICS.items()}
    user_taste = _unit(
        0.9 * demo_vec["user_age"][demo["user_age"]]
        + 0.9 * demo_vec["user_gender"][demo["user_gender"]]
        + 0.6 * demo_vec["user_group"][demo["user_group"]]
        + cfg.personal_taste * rng.normal(size=(n_users, dim))
    )
    intent_vec = _unit(cat_vec[rng.integers(0, n_cat, n_intent)] + 0.5 * rng.normal(size=(n_intent, dim)))
    history = {
        "user_categories": _noisy_argmax(user_taste, _unit(cat_vec), 0.3, rng),
        "user_shops": _noisy_argmax(user_taste, _unit(shop_vec), 0.3, rng),
        "user_brands": _noisy_argmax(user_taste, _unit(brand_vec), 0.3, rng),
        "user_intentions": _noisy_argmax(user_taste, intent_vec, 0.3, rng),
    }
    profile = (demo["user_gender"] * 7 + demo["user_age"]) * 7 + rng.integers(0, 7, n_users)

    truth = Truth(
        user_ids=np.arange(1, n_users + 1, dtype=np.int64),
        item_ids=np.sort(rng.choice(np.arange(1, 20 * n_items), size=n_items, replace=False)).astype(np.int64),
        user_taste=user_taste,
        item_taste=item_taste,
        item_log_pop=item_log_pop,
        affinity_scale=cfg.affinity_scale,
        exposure_scale=EXPOSURE_SCALE,
        personalized_share=PERSONALIZED_SHARE,
        click_bias=-cfg.affinity_scale * CLICK_THRESHOLD,
    )

    activity = rng.lognormal(0.0, 0.8, n_users)
    per_user = rng.multinomial(cfg.num_impressions, activity / activity.sum())
    rows = np.repeat(np.arange(n_users), per_user)
    items = np.empty(len(rows), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(per_user)])
    chunk = max(1, 2_000_000 // n_items)
    for start in range(0, n_users, chunk):
        users = np.arange(start, min(start + chunk, n_users))
        exposure = _exposure(user_taste[users] @ item_taste.T, item_log_pop, truth.exposure_scale, truth.personalized_share)
        cdf = np.cumsum(exposure, axis=1)
        for j, u in enumerate(users):
            lo, hi = offsets[u], offsets[u + 1]
            if hi > lo:
                items[lo:hi] = np.minimum(np.searchsorted(cdf[j], rng.random(hi - lo) * cdf[j, -1]), n_items - 1)
    affinity = np.einsum("nd,nd->n", user_taste[rows], item_taste[items])
    p_click = 1.0 / (1.0 + np.exp(-(truth.affinity_scale * affinity + truth.click_bias)))
    click = (rng.random(len(rows)) < p_click).astype(np.int64)

    df = pd.DataFrame({"user_id": truth.user_ids[rows].astype(np.int32)})
    for name in ALICCP_USER_FEATURES:
        values = profile if name == "user_profile" else demo.get(name, history.get(name))
        df[name] = (values[rows] + 1).astype(np.int32)  # ids start at 1, as in Ali-CCP
    df["item_id"] = truth.item_ids[items].astype(np.int32)
    df["item_category"] = (item_cat[items] + 1).astype(np.int32)
    df["item_shop"] = (item_shop[items] + 1).astype(np.int32)
    df["item_brand"] = (item_brand[items] + 1).astype(np.int32)
    df["click"] = click
    LOG.info(
        "generated %d impressions, %d users, %d items, click-through rate %.3f",
        len(df), df.user_id.nunique(), df.item_id.nunique(), click.mean(),
    )
    return df, truth


def generate_merlin(cfg: DataConfig) -> pd.DataFrame:
    """merlin's `generate_data("aliccp-raw")`: independent random columns, no learnable signal."""
    from merlin.datasets.synthetic import generate_data

    dataset = generate_data("aliccp-raw", cfg.num_impressions)
    df = dataset.to_ddf().compute()
    keep = ["user_id", *ALICCP_USER_FEATURES, "item_id", *ALICCP_ITEM_FEATURES, "click"]
    return df[keep].reset_index(drop=True)


def split_per_user(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Holds out `valid_fraction` of each user's impressions, drawn at random.

    Users with a single impression stay entirely in training.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    r = rng.random(len(df))
    rank = pd.Series(r).groupby(df[cfg.user_id].to_numpy()).rank(pct=True).to_numpy()
    size = df.groupby(cfg.user_id)[cfg.user_id].transform("size").to_numpy()
    valid = (rank > 1.0 - cfg.valid_fraction) & (size > 1)
    return df[~valid].reset_index(drop=True), df[valid].reset_index(drop=True)


def split_by_time(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Holds out each user's latest `valid_fraction` of interactions (ties broken by row order)."""
    order = df.sort_values([cfg.user_id, cfg.timestamp], kind="stable")
    position = order.groupby(cfg.user_id).cumcount().to_numpy()
    size = order.groupby(cfg.user_id)[cfg.user_id].transform("size").to_numpy()
    valid = (position >= np.ceil(size * (1.0 - cfg.valid_fraction))) & (size > 1)
    return order[~valid].reset_index(drop=True), order[valid].reset_index(drop=True)


def check_columns(df: pd.DataFrame, cfg: DataConfig, where: str) -> None:
    """Raises DataError unless every declared column is present."""
    wanted = [*cfg.user_columns, *cfg.item_columns, cfg.label]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(f"{where} lacks the declared columns {missing}; it has {list(df.columns)}")


def prepare_data(cfg: DataConfig, out_dir: str | Path) -> dict[str, Path]:
    """Produces `train.parquet` and `valid.parquet` (and `truth.npz` for synthetic data).

    Args:
        cfg: the data section of the configuration.
        out_dir: folder to write to; created if missing.

    Returns:
        the paths written, by name ("train", "valid", optionally "truth").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / TRAIN_FILE, "valid": out / VALID_FILE}
    if cfg.source == "aliccp":
        from train.aliccp import convert_aliccp

        train_df, valid_df = convert_aliccp(cfg.aliccp_dir, cfg, out)
    elif cfg.source == "files":
        from train.declared import load_declared

        df = load_declared(cfg, out)
        train_df, valid_df = split_by_time(df, cfg) if cfg.timestamp else split_per_user(df, cfg)
    else:
        if cfg.source == "synthetic":
            df, truth = generate_synthetic(cfg)
            truth.save(out / TRUTH_FILE)
            paths["truth"] = out / TRUTH_FILE
        else:
            df = generate_merlin(cfg)
        train_df, valid_df = split_per_user(df, cfg)
    for name, frame in (("train", train_df), ("valid", valid_df)):
        check_columns(frame, cfg, name)
        frame.to_parquet(paths[name], index=False)
        LOG.info("wrote %s: %d rows, %d positives", paths[name], len(frame), int(cfg.is_positive(frame[cfg.label]).sum()))
    return paths
