from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from cartformer.config import DAY_SECONDS, DataConfig
from cartformer.data.reference import (
    build_finetune_samples_reference,
    build_pretrain_samples_reference,
)
from cartformer.data.samples import (
    FINETUNE_SCHEMA,
    PRETRAIN_SCHEMA,
    build_finetune_samples,
    build_pretrain_samples,
    draw_request_lags,
    sort_requests,
)
from cartformer.data.split import SplitBoundaries

HALF_DAY = DAY_SECONDS // 2
# Times on a half-day grid, sometimes shifted by one second. This gives ties between events,
# events exactly one lag before a request and events exactly one second before a request.
grid_times = st.tuples(st.integers(0, 60), st.integers(0, 1)).map(lambda t: t[0] * HALF_DAY + t[1])


def events_frame(rows: list[tuple[int, int, int, int, int]]) -> pl.DataFrame:
    """Build an events table from (user, timestamp, action, product, source) tuples."""
    return pl.DataFrame(
        rows,
        schema={
            "user": pl.Int32,
            "timestamp": pl.Int64,
            "action": pl.Int8,
            "product": pl.Int32,
            "source": pl.Int32,
        },
        orient="row",
    ).select("user", "product", "source", "action", "timestamp")


def requests_frame(
    rows: list[tuple[int, int, int, int, list[int], list[int], str]],
) -> pl.DataFrame:
    """Build a requests table from (user, request_id, timestamp, source, product, target, split)."""
    return pl.DataFrame(
        rows,
        schema={
            "user": pl.Int32,
            "request_id": pl.UInt64,
            "timestamp": pl.Int64,
            "source": pl.Int32,
            "product": pl.List(pl.Int32),
            "target": pl.List(pl.Int8),
            "split": pl.String,
        },
        orient="row",
    )


def boundaries(train_end: int) -> SplitBoundaries:
    return SplitBoundaries(train_end=train_end, valid_start=train_end + 1, valid_end=10**10)


event_rows = st.lists(
    st.tuples(
        st.integers(1, 3),  # user
        grid_times,  # timestamp
        st.integers(1, 3),  # action
        st.integers(1, 5),  # product
        st.integers(1, 3),  # source
    ),
    min_size=10,
    max_size=60,
)


@st.composite
def request_rows(draw: st.DrawFn) -> list[tuple]:
    keys = draw(
        st.lists(
            st.tuples(st.integers(1, 4), st.integers(0, 8)), unique=True, min_size=1, max_size=20
        )  # (user, request_id); the same request_id may recur for another user
    )
    rows = []
    for user, request_id in keys:
        size = draw(st.integers(1, 3))
        rows.append(
            (
                user,
                request_id,
                draw(grid_times.map(lambda t: t + 10 * HALF_DAY)),
                draw(st.integers(1, 3)),
                draw(st.lists(st.integers(1, 9), min_size=size, max_size=size)),
                draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)),
                draw(st.sampled_from(["train", "train", "valid", "none"])),
            )
        )
    return rows


lag_ranges = st.sampled_from([(1.0, 1.0), (2.0, 2.0), (1.0, 4.0), (2.0, 32.0)])
small_configs = st.builds(
    lambda lag_range, **values: DataConfig(
        lag_min_days=lag_range[0], lag_max_days=lag_range[1], **values
    ),
    lag_range=lag_ranges,
    min_history=st.integers(1, 3),
    max_history=st.integers(3, 6),
    max_requests=st.integers(1, 2),
)
property_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@property_settings
@given(
    rows=event_rows,
    train_end=st.integers(0, 60).map(lambda k: k * HALF_DAY),
    cfg=small_configs,
)
def test_pretrain_matches_reference(rows, train_end, cfg) -> None:
    events = events_frame(rows)
    split = boundaries(train_end)

    fast = build_pretrain_samples(events, split, cfg)
    plain = build_pretrain_samples_reference(events, split, cfg)

    assert_frame_equal(fast.train, plain.train)
    assert_frame_equal(fast.valid, plain.valid)
    assert fast.counts == plain.counts


@property_settings
@given(
    rows=event_rows,
    requests=request_rows(),
    train_end=st.integers(0, 60).map(lambda k: k * HALF_DAY),
    cfg=small_configs,
    seed=st.integers(0, 3),
)
def test_finetune_matches_reference(rows, requests, train_end, cfg, seed) -> None:
    events = events_frame(rows)
    table = requests_frame(requests)
    split = boundaries(train_end)
    lags = draw_request_lags(sort_requests(table, "train").height, cfg, seed)

    fast = build_finetune_samples(events, table, split, cfg, seed)
    plain = build_finetune_samples_reference(events, table, split, cfg, lags)

    assert_frame_equal(fast.train, plain.train)
    assert_frame_equal(fast.valid, plain.valid)
    assert fast.counts == plain.counts


def test_pretrain_spec_example() -> None:
    # Five events, the first three in training. min_history is 3 so that the three-event
    # training history is kept.
    rows = [
        (1, t, a, p, s)
        for t, a, p, s in zip(
            [10, 20, 30, 40, 50], [2, 1, 2, 1, 2], [1, 2, 3, 4, 5], [1, 1, 2, 3, 4], strict=True
        )
    ]
    cfg = DataConfig(min_history=3)

    samples = build_pretrain_samples(events_frame(rows), boundaries(30), cfg)
    train = samples.train.row(0, named=True)
    valid = samples.valid.row(0, named=True)

    assert train["product"] == [1, 2, 3]
    assert train["target_index"] == [0, 1, 2]
    assert valid["product"] == [1, 2, 3, 4, 5]
    assert valid["source"] == [1, 1, 2, 3, 4]
    assert valid["action"] == [2, 1, 2, 1, 2]
    assert valid["target_index"] == [3, 4]


def test_pretrain_schema() -> None:
    rows = [(1, t, 1, 1, 1) for t in range(6)]
    samples = build_pretrain_samples(events_frame(rows), boundaries(2), DataConfig())
    assert dict(samples.train.schema) == PRETRAIN_SCHEMA
    assert dict(samples.valid.schema) == PRETRAIN_SCHEMA


def test_pretrain_truncates_to_last_events() -> None:
    rows = [(1, t, 1, t, 1) for t in range(10)]
    cfg = DataConfig(max_history=4, min_history=2)

    samples = build_pretrain_samples(events_frame(rows), boundaries(7), cfg)

    assert samples.train["product"].to_list() == [[4, 5, 6, 7]]
    assert samples.valid["product"].to_list() == [[6, 7, 8, 9]]
    assert samples.valid["target_index"].to_list() == [[2, 3]]
    assert samples.counts["pretrain_train_events_truncated"] == 4


def test_pretrain_drops_short_and_targetless() -> None:
    rows = [(1, t, 1, 1, 1) for t in range(4)] + [(2, t, 1, 1, 1) for t in range(6)]
    samples = build_pretrain_samples(events_frame(rows), boundaries(100), DataConfig())

    assert samples.train["user"].to_list() == [2]
    assert samples.counts["pretrain_train_users_short_history"] == 1
    assert samples.valid.height == 0
    assert samples.counts["pretrain_valid_users_no_target"] == 1


def test_pretrain_sorts_unsorted_events() -> None:
    rows = [(1, t, 1, t, 1) for t in (5, 3, 1, 4, 2)]
    samples = build_pretrain_samples(events_frame(rows), boundaries(100), DataConfig())
    assert samples.train["timestamp"].to_list() == [[1, 2, 3, 4, 5]]


def fixed_lag_config(**changes) -> DataConfig:
    """Config with a constant lag of one day, so that state indices are predictable."""
    return DataConfig(lag_min_days=1.0, lag_max_days=1.0, **changes)


def test_finetune_state_respects_lag() -> None:
    day = DAY_SECONDS
    rows = [(1, k * day, 2, k + 1, 1) for k in range(6)]
    requests = requests_frame(
        [
            (1, 7, 3 * day, 2, [9, 8], [1, 0], "train"),  # latest event <= 2 days: index 2
            (1, 8, 3 * day + 1, 2, [5], [1], "train"),  # latest event <= 2 days + 1 s: index 2
            (1, 9, 6 * day, 3, [4], [0], "valid"),  # validation: latest event < 6 days: 5
        ]
    )

    samples = build_finetune_samples(
        events_frame(rows), requests, boundaries(10 * day), fixed_lag_config(), seed=0
    )
    train = samples.train.row(0, named=True)
    valid = samples.valid.row(0, named=True)

    assert train["state_index"] == [2, 2]
    assert train["request_id"] == [7, 8]
    assert train["request_size"] == [2, 1]
    assert train["candidate_product"] == [9, 8, 5]
    assert train["candidate_target"] == [1, 0, 1]
    assert valid["state_index"] == [5]


def test_finetune_validation_state_is_strict() -> None:
    rows = [(1, t, 2, t, 1) for t in (10, 20, 30, 40, 50)]
    requests = requests_frame([(1, 1, 50, 1, [1], [1], "valid")])
    samples = build_finetune_samples(
        events_frame(rows), requests, boundaries(100), DataConfig(), seed=0
    )
    assert samples.valid["state_index"].to_list() == [[3]]


def test_finetune_drops_requests_without_state() -> None:
    day = DAY_SECONDS
    rows = [(1, k * day, 2, k, 1) for k in range(10, 15)]
    requests = requests_frame([(1, 1, 10 * day, 1, [1], [1], "train")])
    samples = build_finetune_samples(
        events_frame(rows), requests, boundaries(100 * day), fixed_lag_config(), seed=0
    )
    assert samples.train.height == 0
    assert samples.counts["finetune_train_requests_no_state"] == 1
    assert samples.counts["finetune_train_users_no_requests_left"] == 1


def test_finetune_state_outside_kept_history() -> None:
    day = DAY_SECONDS
    rows = [(1, k * day, 2, k, 1) for k in range(10)]
    requests = requests_frame(
        [(1, 1, 3 * day, 1, [1], [1], "train"), (1, 2, 20 * day, 1, [2], [1], "train")]
    )
    cfg = fixed_lag_config(max_history=5)
    samples = build_finetune_samples(
        events_frame(rows), requests, boundaries(100 * day), cfg, seed=0
    )
    assert samples.train["request_id"].to_list() == [[2]]
    assert samples.train["state_index"].to_list() == [[4]]
    assert samples.counts["finetune_train_requests_no_state"] == 1


def test_finetune_keeps_last_requests() -> None:
    rows = [(1, t, 2, t, 1) for t in range(5)]
    requests = requests_frame([(1, r, 100 + r, 1, [r], [1], "valid") for r in (3, 1, 2, 0)])
    cfg = DataConfig(max_requests=2)
    samples = build_finetune_samples(events_frame(rows), requests, boundaries(50), cfg, seed=0)
    assert samples.valid["request_id"].to_list() == [[2, 3]]
    assert samples.counts["finetune_valid_requests_truncated"] == 2


def test_finetune_drops_short_history_users() -> None:
    rows = [(1, t, 2, t, 1) for t in range(4)]
    requests = requests_frame(
        [(1, 1, 100, 1, [1], [1], "valid"), (2, 1, 100, 1, [1], [1], "valid")]
    )
    samples = build_finetune_samples(events_frame(rows), requests, boundaries(50), DataConfig(), 0)
    assert samples.valid.height == 0
    assert samples.counts["finetune_valid_users_short_history"] == 2
    assert samples.counts["finetune_valid_requests_of_short_history_users"] == 2


def test_finetune_schema() -> None:
    rows = [(1, t, 2, t, 1) for t in range(5)]
    requests = requests_frame([(1, 1, 100, 1, [1], [1], "valid")])
    samples = build_finetune_samples(events_frame(rows), requests, boundaries(50), DataConfig(), 0)
    assert dict(samples.train.schema) == FINETUNE_SCHEMA
    assert dict(samples.valid.schema) == FINETUNE_SCHEMA


def test_finetune_seed_is_deterministic() -> None:
    day = DAY_SECONDS
    rows = [(1, k * day, 2, k, 1) for k in range(40)]
    requests = requests_frame([(1, r, (35 + r % 5) * day, 1, [1], [1], "train") for r in range(20)])
    split = boundaries(100 * day)
    first = build_finetune_samples(events_frame(rows), requests, split, DataConfig(), seed=7)
    again = build_finetune_samples(events_frame(rows), requests, split, DataConfig(), seed=7)
    other = build_finetune_samples(events_frame(rows), requests, split, DataConfig(), seed=8)
    assert_frame_equal(first.train, again.train)
    assert first.train["state_index"].to_list() != other.train["state_index"].to_list()


def test_lags_within_bounds() -> None:
    lags = draw_request_lags(1000, DataConfig(), seed=0)
    assert lags.shape == (1000,)
    assert lags.min() >= 2 * DAY_SECONDS
    assert lags.max() < 32 * DAY_SECONDS
    assert np.unique(lags).size == 1000


def test_finetune_wide_time_range() -> None:
    # Large user indices and a time span of 2**50 s overflow the packed (user, time) key,
    # which switches the state search to time ranks.
    user = 2**20
    rows = [(user, t, 2, t % 7, 1) for t in (0, 5, 2**40, 2**45, 2**50)]
    requests = requests_frame(
        [(user, 1, 2**45 + 1, 1, [1], [1], "valid"), (user, 2, 2**50 + 9, 1, [1], [1], "valid")]
    )
    split = boundaries(2**50)
    cfg = DataConfig()

    fast = build_finetune_samples(events_frame(rows), requests, split, cfg, seed=0)
    plain = build_finetune_samples_reference(events_frame(rows), requests, split, cfg, np.zeros(0))

    assert fast.valid["state_index"].to_list() == [[3, 4]]
    assert_frame_equal(fast.valid, plain.valid)


def test_invalid_config_rejected() -> None:
    events = events_frame([(1, 0, 1, 1, 1)])
    with pytest.raises(ValueError, match="min_history=9 exceeds max_history=4"):
        build_pretrain_samples(events, boundaries(0), DataConfig(min_history=9, max_history=4))
    with pytest.raises(ValueError, match="lag_min_days=5.0"):
        build_finetune_samples(
            events,
            requests_frame([]),
            boundaries(0),
            DataConfig(lag_min_days=5.0, lag_max_days=2.0),
            0,
        )


def with_event_context(events: pl.DataFrame) -> pl.DataFrame:
    """Add city and store columns that are functions of each event's own values."""
    return events.with_columns(
        ((pl.col("product") * 7 + pl.col("timestamp") % 5) % 11).cast(pl.Int32).alias("city"),
        (pl.col("source") + 100).cast(pl.Int32).alias("store"),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=event_rows,
    requests=request_rows(),
    train_end=st.integers(0, 60).map(lambda k: k * HALF_DAY),
    cfg=small_configs,
)
def test_context_columns_follow_events(rows, requests, train_end, cfg) -> None:
    events = events_frame(rows)
    table = requests_frame(requests)
    split = boundaries(train_end)
    context_table = table.with_columns((pl.col("request_id") % 13).cast(pl.Int32).alias("city"))

    plain_pretrain = build_pretrain_samples(events, split, cfg)
    pretrain = build_pretrain_samples(with_event_context(events), split, cfg)
    plain_finetune = build_finetune_samples(events, table, split, cfg, 0)
    finetune = build_finetune_samples(with_event_context(events), context_table, split, cfg, 0)

    for plain, frame in (
        (plain_pretrain.train, pretrain.train),
        (plain_pretrain.valid, pretrain.valid),
        (plain_finetune.train, finetune.train),
        (plain_finetune.valid, finetune.valid),
    ):
        assert_frame_equal(frame.select(plain.columns), plain)
        flat = frame.select("product", "source", "timestamp", "city", "store").explode(
            "product", "source", "timestamp", "city", "store"
        )
        assert flat["city"].equals(
            ((flat["product"] * 7 + flat["timestamp"] % 5) % 11).cast(pl.Int32)
        )
        assert flat["store"].equals((flat["source"] + 100).cast(pl.Int32))
    for frame in (finetune.train, finetune.valid):
        requests_flat = frame.select("request_id", "request_city").explode(
            "request_id", "request_city"
        )
        expected = (requests_flat["request_id"] % 13).cast(pl.Int32)
        assert requests_flat["request_city"].equals(expected, check_names=False)
        assert "request_store" not in frame.columns
