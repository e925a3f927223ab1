"""Counter features of request candidates, computed only from events before each request.

Every feature of a candidate shown at request time t counts events with timestamp < t, so no
event of the request itself or of a later one enters. Counts are vectorized with one sorted
array of packed (key, time rank) values per key kind and two `searchsorted` calls per window.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cartformer.config import DAY_SECONDS
from cartformer.data.schema import CART, POSITIVE_ACTIONS, VIEW

WINDOW_DAYS: tuple[int | None, ...] = (7, 30, None)
"""Counter windows in days before the request; None counts every earlier event."""

FEATURE_NAMES: tuple[str, ...] = (
    "user_positive_7d",
    "user_positive_30d",
    "user_positive_all",
    "product_cart_7d",
    "product_cart_30d",
    "product_cart_all",
    "product_view_30d",
    "product_view_all",
    "surface_product_cart_7d",
    "surface_product_cart_30d",
    "surface_product_cart_all",
    "surface_product_view_all",
    "user_product_positive_30d",
    "user_product_positive_all",
    "user_product_days_since",
    "position_in_request",
)
"""Features of `compute_features`, in column order. Positive events are cart updates, clicks
and purchases, and the surface is the request's surface."""


class KeyedEventTimes:
    """Event times grouped by an integer key, for counting events of a key before a time.

    Args:
        keys: (E,) int64 key of each event.
        times: (E,) int64 event times, unix seconds.
    """

    def __init__(self, keys: np.ndarray, times: np.ndarray) -> None:
        self.unique_keys, key_ids = np.unique(keys.astype(np.int64), return_inverse=True)
        self.distinct_times = np.unique(times.astype(np.int64))
        # Time ranks keep the packed values below (keys + 1) * (times + 1) <= (E + 1) ** 2.
        self.span = self.distinct_times.size + 1
        time_ranks = np.searchsorted(self.distinct_times, times)
        self.packed = np.sort(key_ids.astype(np.int64) * self.span + time_ranks)

    def _query(self, keys: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (Q,) bool `known` and (Q,) int64 packed bounds: the first packed position of
        events of the key at or after `times`."""
        if self.unique_keys.size == 0:
            return np.zeros(keys.shape, dtype=bool), np.zeros(keys.shape, dtype=np.int64)
        key_ids = np.searchsorted(self.unique_keys, keys)
        key_ids = np.minimum(key_ids, self.unique_keys.size - 1)
        known = self.unique_keys[key_ids] == keys
        ranks = np.searchsorted(self.distinct_times, times, side="left")
        return known, key_ids.astype(np.int64) * self.span + ranks

    def count_before(
        self, keys: np.ndarray, times: np.ndarray, window_seconds: int | None = None
    ) -> np.ndarray:
        """(Q,) int64 number of events of each key with time in [times - window, times), or
        with time < times when `window_seconds` is None."""
        known, upper = self._query(keys, times)
        counts = np.searchsorted(self.packed, upper, side="left")
        if window_seconds is None:
            lower = upper - upper % self.span  # the first packed value of the key
        else:
            _, lower = self._query(keys, times - window_seconds)
        counts = counts - np.searchsorted(self.packed, lower, side="left")
        return np.where(known, counts, 0)

    def latest_before(self, keys: np.ndarray, times: np.ndarray) -> np.ndarray:
        """(Q,) int64 time of the latest event of each key with time < times, or -1."""
        if self.packed.size == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        known, upper = self._query(keys, times)
        position = np.searchsorted(self.packed, upper, side="left") - 1
        value = self.packed[np.clip(position, 0, None)]
        same_key = known & (position >= 0) & (value // self.span == upper // self.span)
        latest = self.distinct_times[value % self.span]
        return np.where(same_key, latest, -1)


def compute_features(events: pl.DataFrame, candidates: pl.DataFrame) -> pl.DataFrame:
    """Compute `FEATURE_NAMES` for every candidate.

    Args:
        events: (E,) encoded events of all action types: `user`, `product`, `source` (integer
            indices), `action` (code) and `timestamp` (unix seconds).
        candidates: (K,) rows with `user`, `product`, `source` (the request's surface),
            `timestamp` (the request time) and `position_in_request` (nullable).

    Returns:
        (K,) rows with the Float64 columns of `FEATURE_NAMES`, in candidate order. Counts are
        whole numbers, `user_product_days_since` is NaN when the user never had the product,
        and `position_in_request` is NaN when it is unknown.
    """
    action = events["action"].to_numpy()
    event_time = events["timestamp"].to_numpy().astype(np.int64)
    num_products = int(max(events["product"].max() or 0, candidates["product"].max() or 0)) + 1
    num_sources = int(max(events["source"].max() or 0, candidates["source"].max() or 0)) + 1

    def keyed(kind: str, frame: pl.DataFrame) -> np.ndarray:
        user = frame["user"].to_numpy().astype(np.int64)
        product = frame["product"].to_numpy().astype(np.int64)
        source = frame["source"].to_numpy().astype(np.int64)
        if kind == "user":
            return user
        if kind == "product":
            return product
        if kind == "surface_product":
            return product * num_sources + source
        return user * num_products + product

    positive = np.isin(action, POSITIVE_ACTIONS)
    selections = {
        ("user", "positive"): positive,
        ("product", "cart"): action == CART,
        ("product", "view"): action == VIEW,
        ("surface_product", "cart"): action == CART,
        ("surface_product", "view"): action == VIEW,
        ("user_product", "positive"): positive,
    }
    request_time = candidates["timestamp"].to_numpy().astype(np.int64)
    columns: dict[str, np.ndarray] = {}
    indices: dict[tuple[str, str], KeyedEventTimes] = {}
    for (kind, action_name), selected in selections.items():
        index = KeyedEventTimes(keyed(kind, events)[selected], event_time[selected])
        indices[(kind, action_name)] = index
        query = keyed(kind, candidates)
        for days in WINDOW_DAYS:
            name = f"{kind}_{action_name}_{'all' if days is None else f'{days}d'}"
            if name in FEATURE_NAMES:
                window = None if days is None else days * DAY_SECONDS
                columns[name] = index.count_before(query, request_time, window).astype(np.float64)

    latest = indices[("user_product", "positive")].latest_before(
        keyed("user_product", candidates), request_time
    )
    columns["user_product_days_since"] = np.where(
        latest >= 0, (request_time - latest) / DAY_SECONDS, np.nan
    )
    columns["position_in_request"] = (
        candidates["position_in_request"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    )
    return pl.DataFrame({name: columns[name] for name in FEATURE_NAMES})
