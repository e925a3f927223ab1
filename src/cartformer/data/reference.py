"""Plain implementation of the prepare stage, for tests and benchmarks.

The sample builders loop over users and events in Python on purpose: they sort the rows, walk
each user's events with a `collections.deque(maxlen=max_history)` and find each request's state
with a linear scan. They are slow but easy to check by reading, and `cartformer.data.samples`
must produce exactly the same frames and counts. They share only the output schemas with that
module.

`prepare_reference` runs the whole stage as a plain notebook would write it: an eager read
of the whole file, id mappings from sorted Python lists applied with `replace_strict`, the
split and request groups as eager `group_by().agg()` calls with `Expr.mode`, then the
per-user sample builders. It writes the same tables and mappings as
`cartformer.data.prepare.prepare`, and `benchmarks/bench_prepare.py` times the two against
each other.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import operator
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cartformer.config import DAY_SECONDS, DataConfig
from cartformer.data.encoding import NO_SURFACE
from cartformer.data.samples import (
    FINETUNE_SCHEMA,
    PRETRAIN_SCHEMA,
    SampleFrames,
    draw_request_lags,
)
from cartformer.data.schema import ACTION_CODES, CART, REQUIRED_COLUMNS, VIEW
from cartformer.data.split import SplitBoundaries, SplitResult

logger = logging.getLogger(__name__)

Row = dict[str, Any]
# Raw id or surface value -> dense index (1..n), as the prepare stage numbers them.
Mapping = dict[Any, int]


def build_pretrain_samples_reference(
    events: pl.DataFrame, split: SplitBoundaries, cfg: DataConfig
) -> SampleFrames:
    """Compute what `samples.build_pretrain_samples` computes, one user at a time."""
    rows = _sorted_events(events)
    train_rows = [row for row in rows if row["timestamp"] <= split.train_end]
    counts: dict[str, int] = {}
    train = _pretrain_split(train_rows, lambda row: True, cfg, "pretrain_train", counts)
    valid = _pretrain_split(
        rows, lambda row: row["timestamp"] > split.train_end, cfg, "pretrain_valid", counts
    )
    return SampleFrames(train, valid, counts)


def build_finetune_samples_reference(
    events: pl.DataFrame,
    requests: pl.DataFrame,
    split: SplitBoundaries,
    cfg: DataConfig,
    lags: np.ndarray,
) -> SampleFrames:
    """Compute what `samples.build_finetune_samples` computes, with the lags given.

    `lags[i]` (seconds) belongs to the i-th training request in (user, timestamp, request_id)
    order, the order of `samples.draw_request_lags`.
    """
    history_rows = [row for row in _sorted_events(events) if row["timestamp"] <= split.train_end]
    histories: dict[int, list[Row]] = {}
    truncated = 0
    for user, user_rows in _by_user(history_rows):
        kept_history: deque[Row] = deque(maxlen=cfg.max_history)
        for row in user_rows:
            kept_history.append(row)
        truncated += len(user_rows) - len(kept_history)
        histories[user] = list(kept_history)

    counts: dict[str, int] = {"finetune_history_events_truncated": truncated}
    train_requests = _sorted_requests(requests, "train")
    if len(lags) != len(train_requests):
        raise ValueError(f"got {len(lags)} lags for {len(train_requests)} training requests")
    for row, lag in zip(train_requests, lags, strict=True):
        row["lag"] = float(lag)
    train = _finetune_split(
        histories,
        train_requests,
        lambda event, request: event["timestamp"] <= request["timestamp"] - request["lag"],
        cfg,
        "finetune_train",
        counts,
    )
    valid = _finetune_split(
        histories,
        _sorted_requests(requests, "valid"),
        lambda event, request: event["timestamp"] < request["timestamp"],
        cfg,
        "finetune_valid",
        counts,
    )
    return SampleFrames(train, valid, counts)


def prepare_reference(
    data_path: str | Path, prepared_dir: str | Path, cfg: DataConfig
) -> dict[str, Any]:
    """Prepare `data_path` the plain way and write the tables that `prepare` writes.

    Writes `mappings/{user,product,source}.parquet` and the six tables of the prepared
    directory, which equal those of `cartformer.data.prepare.prepare` for the same input and
    config. All counts go to `reference_meta.json` as one dict, with no split into kept and
    dropped counts. The directory gets no `meta.json`, so the training stages do not accept it.
    The input is not validated: it must pass `cartformer.data.schema.validate_events`.
    Returns the content of `reference_meta.json`.
    """
    data_path = Path(data_path)
    prepared_dir = Path(prepared_dir)
    frame = read_events_reference(data_path)
    rows_read = frame.height
    mappings = fit_mappings_reference(frame)
    encoded = encode_events_reference(frame, mappings)
    del frame

    result = split_events_reference(encoded, mappings["source"], cfg)
    t_min = int(encoded["timestamp"].min())
    del encoded

    events, requests, boundaries = result.events, result.requests, result.boundaries
    pretrain = build_pretrain_samples_reference(events, boundaries, cfg)
    num_train_requests = requests.filter(pl.col("split") == "train").height
    lags = draw_request_lags(num_train_requests, cfg, cfg.seed)
    finetune = build_finetune_samples_reference(events, requests, boundaries, cfg, lags)

    (prepared_dir / "mappings").mkdir(parents=True, exist_ok=True)
    for name, mapping in mappings.items():
        _mapping_table(name, mapping).write_parquet(prepared_dir / "mappings" / f"{name}.parquet")
    tables = {
        "events": events,
        "requests": requests,
        "pretrain_train": pretrain.train,
        "pretrain_valid": pretrain.valid,
        "finetune_train": finetune.train,
        "finetune_valid": finetune.valid,
    }
    for name, table in tables.items():
        table.write_parquet(prepared_dir / f"{name}.parquet")

    meta = {
        "data_path": str(data_path),
        "config": dataclasses.asdict(cfg),
        "split": {"t_min": t_min, **boundaries.to_dict()},
        "vocab_sizes": {name: len(mapping) + 1 for name, mapping in mappings.items()},
        "counts": {
            "rows_read": rows_read,
            **result.counts,
            **pretrain.counts,
            **finetune.counts,
        },
    }
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    (prepared_dir / "reference_meta.json").write_text(text)
    logger.info("prepared %s with the reference path", prepared_dir)
    return json.loads(text)


def read_events_reference(data_path: str | Path) -> pl.DataFrame:
    """Read the whole parquet file eagerly, then keep the six required columns.

    Raises FileNotFoundError for a missing file and ValueError for missing columns.
    """
    data_path = Path(data_path)
    if not data_path.is_file():
        raise FileNotFoundError(f"input file {data_path} not found; pass a Lavka train.parquet")
    frame = pl.read_parquet(data_path)
    missing = [name for name in REQUIRED_COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(
            f"missing required column(s) {missing} in {data_path}; "
            f"add them in the Lavka train.parquet schema"
        )
    return frame.select(REQUIRED_COLUMNS)


def fit_mappings_reference(frame: pl.DataFrame) -> dict[str, Mapping]:
    """Number the sorted distinct users, products and surfaces from 1, in Python dicts.

    `frame` has the raw columns `user_id`, `product_id` (integers) and `source_type` (strings,
    where null becomes `NO_SURFACE`). Returns the dicts under "user", "product" and "source".
    """
    columns = {
        "user": frame["user_id"].cast(pl.UInt64),
        "product": frame["product_id"].cast(pl.UInt64),
        "source": frame["source_type"].cast(pl.String).fill_null(NO_SURFACE),
    }
    mappings: dict[str, Mapping] = {}
    for name, values in columns.items():
        distinct = sorted(values.unique().to_list())
        mappings[name] = {value: index for index, value in enumerate(distinct, start=1)}
        logger.info("%s mapping: %d values", name, len(distinct))
    return mappings


def encode_events_reference(frame: pl.DataFrame, mappings: dict[str, Mapping]) -> pl.DataFrame:
    """Replace raw ids, surfaces and action names by their codes with `Expr.replace_strict`.

    Returns the columns of `cartformer.data.split.encode_events`: `user`, `product`, `source`
    (i32), `action` (i8), `timestamp` (i64) and `request_id` (u64, nullable), shape (rows, 6).
    """
    return frame.select(
        pl.col("user_id")
        .cast(pl.UInt64)
        .replace_strict(mappings["user"], return_dtype=pl.Int32)
        .alias("user"),
        pl.col("product_id")
        .cast(pl.UInt64)
        .replace_strict(mappings["product"], return_dtype=pl.Int32)
        .alias("product"),
        pl.col("source_type")
        .cast(pl.String)
        .fill_null(NO_SURFACE)
        .replace_strict(mappings["source"], return_dtype=pl.Int32)
        .alias("source"),
        pl.col("action_type")
        .cast(pl.String)
        .replace_strict(ACTION_CODES, return_dtype=pl.Int8)
        .alias("action"),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("request_id").cast(pl.UInt64),
    )


def split_events_reference(
    encoded: pl.DataFrame, source_mapping: Mapping, cfg: DataConfig
) -> SplitResult:
    """Compute what `split.split_events` computes, with eager `group_by().agg()` and `mode`.

    `encoded` has the columns of `encode_events_reference`. The request rules are those of
    `split.build_requests`: view and cart rows with a request on a surface outside
    `cfg.excluded_surfaces`, grouped by (user, request_id, product), then by (user,
    request_id), with the most common surface, ties going to the smallest index.
    """
    valid_end = int(encoded["timestamp"].max())
    valid_start = valid_end - round(cfg.valid_days * DAY_SECONDS)
    train_end = valid_start - round(cfg.gap_days * DAY_SECONDS)
    boundaries = SplitBoundaries(train_end=train_end, valid_start=valid_start, valid_end=valid_end)

    events = (
        encoded.filter(pl.col("action") != VIEW)
        .select("user", "product", "source", "action", "timestamp")
        .sort(["user", "timestamp", "action", "product", "source"])
    )
    train_history = events.filter(pl.col("timestamp") <= train_end).height
    requests, request_counts = _requests_reference(encoded, boundaries, source_mapping, cfg)
    counts = {
        "positive_events": events.height,
        "positive_events_train": train_history,
        "positive_events_after_train_end": events.height - train_history,
        **request_counts,
    }
    logger.info("reference split counts: %s", counts)
    return SplitResult(boundaries=boundaries, events=events, requests=requests, counts=counts)


def _requests_reference(
    encoded: pl.DataFrame, boundaries: SplitBoundaries, source_mapping: Mapping, cfg: DataConfig
) -> tuple[pl.DataFrame, dict[str, int]]:
    view_or_cart = encoded.filter(pl.col("action").is_in([VIEW, CART]))
    with_request = view_or_cart.filter(pl.col("request_id").is_not_null())
    excluded = [source_mapping[name] for name in cfg.excluded_surfaces if name in source_mapping]
    on_excluded = pl.col("source").is_in(excluded)
    rows = with_request.filter(~on_excluded)

    groups = rows.group_by("user", "request_id", "product").agg(
        pl.col("action").max(),
        pl.col("timestamp").min(),
        pl.col("source").mode().min(),
    )
    # Rows inside a group keep the frame order, so sorting first orders each candidate list.
    candidates = (
        groups.sort("product")
        .group_by("user", "request_id")
        .agg(
            pl.col("timestamp").min(),
            pl.col("source").mode().min(),
            pl.col("product"),
            pl.col("action").alias("target"),
            pl.len().alias("size"),
            pl.col("action").max().alias("max_action"),
            pl.col("action").min().alias("min_action"),
        )
    )

    too_small = pl.col("size") < cfg.min_request_size
    has_cart = pl.col("max_action") == CART
    has_view = pl.col("min_action") == VIEW
    shared = candidates["request_id"].value_counts().filter(pl.col("count") > 1).height
    split_name = (
        pl.when(pl.col("timestamp") <= boundaries.train_end)
        .then(pl.lit("train"))
        .when(
            (pl.col("timestamp") > boundaries.valid_start)
            & (pl.col("timestamp") <= boundaries.valid_end)
        )
        .then(pl.lit("valid"))
        .otherwise(pl.lit("none"))
    )
    requests = (
        candidates.filter(~too_small & has_cart & has_view)
        .select(
            "user",
            "request_id",
            "timestamp",
            "source",
            pl.col("product").cast(pl.List(pl.Int32)),
            pl.col("target").cast(pl.List(pl.Int8)),
            split_name.alias("split"),
        )
        .sort(["user", "timestamp", "request_id"])
    )
    counts = {
        "rows_view_cart_without_request": view_or_cart.height - with_request.height,
        "rows_view_cart_excluded_surface": with_request.height - rows.height,
        "request_candidates": candidates.height,
        "requests_too_small": candidates.filter(too_small).height,
        "requests_without_cart": candidates.filter(~too_small & ~has_cart).height,
        "requests_without_view": candidates.filter(~too_small & has_cart & ~has_view).height,
        "request_ids_shared_by_users": shared,
        **{
            f"requests_{name}": requests.filter(pl.col("split") == name).height
            for name in ("train", "valid", "none")
        },
    }
    return requests, counts


def _mapping_table(name: str, mapping: Mapping) -> pl.DataFrame:
    """Return the mapping as the two-column table of `IdMapping.save`, shape (len(mapping), 2)."""
    if name == "source":
        keys = pl.Series("value", list(mapping), dtype=pl.String)
    else:
        keys = pl.Series("raw_id", list(mapping), dtype=pl.UInt64)
    indices = pl.Series("index", list(mapping.values()), dtype=pl.Int32)
    return pl.DataFrame([keys, indices])


def _sorted_events(events: pl.DataFrame) -> list[Row]:
    keys = ("user", "timestamp", "action", "product", "source")
    rows = list(events.select(*keys).iter_rows(named=True))
    return sorted(rows, key=operator.itemgetter(*keys))


def _sorted_requests(requests: pl.DataFrame, split_name: str) -> list[Row]:
    columns = ("user", "request_id", "timestamp", "source", "product", "target")
    rows = [
        {name: row[name] for name in columns}
        for row in requests.iter_rows(named=True)
        if row["split"] == split_name
    ]
    return sorted(rows, key=operator.itemgetter("user", "timestamp", "request_id"))


def _by_user(rows: Iterable[Row]) -> Iterator[tuple[int, list[Row]]]:
    for user, group in itertools.groupby(rows, key=operator.itemgetter("user")):
        yield user, list(group)


def _history_columns(user: int, history: list[Row]) -> Row:
    return {
        "user": user,
        "product": [row["product"] for row in history],
        "source": [row["source"] for row in history],
        "action": [row["action"] for row in history],
        "timestamp": [row["timestamp"] for row in history],
    }


def _pretrain_split(
    rows: list[Row], is_target: Any, cfg: DataConfig, prefix: str, counts: dict[str, int]
) -> pl.DataFrame:
    samples: list[Row] = []
    short = no_target = truncated = 0
    for user, user_rows in _by_user(rows):
        history: deque[Row] = deque(maxlen=cfg.max_history)
        for row in user_rows:
            history.append(row)
        truncated += len(user_rows) - len(history)
        if len(history) < cfg.min_history:
            short += 1
            continue
        targets = [i for i, row in enumerate(history) if is_target(row)]
        if not targets:
            no_target += 1
            continue
        samples.append({**_history_columns(user, list(history)), "target_index": targets})
    counts[f"{prefix}_users"] = len(samples)
    counts[f"{prefix}_users_short_history"] = short
    counts[f"{prefix}_users_no_target"] = no_target
    counts[f"{prefix}_events_truncated"] = truncated
    return pl.DataFrame(samples, schema=PRETRAIN_SCHEMA)


def _finetune_split(
    histories: dict[int, list[Row]],
    requests: list[Row],
    is_before: Any,
    cfg: DataConfig,
    prefix: str,
    counts: dict[str, int],
) -> pl.DataFrame:
    samples: list[Row] = []
    short_users = short_requests = no_state = truncated = no_requests_left = 0
    for user, user_requests in _by_user(requests):
        history = histories.get(user, [])
        if len(history) < cfg.min_history:
            short_users += 1
            short_requests += len(user_requests)
            continue

        kept_requests: deque[Row] = deque(maxlen=cfg.max_requests)
        for request in user_requests:
            state = -1
            for position, event in enumerate(history):
                if is_before(event, request):
                    state = position
            if state < 0:
                no_state += 1
                continue
            if len(kept_requests) == cfg.max_requests:
                truncated += 1
            kept_requests.append({**request, "state_index": state})
        if not kept_requests:
            no_requests_left += 1
            continue

        samples.append(
            {
                **_history_columns(user, history),
                "request_id": [r["request_id"] for r in kept_requests],
                "request_source": [r["source"] for r in kept_requests],
                "request_timestamp": [r["timestamp"] for r in kept_requests],
                "state_index": [r["state_index"] for r in kept_requests],
                "request_size": [len(r["product"]) for r in kept_requests],
                "candidate_product": [p for r in kept_requests for p in r["product"]],
                "candidate_target": [t for r in kept_requests for t in r["target"]],
            }
        )
    samples.sort(key=operator.itemgetter("user"))
    counts[f"{prefix}_users"] = len(samples)
    counts[f"{prefix}_requests"] = sum(len(sample["request_id"]) for sample in samples)
    counts[f"{prefix}_users_short_history"] = short_users
    counts[f"{prefix}_requests_of_short_history_users"] = short_requests
    counts[f"{prefix}_requests_no_state"] = no_state
    counts[f"{prefix}_requests_truncated"] = truncated
    counts[f"{prefix}_users_no_requests_left"] = no_requests_left
    return pl.DataFrame(samples, schema=FINETUNE_SCHEMA)
