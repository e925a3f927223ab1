import numpy as np
import polars as pl
import pytest

from cartformer.ranking.features import FEATURE_NAMES, KeyedEventTimes, compute_features

DAY = 24 * 60 * 60


def test_keyed_counts_match_scan():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 5, size=300)
    times = rng.integers(0, 50, size=300) * 1000
    index = KeyedEventTimes(keys, times)
    query_keys = rng.integers(0, 7, size=100)
    query_times = rng.integers(-2, 55, size=100) * 1000 + rng.integers(0, 2, size=100)
    for window in (None, 7000):
        counts = index.count_before(query_keys, query_times, window)
        for q in range(100):  # plain reference: scan every event
            before = (keys == query_keys[q]) & (times < query_times[q])
            if window is not None:
                before &= times >= query_times[q] - window
            assert counts[q] == before.sum(), (q, window)
    latest = index.latest_before(query_keys, query_times)
    for q in range(100):
        before = (keys == query_keys[q]) & (times < query_times[q])
        assert latest[q] == (times[before].max() if before.any() else -1), q


def test_no_events():
    index = KeyedEventTimes(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert index.count_before(np.array([1]), np.array([5])).tolist() == [0]
    assert index.latest_before(np.array([1]), np.array([5])).tolist() == [-1]


def random_events(rng, size=400):
    return pl.DataFrame(
        {
            "user": rng.integers(1, 6, size=size),
            "product": rng.integers(1, 9, size=size),
            "source": rng.integers(1, 4, size=size),
            "action": rng.integers(0, 4, size=size).astype(np.int8),
            "timestamp": rng.integers(0, 60 * DAY, size=size),
        }
    )


def reference_features(events, candidate):
    """Plain reference: every feature of one candidate from a scan of all events."""
    t = candidate["timestamp"]
    before = events.filter(pl.col("timestamp") < t)
    positive = pl.col("action").is_in([1, 2, 3])
    cart = pl.col("action") == 1
    view = pl.col("action") == 0
    user = pl.col("user") == candidate["user"]
    product = pl.col("product") == candidate["product"]
    surface = pl.col("source") == candidate["source"]

    def count(condition, days=None):
        rows = before.filter(condition)
        if days is not None:
            rows = rows.filter(pl.col("timestamp") >= t - days * DAY)
        return float(rows.height)

    own = before.filter(user & product & positive)
    return {
        "user_positive_7d": count(user & positive, 7),
        "user_positive_30d": count(user & positive, 30),
        "user_positive_all": count(user & positive),
        "product_cart_7d": count(product & cart, 7),
        "product_cart_30d": count(product & cart, 30),
        "product_cart_all": count(product & cart),
        "product_view_30d": count(product & view, 30),
        "product_view_all": count(product & view),
        "surface_product_cart_7d": count(surface & product & cart, 7),
        "surface_product_cart_30d": count(surface & product & cart, 30),
        "surface_product_cart_all": count(surface & product & cart),
        "surface_product_view_all": count(surface & product & view),
        "user_product_positive_30d": count(user & product & positive, 30),
        "user_product_positive_all": float(own.height),
        "user_product_days_since": (t - own["timestamp"].max()) / DAY if own.height else np.nan,
        "position_in_request": np.nan
        if candidate["position_in_request"] is None
        else float(candidate["position_in_request"]),
    }


def test_features_match_reference():
    rng = np.random.default_rng(2)
    events = random_events(rng)
    candidates = pl.DataFrame(
        {
            "user": rng.integers(1, 7, size=40),
            "product": rng.integers(1, 10, size=40),
            "source": rng.integers(1, 4, size=40),
            "timestamp": rng.integers(0, 65 * DAY, size=40),
            "position_in_request": pl.Series([None, *range(39)], dtype=pl.Int64),
        }
    )
    features = compute_features(events, candidates)
    assert features.columns == list(FEATURE_NAMES)
    for row, candidate in enumerate(candidates.iter_rows(named=True)):
        expected = reference_features(events, candidate)
        for name in FEATURE_NAMES:
            assert features[name][row] == pytest.approx(expected[name], nan_ok=True), (row, name)


def test_request_events_not_counted():
    events = pl.DataFrame(
        {
            "user": [1, 1],
            "product": [2, 2],
            "source": [1, 1],
            "action": [1, 1],
            "timestamp": [99, 100],
        }
    ).with_columns(pl.col("action").cast(pl.Int8))
    candidate = pl.DataFrame(
        {
            "user": [1],
            "product": [2],
            "source": [1],
            "timestamp": [100],
            "position_in_request": pl.Series([3], dtype=pl.Int64),
        }
    )
    features = compute_features(events, candidate)
    assert features["product_cart_all"][0] == 1
    assert features["user_product_positive_all"][0] == 1
