"""The competition's validation split: time boundaries, positive events and request groups.

The split repeats the properties of the competition's test set. Validation covers the last
`valid_days` (30) days of the file, and a gap of `gap_days` (2) days separates it from training.
Request groups contain only views and cart updates, and a kept request has at least
`min_request_size` (10) products, at least one cart update and at least one view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import polars as pl

from cartformer.config import DAY_SECONDS, DataConfig
from cartformer.data.encoding import INDEX_DTYPE, IdMapping
from cartformer.data.schema import ACTION_CODES, CART, POSITIVE_ACTIONS, VIEW

logger = logging.getLogger(__name__)

EVENT_SORT_KEYS: tuple[str, ...] = ("user", "timestamp", "action", "product", "source")
REQUEST_SORT_KEYS: tuple[str, ...] = ("user", "timestamp", "request_id")
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "none")


@dataclass(frozen=True)
class SplitBoundaries:
    """Split times in unix seconds.

    Training: t <= train_end. Gap: train_end < t <= valid_start. Validation:
    valid_start < t <= valid_end.
    """

    train_end: int
    valid_start: int
    valid_end: int

    @classmethod
    def from_max_timestamp(cls, t_max: int, cfg: DataConfig) -> SplitBoundaries:
        """Place validation in the last `cfg.valid_days` up to `t_max`, the gap before it."""
        valid_end = int(t_max)
        valid_start = valid_end - round(cfg.valid_days * DAY_SECONDS)
        train_end = valid_start - round(cfg.gap_days * DAY_SECONDS)
        return cls(train_end=train_end, valid_start=valid_start, valid_end=valid_end)

    def split_expr(self, timestamp: str | pl.Expr = "timestamp") -> pl.Expr:
        """Return a String expression: "train", "valid" or "none" (gap, or after valid_end)."""
        t = pl.col(timestamp) if isinstance(timestamp, str) else timestamp
        in_valid = (t > self.valid_start) & (t <= self.valid_end)
        return (
            pl.when(t <= self.train_end)
            .then(pl.lit("train"))
            .when(in_valid)
            .then(pl.lit("valid"))
            .otherwise(pl.lit("none"))
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the boundaries in unix seconds and as ISO 8601 UTC times."""
        values: dict[str, Any] = {}
        for name in ("train_end", "valid_start", "valid_end"):
            seconds = getattr(self, name)
            values[name] = seconds
            values[f"{name}_iso"] = datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()
        return values


@dataclass
class SplitResult:
    """Output of `split_events`: the tables of the prepared directory and the counts."""

    boundaries: SplitBoundaries
    events: pl.DataFrame
    requests: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def encode_events(
    raw: pl.LazyFrame, users: IdMapping, products: IdMapping, sources: IdMapping
) -> pl.LazyFrame:
    """Map the raw required columns to the compact encoded columns.

    Output columns: `user`, `product`, `source` (i32 indices), `action` (i8 code), `timestamp`
    (i64) and `request_id` (u64, nullable). The input should have passed `validate_events`.
    """
    action = (
        pl.col("action_type").cast(pl.String).replace_strict(ACTION_CODES, return_dtype=pl.Int8)
    )
    return raw.select(
        users.encode_expr("user_id").alias("user"),
        products.encode_expr("product_id").alias("product"),
        sources.encode_expr("source_type").alias("source"),
        action.alias("action"),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("request_id").cast(pl.UInt64),
    )


def split_events(
    encoded: pl.LazyFrame | pl.DataFrame, sources: IdMapping, cfg: DataConfig
) -> SplitResult:
    """Compute the boundaries, the positive events and the request groups of encoded events.

    `encoded` has the columns of `encode_events`. The boundaries come from the largest timestamp
    of all rows, views included.
    """
    lazy = encoded.lazy()
    t_max = lazy.select(pl.col("timestamp").max()).collect().item()
    if t_max is None:
        raise ValueError("the encoded events have no rows; the split needs at least one event")
    boundaries = SplitBoundaries.from_max_timestamp(t_max, cfg)
    logger.info("split boundaries: %s", boundaries.to_dict())

    events = build_events(lazy)
    requests, counts = build_requests(lazy, boundaries, sources, cfg)
    train_history = int((events["timestamp"] <= boundaries.train_end).sum())
    counts = {
        "positive_events": events.height,
        "positive_events_train": train_history,
        "positive_events_after_train_end": events.height - train_history,
        **counts,
    }
    return SplitResult(boundaries=boundaries, events=events, requests=requests, counts=counts)


def build_events(encoded: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Return the positive events (click, cart, purchase), sorted by `EVENT_SORT_KEYS`.

    Columns: `user`, `product`, `source` (i32), `action` (i8), `timestamp` (i64).
    """
    return (
        encoded.lazy()
        .filter(pl.col("action").is_in(POSITIVE_ACTIONS))
        .select("user", "product", "source", "action", "timestamp")
        .sort(EVENT_SORT_KEYS, maintain_order=True)
        .collect()
    )


def build_requests(
    encoded: pl.LazyFrame | pl.DataFrame,
    boundaries: SplitBoundaries,
    sources: IdMapping,
    cfg: DataConfig,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Build the request groups of the split and count what was left out.

    A group is one (user, request_id, product) over view and cart rows that have a request and a
    surface outside `cfg.excluded_surfaces`. It takes the max action (cart beats view), the
    earliest time and the most common surface, where ties go to the smallest surface index.
    A request is keyed by (user, request_id), so a request_id shared by two users gives two
    requests. Its time is the earliest time of its groups and its surface is the most common
    group surface, again with ties to the smallest index. Candidates are ordered by product
    index.

    Returns the `requests` table (`user` i32, `request_id` u64, `timestamp` i64, `source` i32,
    `product` list[i32], `target` list[i8] with 1 = cart and 0 = view, `split` str), sorted by
    `REQUEST_SORT_KEYS`, and the counts. Dropped requests are counted once, by the first
    failed rule in this order: too small, no cart, no view.
    """
    lazy = encoded.lazy()
    excluded = _excluded_source_indices(sources, cfg.excluded_surfaces)
    view_or_cart = pl.col("action").is_in([VIEW, CART])
    has_request = pl.col("request_id").is_not_null()
    on_excluded = pl.col("source").is_in(excluded)

    row_counts = (
        lazy.filter(view_or_cart)
        .select(
            (~has_request).sum().alias("rows_view_cart_without_request"),
            (has_request & on_excluded).sum().alias("rows_view_cart_excluded_surface"),
        )
        .collect()
        .row(0, named=True)
    )

    rows = lazy.filter(view_or_cart & has_request & ~on_excluded)
    group_keys = ["user", "request_id", "product"]
    # The streaming engine keeps the peak memory of this largest aggregation lower.
    groups = (
        rows.group_by(group_keys)
        .agg(pl.col("action").max(), pl.col("timestamp").min(), *_value_range("source"))
        .collect(engine="streaming")
    )
    groups = _resolve_mode(groups, rows, group_keys, "source")

    # A candidate's product and target travel together as one int64 code, product * 2 + target,
    # so that sorting the code list orders the candidates by product index.
    request_keys = ["user", "request_id"]
    code = (pl.col("product").cast(pl.Int64) * 2 + pl.col("action")).alias("code")
    candidates = (
        groups.lazy()
        .group_by(request_keys)
        .agg(
            pl.col("timestamp").min(),
            code,
            pl.len().alias("size"),
            (pl.col("action") == CART).any().alias("has_cart"),
            (pl.col("action") == VIEW).any().alias("has_view"),
            *_value_range("source"),
        )
        .collect()
    )
    candidates = _resolve_mode(candidates, groups.lazy(), request_keys, "source")
    del groups

    too_small = pl.col("size") < cfg.min_request_size
    no_cart = ~too_small & ~pl.col("has_cart")
    no_view = ~too_small & pl.col("has_cart") & ~pl.col("has_view")
    drop_counts = candidates.select(
        too_small.sum().alias("requests_too_small"),
        no_cart.sum().alias("requests_without_cart"),
        no_view.sum().alias("requests_without_view"),
    ).row(0, named=True)
    shared = candidates.group_by("request_id").agg(pl.len()).filter(pl.col("len") > 1).height
    if shared:
        logger.warning(
            "%d request_ids belong to more than one user; each (user, request_id) pair is "
            "treated as its own request",
            shared,
        )

    accepted = candidates.filter(~too_small & pl.col("has_cart") & pl.col("has_view"))
    codes = pl.col("code").list.sort()
    requests = accepted.select(
        "user",
        "request_id",
        "timestamp",
        "source",
        (codes // 2).cast(pl.List(INDEX_DTYPE)).alias("product"),
        (codes % 2).cast(pl.List(pl.Int8)).alias("target"),
        boundaries.split_expr("timestamp").alias("split"),
    ).sort(REQUEST_SORT_KEYS)
    split_counts = {
        f"requests_{name}": int((requests["split"] == name).sum()) for name in SPLIT_NAMES
    }
    counts = {
        **{key: int(value) for key, value in row_counts.items()},
        "request_candidates": candidates.height,
        **{key: int(value) for key, value in drop_counts.items()},
        "request_ids_shared_by_users": shared,
        **split_counts,
    }
    logger.info("request groups: %s", counts)
    return requests, counts


def _value_range(value: str) -> list[pl.Expr]:
    return [pl.col(value).min().alias("__min"), pl.col(value).max().alias("__max")]


def _resolve_mode(
    grouped: pl.DataFrame, rows: pl.LazyFrame, keys: list[str], value: str
) -> pl.DataFrame:
    """Add `value`: the most common value of `rows` per key, ties going to the smallest value.

    `grouped` has one row per key with the smallest and largest value in `__min` and `__max`,
    which are dropped. A key with a single distinct value has that value as its mode. Only
    the other keys are counted value by value, which is much faster than `Expr.mode` on every
    group. The output rows are in no particular order.
    """
    is_mixed = pl.col("__min") != pl.col("__max")
    uniform = grouped.filter(~is_mixed).with_columns(pl.col("__min").alias(value))
    mixed = grouped.filter(is_mixed)
    counted = (
        rows.join(mixed.lazy().select(keys), on=keys, how="semi")
        .group_by(*keys, value)
        .agg(pl.len().alias("__count"))
    )
    modes = (
        counted.sort([*keys, "__count", value], descending=[False] * len(keys) + [True, False])
        .unique(keys, keep="first", maintain_order=True)
        .select(*keys, value)
        .collect()
    )
    mixed = mixed.join(modes, on=keys, how="inner")
    return pl.concat([uniform, mixed.select(uniform.columns)]).drop("__min", "__max")


def _excluded_source_indices(sources: IdMapping, surfaces: tuple[str, ...]) -> list[int]:
    if not surfaces:
        return []
    indices = sources.encode(pl.Series("surface", list(surfaces), dtype=pl.String))
    unseen = [name for name, index in zip(surfaces, indices.to_list(), strict=True) if index == 0]
    if unseen:
        logger.info("excluded surfaces %s do not occur in the data", unseen)
    return [index for index in indices.to_list() if index != 0]
