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
from common.progress import progress_bar

LOG = logging.getLogger(__name__)

DATA_DIR = "data"  # the data stage's folder inside a run's work folder
TRAIN_FILE = "train.parquet"
VALID_FILE = "valid.parquet"
TRUTH_FILE = "truth.npz"
COLD_FILE = "cold.parquet"  # every interaction of the users kept out of training (cold-start evaluation)

# Shape of the hidden model behind synthetic clicks (see generate_synthetic).
EXPOSURE_SCALE = 8.0  # how personalized the logging policy's personalized channel is
PERSONALIZED_SHARE = 0.8  # share of impressions from that channel (the rest: by popularity)
CLICK_THRESHOLD = 0.5  # affinity at which a click is a coin flip
EXPOSURE_CANDIDATES = 32  # popularity-drawn candidates the personalized channel picks from
IMPRESSION_CHUNK = 1 << 16  # impressions drawn at a time (memory: chunk x candidates x latent_dim)

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
    exposure_candidates: int = 0
    popularity_exponent: float = 0.7

    def positive_log_prob(self, user_rows: np.ndarray) -> np.ndarray:
        """Log-probability (up to a per-user constant) that an item is the user's next click.

        P(click on i | u) is proportional to P(i shown to u) * P(click | u, i). The personalized
        channel picks one of C popularity-drawn candidates with weight w = exp(scale * affinity);
        with Z = E_pop[w], P(i) is close to C pop(i) w(i) / (w(i) + (C - 1) Z) (the other
        candidates' weights replaced by their mean), which tends to the softmax pop(i) w(i) / Z as
        C grows (C = 0 stands for that limit). Ranking by it is the best any model can do, up to
        that approximation.

        Args:
            user_rows: [n] row numbers into `user_ids`.

        Returns:
            [n, num_items] float32.
        """
        # float32 throughout: w is at most exp(exposure_scale) for unit tastes, and the ranking
        # needs no more (float64 made the oracle 5 minutes of a 10,000-user, 500,000-item evaluation).
        f = np.float32
        affinity = self.user_taste[user_rows] @ self.item_taste.T
        pop = _popularity(self.item_log_pop).astype(f)
        w = np.exp(f(self.exposure_scale) * affinity)
        z = (w @ pop)[:, None]
        c = self.exposure_candidates
        personal = pop * w / z if c == 0 else f(c) * pop * w / (w + f(c - 1) * z)
        exposure = f(1.0 - self.personalized_share) * pop[None, :] + f(self.personalized_share) * personal
        logit = f(self.affinity_scale) * affinity + f(self.click_bias)
        log_click = np.minimum(logit, f(0.0)) - np.log1p(np.exp(-np.abs(logit)))  # log sigmoid, without logaddexp's cost
        return np.log(exposure + f(1e-30)) + log_click

    def save(self, path: Path) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in self.__dict__.items()})

    @classmethod
    def load(cls, path: Path) -> "Truth":
        with np.load(path) as z:
            values = {k: z[k] for k in z.files}
        for k in ("affinity_scale", "exposure_scale", "personalized_share", "click_bias"):
            values[k] = float(values[k])
        values["exposure_candidates"] = int(values.get("exposure_candidates", 0))
        values["popularity_exponent"] = float(values.get("popularity_exponent", 0.7))
        return cls(**values)


def _popularity(log_pop: np.ndarray) -> np.ndarray:
    """The popularity channel's probabilities from its log-weights."""
    pop = np.exp(log_pop - log_pop.max())
    return pop / pop.sum()


def _gumbel(rng, shape) -> np.ndarray:
    """Standard Gumbel noise in float32 (numpy's own gumbel draws float64 only)."""
    u = rng.random(shape, dtype=np.float32)
    return -np.log(-np.log(np.clip(u, 1e-7, 1.0 - 1e-7)))


def zipf_log_weights(ranks: np.ndarray, exponent: float) -> np.ndarray:
    """Log-probabilities (unnormalized) of 1-based popularity ranks: the mass of x ** -exponent on [r, r + 1).

    Close to -exponent * log(r), and exactly what `_draw_ranks` samples by inversion.
    """
    r = ranks.astype(np.float64)
    if exponent == 1.0:
        return np.log(np.log1p(1.0 / r))
    b = 1.0 - exponent
    return b * np.log(r) + np.log(np.abs(np.expm1(b * np.log1p(1.0 / r))))


def _draw_ranks(rng, size, n: int, exponent: float) -> np.ndarray:
    """0-based popularity ranks drawn with P(r) proportional to exp(zipf_log_weights(r + 1)); O(1) each."""
    dtype = np.float32 if n < (1 << 22) else np.float64  # float32 resolves every rank below 2 ** 22: twice as fast
    u = rng.random(size, dtype=dtype)
    if exponent == 1.0:
        x = np.exp(u * dtype(np.log(n + 1.0)))
    else:
        b = 1.0 - exponent
        x = np.exp(np.log1p(u * dtype((n + 1.0) ** b - 1.0)) * dtype(1.0 / b))
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def draw_impressions(truth: "Truth", rows: np.ndarray, rng, progress=None) -> np.ndarray:
    """Catalogue rows of the items shown in impressions of users `rows` (user-table rows).

    A share `1 - personalized_share` comes from the popularity channel; the rest picks, among
    `exposure_candidates` items drawn by popularity, one with probability proportional to
    exp(exposure_scale * affinity) (a Gumbel-max over the candidates). Popularity draws invert the
    Zipf law in closed form, and tastes are read in popularity order (the head stays in cache).
    Cost: O(impressions x candidates x latent_dim), independent of the catalogue size beyond a sort.
    """
    n_items = len(truth.item_log_pop)
    by_rank = np.argsort(-truth.item_log_pop, kind="stable")
    taste_by_rank = np.ascontiguousarray(truth.item_taste[by_rank])
    ranks = _draw_ranks(rng, len(rows), n_items, truth.popularity_exponent)
    personal = np.flatnonzero(rng.random(len(rows)) < truth.personalized_share)
    if progress is not None:
        progress.update(len(rows) - len(personal))
    c = truth.exposure_candidates or EXPOSURE_CANDIDATES
    for start in range(0, len(personal), IMPRESSION_CHUNK):
        at = personal[start : start + IMPRESSION_CHUNK]
        candidates = _draw_ranks(rng, (len(at), c), n_items, truth.popularity_exponent)
        affinity = np.matmul(taste_by_rank[candidates], truth.user_taste[rows[at]][:, :, None])[..., 0]
        best = (truth.exposure_scale * affinity + _gumbel(rng, affinity.shape)).argmax(axis=1)
        ranks[at] = candidates[np.arange(len(at)), best]
        if progress is not None:
            progress.update(len(at))
    return by_rank[ranks]


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
    """Row-wise argmax of taste . vectors plus Gumbel noise: the user's favourite of a vocabulary.

    O(len(taste) x len(vectors)): only for small vocabularies (categories, intentions).
    """
    out = np.empty(len(taste), dtype=np.int64)
    for start in range(0, len(taste), chunk):
        scores = taste[start : start + chunk] @ vectors.T
        scores += noise * _gumbel(rng, scores.shape)
        out[start : start + chunk] = scores.argmax(axis=1)
    return out


def _noisy_argmax_within(
    taste: np.ndarray, vectors: np.ndarray, groups: np.ndarray, user_group: np.ndarray, noise: float, rng, chunk: int = 65536
) -> np.ndarray:
    """The user's favourite among the vocabulary entries of their own group (a shop of their category).

    Like `_noisy_argmax`, restricted to entries whose `groups` value is the user's `user_group`;
    users whose group has no entry get a random one. Cost O(users x largest group).
    """
    n_groups = int(max(groups.max(), user_group.max())) + 1
    order = np.argsort(groups, kind="stable")
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = np.full((n_groups, max(int(counts.max()), 1)), -1, dtype=np.int64)
    members[groups[order], np.arange(len(order)) - starts[groups[order]]] = order
    out = np.empty(len(taste), dtype=np.int64)
    for start in range(0, len(taste), chunk):
        cand = members[user_group[start : start + chunk]]
        scores = np.einsum("nd,nkd->nk", taste[start : start + chunk], vectors[np.maximum(cand, 0)])
        scores += noise * _gumbel(rng, scores.shape)
        scores[cand < 0] = -np.inf
        pick = cand[np.arange(len(cand)), scores.argmax(axis=1)]
        out[start : start + chunk] = np.where(pick >= 0, pick, rng.integers(0, len(vectors), len(cand)))
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
    item_log_pop = zipf_log_weights(rng.permutation(np.arange(1, n_items + 1)), cfg.popularity_exponent)

    demo = {name: rng.integers(0, size, n_users) for name, size in _DEMOGRAPHICS.items()}
    demo_vec = {name: rng.normal(size=(size, dim)) for name, size in _DEMOGRAPHICS.items()}
    user_taste = _unit(
        0.9 * demo_vec["user_age"][demo["user_age"]]
        + 0.9 * demo_vec["user_gender"][demo["user_gender"]]
        + 0.6 * demo_vec["user_group"][demo["user_group"]]
        + cfg.personal_taste * rng.normal(size=(n_users, dim))
    )
    intent_vec = _unit(cat_vec[rng.integers(0, n_cat, n_intent)] + 0.5 * rng.normal(size=(n_intent, dim)))
    favourite_cat = _noisy_argmax(user_taste, _unit(cat_vec), 0.3, rng)
    history = {  # favourite shop and brand: among those of the favourite category
        "user_categories": favourite_cat,
        "user_shops": _noisy_argmax_within(user_taste, _unit(shop_vec), shop_cat, favourite_cat, 0.3, rng),
        "user_brands": _noisy_argmax_within(user_taste, _unit(brand_vec), brand_cat, favourite_cat, 0.3, rng),
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
        exposure_candidates=EXPOSURE_CANDIDATES,
        popularity_exponent=cfg.popularity_exponent,
    )

    activity = rng.lognormal(0.0, 0.8, n_users)
    per_user = rng.multinomial(cfg.num_impressions, activity / activity.sum())
    rows = np.repeat(np.arange(n_users), per_user)
    with progress_bar(len(rows), "impressions", "rows") as bar:
        items = draw_impressions(truth, rows, rng, bar)
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


def split_holdout(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits interactions into training and hold-out by the declared protocol.

    Per user, the candidates (every interaction, or the positives only: `data.holdout`) are
    ordered by time or at random (`data.holdout_by`; time ties keep row order) and the last
    `valid_fraction` of them, at least `holdout_min`, are held out; at least one candidate stays
    in training, and users with `holdout_min` candidates or fewer are not held out at all. Rows
    that are not candidates stay in training. Both parts keep the input's row order.
    """
    candidates = np.flatnonzero(cfg.is_positive(df[cfg.label]).to_numpy()) if cfg.holdout == "positives" else np.arange(len(df))
    users = df[cfg.user_id].to_numpy()[candidates]
    if cfg.split_by_time:
        key = df[cfg.timestamp].to_numpy()[candidates]
    else:
        key = np.random.default_rng(cfg.seed + 1).random(len(candidates))
    order = np.lexsort((key, users))  # stable: equal times keep row order
    _, first, counts = np.unique(users[order], return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(counts)), counts)
    n = counts[group]
    from_end = n - 1 - (np.arange(len(order)) - first[group])
    n_hold = np.maximum(np.floor(n * cfg.valid_fraction + 1e-9).astype(np.int64), cfg.holdout_min)
    n_hold = np.where(n > max(cfg.holdout_min, 1), np.minimum(n_hold, n - 1), 0)
    valid = np.zeros(len(df), dtype=bool)
    valid[candidates[order[from_end < n_hold]]] = True
    return df[~valid].reset_index(drop=True), df[valid].reset_index(drop=True)


def remove_cold_users(train: pd.DataFrame, valid: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Takes `cold_users` users with a positive (a seeded sample, at most a fifth of them) out of both splits.

    Returns:
        (train, valid, every interaction of the removed users in time order when there is a timestamp).
    """
    positives = pd.concat([train.loc[cfg.is_positive(train[cfg.label]), cfg.user_id], valid.loc[cfg.is_positive(valid[cfg.label]), cfg.user_id]])
    candidates = np.unique(positives.to_numpy())
    n = min(cfg.cold_users, len(candidates) // 5)
    if n < cfg.cold_users:
        LOG.info("cold users: %d asked for, %d taken (a fifth of the %d users with a positive)", cfg.cold_users, n, len(candidates))
    cold = np.sort(np.random.default_rng(cfg.seed + 2).choice(candidates, size=n, replace=False))
    in_train, in_valid = train[cfg.user_id].isin(cold).to_numpy(), valid[cfg.user_id].isin(cold).to_numpy()
    cold_df = pd.concat([train[in_train], valid[in_valid]], ignore_index=True)
    if cfg.timestamp:
        cold_df = cold_df.sort_values([cfg.user_id, cfg.timestamp], kind="stable", ignore_index=True)
    return train[~in_train].reset_index(drop=True), valid[~in_valid].reset_index(drop=True), cold_df


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
        train_df, valid_df = split_holdout(df, cfg)
    else:
        if cfg.source == "synthetic":
            df, truth = generate_synthetic(cfg)
            truth.save(out / TRUTH_FILE)
            paths["truth"] = out / TRUTH_FILE
        else:
            df = generate_merlin(cfg)
        train_df, valid_df = split_holdout(df, cfg)
    train_df, valid_df, cold_df = remove_cold_users(train_df, valid_df, cfg)
    paths["cold"] = out / COLD_FILE
    cold_df.to_parquet(paths["cold"], index=False)
    for name, frame in (("train", train_df), ("valid", valid_df)):
        check_columns(frame, cfg, name)
        frame.to_parquet(paths[name], index=False)
        LOG.info("wrote %s: %d rows, %d positives", paths[name], len(frame), int(cfg.is_positive(frame[cfg.label]).sum()))
    return paths
