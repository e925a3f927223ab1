"""Vectorized pretrain and finetune samples: one row per user with list columns.

Everything here runs as polars expressions and numpy array operations over all users at once.
`cartformer.data.reference` computes the same frames with a plain per-user loop, and the tests
check that both agree exactly.

Side features: when the events carry the context columns of `EVENT_CONTEXT_COLUMNS` (`city`,
`store`), the samples get them as list columns parallel to `product`, and when the requests
carry them, the finetune samples also get `request_city` and `request_store` parallel to
`request_id`. The reference builders ignore these columns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import polars as pl

from cartformer.config import DAY_SECONDS, DataConfig
from cartformer.data.split import EVENT_SORT_KEYS, REQUEST_SORT_KEYS, SplitBoundaries

logger = logging.getLogger(__name__)

HISTORY_SCHEMA: dict[str, pl.DataType] = {
    "user": pl.Int32(),
    "product": pl.List(pl.Int32),
    "source": pl.List(pl.Int32),
    "action": pl.List(pl.Int8),
    "timestamp": pl.List(pl.Int64),
}
PRETRAIN_SCHEMA: dict[str, pl.DataType] = {**HISTORY_SCHEMA, "target_index": pl.List(pl.Int32)}
FINETUNE_SCHEMA: dict[str, pl.DataType] = {
    **HISTORY_SCHEMA,
    "request_id": pl.List(pl.UInt64),
    "request_source": pl.List(pl.Int32),
    "request_timestamp": pl.List(pl.Int64),
    "state_index": pl.List(pl.Int32),
    "request_size": pl.List(pl.Int32),
    "candidate_product": pl.List(pl.Int32),
    "candidate_target": pl.List(pl.Int8),
}
_EVENT_DTYPES: dict[str, pl.DataType] = {
    "user": pl.Int32(),
    "product": pl.Int32(),
    "source": pl.Int32(),
    "action": pl.Int8(),
    "timestamp": pl.Int64(),
}
EVENT_CONTEXT_COLUMNS: tuple[str, ...] = ("city", "store")
"""Optional i32 index columns of events and requests that the samples carry when present."""
REQUEST_CONTEXT_PREFIX = "request_"
"""Prefix of a request's context column in the finetune samples, e.g. `request_city`."""
_REQUEST_DTYPES: dict[str, pl.DataType] = {
    "user": pl.Int32(),
    "request_id": pl.UInt64(),
    "timestamp": pl.Int64(),
    "source": pl.Int32(),
    "product": pl.List(pl.Int32),
    "target": pl.List(pl.Int8),
}


class SampleFrames(NamedTuple):
    """Training and validation samples of one kind, and the counts of what was kept and dropped."""

    train: pl.DataFrame
    valid: pl.DataFrame
    counts: dict[str, int]


def context_columns(frame: pl.DataFrame) -> tuple[str, ...]:
    """Return the columns of `EVENT_CONTEXT_COLUMNS` that `frame` has, in that order."""
    return tuple(name for name in EVENT_CONTEXT_COLUMNS if name in frame.columns)


def sort_events(events: pl.DataFrame) -> pl.DataFrame:
    """Return the event columns with contract dtypes, stably sorted by `EVENT_SORT_KEYS`.

    Context columns (`city`, `store`) are kept as i32 when `events` has them.
    """
    dtypes = {**_EVENT_DTYPES, **_context_dtypes(context_columns(events))}
    columns = [pl.col(name).cast(dtype) for name, dtype in dtypes.items()]
    return events.select(columns).sort(EVENT_SORT_KEYS, maintain_order=True)


def sort_requests(requests: pl.DataFrame, split_name: str) -> pl.DataFrame:
    """Return the requests of one split with contract dtypes, sorted by `REQUEST_SORT_KEYS`.

    This order defines which lag draw belongs to which training request. Context columns
    (`city`, `store`) are kept as i32 when `requests` has them.
    """
    dtypes = {**_REQUEST_DTYPES, **_context_dtypes(context_columns(requests))}
    columns = [pl.col(name).cast(dtype) for name, dtype in dtypes.items()]
    selected = requests.filter(pl.col("split") == split_name).select(columns)
    return selected.sort(REQUEST_SORT_KEYS, maintain_order=True)


def _context_dtypes(names: tuple[str, ...]) -> dict[str, pl.DataType]:
    return {name: pl.Int32() for name in names}


def _list_schema(names: Iterable[str]) -> dict[str, pl.DataType]:
    return {name: pl.List(pl.Int32) for name in names}


def draw_request_lags(num_requests: int, cfg: DataConfig, seed: int) -> np.ndarray:
    """Draw lags ~ Uniform(lag_min_days, lag_max_days) in seconds, shape (num_requests,) float64.

    Draw i belongs to row i of `sort_requests(requests, "train")`, so the lags depend only on
    `seed` and on the set of training requests.
    """
    low = cfg.lag_min_days * DAY_SECONDS
    high = cfg.lag_max_days * DAY_SECONDS
    return np.random.default_rng(seed).uniform(low, high, size=num_requests)


def build_pretrain_samples(
    events: pl.DataFrame, split: SplitBoundaries, cfg: DataConfig
) -> SampleFrames:
    """Build the pretrain samples from the positive events.

    Training sample: the last `max_history` events with timestamp <= train_end, every position
    a target. Validation sample: the last `max_history` of all events, with targets at the
    positions of events after train_end. A user is dropped when the kept history has fewer than
    `min_history` events or no target. Columns follow `PRETRAIN_SCHEMA`, one row per user,
    sorted by user.
    """
    check_data_config(cfg)
    ordered = sort_events(events)
    train_history = ordered.filter(pl.col("timestamp") <= split.train_end)
    train, train_counts = _pretrain_samples(train_history, pl.lit(True), cfg, "pretrain_train")
    after_train = pl.col("timestamp") > split.train_end
    valid, valid_counts = _pretrain_samples(ordered, after_train, cfg, "pretrain_valid")
    counts = {**train_counts, **valid_counts}
    logger.info("pretrain samples: %s", counts)
    return SampleFrames(train, valid, counts)


def build_finetune_samples(
    events: pl.DataFrame,
    requests: pl.DataFrame,
    split: SplitBoundaries,
    cfg: DataConfig,
    seed: int,
) -> SampleFrames:
    """Build the finetune samples: training history plus the requests of each split.

    History: the last `max_history` positive events with timestamp <= train_end. The state of a
    request is the latest kept history event with timestamp <= request time - lag in training,
    where the lags come from `draw_request_lags(..., seed)`, and with timestamp < request time
    in validation. Per split, a user with a request but fewer than `min_history` history events
    is dropped with all their requests. Then requests without a state in the kept history are
    dropped, the user's last `max_requests` requests by time are kept, and users left with no
    request are dropped. Columns follow `FINETUNE_SCHEMA`, one row per user, sorted by user.
    """
    check_data_config(cfg)
    ordered = sort_events(events)
    train_history = ordered.filter(pl.col("timestamp") <= split.train_end)
    history = _keep_last(train_history, cfg.max_history)
    counts = {"finetune_history_events_truncated": train_history.height - history.height}

    train_requests = sort_requests(requests, "train")
    lags = draw_request_lags(train_requests.height, cfg, seed)
    times = train_requests["timestamp"].to_numpy()
    # An integer timestamp t satisfies t <= x exactly when t <= floor(x).
    train_cutoffs = np.floor(times - lags).astype(np.int64)
    train, train_counts = _finetune_samples(
        history, train_requests, train_cutoffs, cfg, "finetune_train"
    )

    valid_requests = sort_requests(requests, "valid")
    valid_cutoffs = valid_requests["timestamp"].to_numpy().astype(np.int64) - 1
    valid, valid_counts = _finetune_samples(
        history, valid_requests, valid_cutoffs, cfg, "finetune_valid"
    )
    counts = {**counts, **train_counts, **valid_counts}
    logger.info("finetune samples: %s", counts)
    return SampleFrames(train, valid, counts)


def check_data_config(cfg: DataConfig) -> None:
    """Raise ValueError on sample settings that contradict each other or drop every sample."""
    problems = []
    if cfg.max_history < 1 or cfg.max_requests < 1:
        problems.append(f"max_history={cfg.max_history} and max_requests={cfg.max_requests}")
        problems[-1] += " must be at least 1"
    if cfg.min_history > cfg.max_history:
        problems.append(f"min_history={cfg.min_history} exceeds max_history={cfg.max_history}")
    if not 0 <= cfg.lag_min_days <= cfg.lag_max_days:
        problems.append(
            f"lag_min_days={cfg.lag_min_days} and lag_max_days={cfg.lag_max_days} "
            f"must satisfy 0 <= lag_min_days <= lag_max_days"
        )
    if problems:
        raise ValueError(f"invalid data config: {'; '.join(problems)}; fix these settings")


def _keep_last(events: pl.DataFrame, count: int) -> pl.DataFrame:
    """Keep the last `count` rows of each user in a frame sorted by user."""
    position = pl.int_range(pl.len(), dtype=pl.Int64).over("user")
    # pl.len() is unsigned, so subtract in Int64 to avoid wrapping below zero.
    return events.filter(position >= pl.len().over("user").cast(pl.Int64) - count)


def _history_lists(history: pl.DataFrame) -> pl.DataFrame:
    return history.group_by("user", maintain_order=True).agg(
        "product", "source", "action", "timestamp", *context_columns(history)
    )


def _conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


def _pretrain_samples(
    history: pl.DataFrame, is_target: pl.Expr, cfg: DataConfig, prefix: str
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Build pretrain rows from events sorted by user. `is_target` marks the target events."""
    kept_history = _keep_last(history, cfg.max_history)
    context = context_columns(history)
    target_index = pl.int_range(pl.len(), dtype=pl.Int32).filter(is_target).alias("target_index")
    samples = kept_history.group_by("user", maintain_order=True).agg(
        "product", "source", "action", "timestamp", target_index, *context
    )

    short = pl.col("product").list.len() < cfg.min_history
    no_target = ~short & (pl.col("target_index").list.len() == 0)
    drops = samples.select(short.sum().alias("short"), no_target.sum().alias("no_target"))
    schema = {**PRETRAIN_SCHEMA, **_list_schema(context)}
    result = _conform(samples.filter(~short & ~no_target), schema)
    counts = {
        f"{prefix}_users": result.height,
        f"{prefix}_users_short_history": int(drops["short"].item()),
        f"{prefix}_users_no_target": int(drops["no_target"].item()),
        f"{prefix}_events_truncated": history.height - kept_history.height,
    }
    return result, counts


def _finetune_samples(
    history: pl.DataFrame,
    requests: pl.DataFrame,
    cutoffs: np.ndarray,
    cfg: DataConfig,
    prefix: str,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Build finetune rows for one split.

    `history` is the kept history sorted by `EVENT_SORT_KEYS`. `requests` is sorted by
    `REQUEST_SORT_KEYS`, and `cutoffs` of shape (len(requests),) is the latest allowed history
    timestamp of each request.
    """
    lengths = history.group_by("user").agg(pl.len().alias("history_length"))
    requests = requests.with_columns(pl.Series("cutoff", cutoffs, dtype=pl.Int64))
    requests = requests.join(lengths, on="user", how="left", maintain_order="left")
    short = pl.col("history_length").fill_null(0) < cfg.min_history
    short_counts = requests.filter(short).select(
        pl.col("user").n_unique().alias("users"), pl.len().alias("requests")
    )
    requests = requests.filter(~short)
    users_before = requests["user"].n_unique()

    state = _state_indices(history, requests["user"].to_numpy(), requests["cutoff"].to_numpy())
    requests = requests.with_columns(pl.Series("state_index", state, dtype=pl.Int32))
    no_state = int((state < 0).sum())
    requests = requests.filter(pl.col("state_index") >= 0)
    kept_requests = _keep_last(requests, cfg.max_requests)

    candidates = pl.col("product").list.explode(keep_nulls=False, empty_as_null=False)
    targets = pl.col("target").list.explode(keep_nulls=False, empty_as_null=False)
    request_context = [
        pl.col(name).alias(REQUEST_CONTEXT_PREFIX + name) for name in context_columns(requests)
    ]
    per_user = kept_requests.group_by("user", maintain_order=True).agg(
        "request_id",
        pl.col("source").alias("request_source"),
        pl.col("timestamp").alias("request_timestamp"),
        "state_index",
        pl.col("product").list.len().alias("request_size"),
        candidates.alias("candidate_product"),
        targets.alias("candidate_target"),
        *request_context,
    )
    samples = _history_lists(history).join(per_user, on="user", how="inner", maintain_order="left")
    context = context_columns(history)
    request_names = [REQUEST_CONTEXT_PREFIX + name for name in context_columns(requests)]
    schema = {**FINETUNE_SCHEMA, **_list_schema(context), **_list_schema(request_names)}
    result = _conform(samples, schema)
    counts = {
        f"{prefix}_users": result.height,
        f"{prefix}_requests": kept_requests.height,
        f"{prefix}_users_short_history": int(short_counts["users"].item()),
        f"{prefix}_requests_of_short_history_users": int(short_counts["requests"].item()),
        f"{prefix}_requests_no_state": no_state,
        f"{prefix}_requests_truncated": requests.height - kept_requests.height,
        f"{prefix}_users_no_requests_left": users_before - result.height,
    }
    return result, counts


def _state_indices(history: pl.DataFrame, users: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """Find, per request, the position of the latest history event with timestamp <= cutoff.

    `history` is sorted by (user, timestamp). `users` and `cutoffs` have shape (R,). Returns an
    int64 array of shape (R,): the position inside the user's history, or -1 when the user has
    no such event. Each (user, time) pair is packed into one int64 key that sorts like the pair,
    so a single `searchsorted` over the history keys finds the state of every request.
    """
    history_users = history["user"].to_numpy().astype(np.int64)
    history_times = history["timestamp"].to_numpy().astype(np.int64)
    users = users.astype(np.int64)
    cutoffs = cutoffs.astype(np.int64)
    if history_users.size == 0 or users.size == 0:
        return np.full(users.shape, -1, dtype=np.int64)

    history_keys, request_keys = _pack_keys(history_users, history_times, users, cutoffs)
    latest = np.searchsorted(history_keys, request_keys, side="right") - 1
    found = latest >= 0
    found &= history_users[np.clip(latest, 0, None)] == users
    first = np.searchsorted(history_users, users, side="left")
    return np.where(found, latest - first, -1)


def _pack_keys(
    history_users: np.ndarray, history_times: np.ndarray, users: np.ndarray, cutoffs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pack (user, time) into int64 keys as user * span + (time - start).

    When that would overflow, times are replaced by their ranks among all history times and
    cutoffs first, which keeps the order and needs a span of only the number of distinct times.
    """
    start = min(int(history_times.min()), int(cutoffs.min()))
    span = max(int(history_times.max()), int(cutoffs.max())) - start + 1
    max_user = max(int(history_users.max()), int(users.max()))
    if (max_user + 1) * span < 2**62:
        history_offsets = history_times - start
        request_offsets = cutoffs - start
    else:
        ranks = np.unique(np.concatenate([history_times, cutoffs]))
        span = ranks.size
        if (max_user + 1) * span >= 2**62:
            raise ValueError(f"{max_user} users x {span} distinct times overflow the int64 key")
        history_offsets = np.searchsorted(ranks, history_times)
        request_offsets = np.searchsorted(ranks, cutoffs)
    return history_users * span + history_offsets, users * span + request_offsets
