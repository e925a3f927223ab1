"""Random event frames in the schema of the Lavka competition's train.parquet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

DAY = 24 * 60 * 60
T0 = 1_700_000_000
SURFACES = ("ST_Catalog", "ST_Search", "ST_Main", "ST_Cart")


def make_lavka_frame(
    seed: int = 0,
    num_users: int = 30,
    num_products: int = 60,
    num_requests: int = 300,
    num_purchases: int = 400,
    days: int = 90,
) -> pl.DataFrame:
    """Build a shuffled event frame with all 12 competition columns and their dtypes.

    Each request has 6..15 viewed products from one surface. About 15% of the viewed products
    also get a cart row and 10% a click row in the same request, and a few cart rows come from
    another surface. Purchases have null request_id and source_type. Request ids are unique.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(6, 16, size=num_requests)
    request_users = rng.integers(1, num_users + 1, size=num_requests) * 7
    request_times = T0 + rng.integers(0, days * DAY, size=num_requests)
    request_sources = rng.integers(0, len(SURFACES), size=num_requests)
    request_ids = rng.permutation(num_requests).astype(np.uint64) + 1000

    rows = np.repeat(np.arange(num_requests), sizes)
    products = rng.integers(1, num_products + 1, size=rows.size) * 11
    views = {
        "user": request_users[rows],
        "request": request_ids[rows],
        "time": request_times[rows] + rng.integers(0, 60, size=rows.size),
        "source": request_sources[rows],
        "product": products,
    }
    frames = [_rows(views, "AT_View")]
    for action, rate in (("AT_CartUpdate", 0.15), ("AT_Click", 0.10)):
        picked = rng.random(rows.size) < rate
        followups = {key: value[picked] for key, value in views.items()}
        followups["time"] = followups["time"] + rng.integers(0, 600, size=int(picked.sum()))
        switch = rng.random(int(picked.sum())) < 0.1
        followups["source"] = np.where(switch, (followups["source"] + 1) % 4, followups["source"])
        frames.append(_rows(followups, action))

    purchases = pl.DataFrame(
        {
            "action_type": ["AT_Purchase"] * num_purchases,
            "request_id": pl.Series([None] * num_purchases, dtype=pl.UInt64),
            "source_type": pl.Series([None] * num_purchases, dtype=pl.String),
            "user_id": rng.integers(1, num_users + 1, size=num_purchases).astype(np.uint64) * 7,
            "product_id": rng.integers(1, num_products + 1, size=num_purchases).astype(np.uint64)
            * 11,
            "timestamp": T0 + rng.integers(0, days * DAY, size=num_purchases),
        }
    )
    frames.append(purchases)
    frame = pl.concat(frames, how="vertical_relaxed")
    frame = frame.with_columns(
        pl.lit("Moscow").alias("city_name"),
        pl.lit(1, dtype=pl.Int64).alias("position_in_request"),
        pl.lit("Dairy").alias("product_category"),
        pl.lit("http://127.0.0.1/image.png").alias("product_image"),
        pl.lit("Молоко").alias("product_name"),
        pl.lit(5, dtype=pl.UInt64).alias("store_id"),
    )
    order = rng.permutation(frame.height)
    return frame[order].select(
        "action_type",
        "city_name",
        "position_in_request",
        "product_category",
        pl.col("product_id").cast(pl.UInt64),
        "product_image",
        "product_name",
        pl.col("request_id").cast(pl.UInt64),
        "source_type",
        "store_id",
        pl.col("timestamp").cast(pl.Int64),
        pl.col("user_id").cast(pl.UInt64),
    )


def _rows(columns: dict[str, np.ndarray], action: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "action_type": [action] * len(columns["user"]),
            "request_id": columns["request"].astype(np.uint64),
            "source_type": np.asarray(SURFACES)[columns["source"]],
            "user_id": columns["user"].astype(np.uint64),
            "product_id": columns["product"].astype(np.uint64),
            "timestamp": columns["time"].astype(np.int64),
        }
    )


@pytest.fixture
def lavka_frame() -> pl.DataFrame:
    return make_lavka_frame()


@pytest.fixture
def lavka_file(tmp_path: Path, lavka_frame: pl.DataFrame) -> Path:
    path = tmp_path / "train.parquet"
    lavka_frame.write_parquet(path)
    return path


@pytest.fixture
def make_frame() -> Callable[..., pl.DataFrame]:
    return make_lavka_frame
