"""Plain per-user implementation of the pretrain and finetune samples, for tests and benchmarks.

This module loops over users and events in Python on purpose: it sorts the rows, walks each
user's events with a `collections.deque(maxlen=max_history)` and finds each request's state with
a linear scan. It is slow but easy to check by reading, and `cartformer.data.samples` must
produce exactly the same frames and counts. It shares only the output schemas with that module.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import polars as pl

from cartformer.config import DataConfig
from cartformer.data.samples import FINETUNE_SCHEMA, PRETRAIN_SCHEMA, SampleFrames
from cartformer.data.split import SplitBoundaries

Row = dict[str, Any]


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
