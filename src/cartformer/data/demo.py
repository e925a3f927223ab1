"""Generator of Lavka-schema demo data with learnable structure, and its oracle file.

The real competition file cannot be shipped, so cartformer generates events with the same 12
columns and dtypes. Shoppers have latent tastes that drift over time, repeat purchases follow
product-specific cycles, and each surface fills its lists in its own way. The generator records
the true cart probability of every shown (request, product) pair. Ranking by it is the best any
model can do in expectation. docs/demo-data.md describes the stochastic model and its parameters.

Example:
    data_path, oracle_path = write_demo("demo/train.parquet", size="small", seed=0)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from cartformer.data.demo_simulation import Simulation, simulate, splitmix64
from cartformer.data.demo_vocab import CATEGORIES, IMAGE_URL_PREFIX
from cartformer.data.demo_world import DEMO_SIZES, SURFACES, DemoSize, World, build_world
from cartformer.data.schema import ACTION_CODES

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_SIZES",
    "EVENT_SCHEMA",
    "ORACLE_SCHEMA",
    "DemoSize",
    "generate_demo",
    "oracle_path_for",
    "write_demo",
]

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "action_type": pl.String(),
    "city_name": pl.String(),
    "position_in_request": pl.Int64(),
    "product_category": pl.String(),
    "product_id": pl.UInt64(),
    "product_image": pl.String(),
    "product_name": pl.String(),
    "request_id": pl.UInt64(),
    "source_type": pl.String(),
    "store_id": pl.UInt64(),
    "timestamp": pl.Int64(),
    "user_id": pl.UInt64(),
}
"""Columns and dtypes of the generated events: the real `train.parquet` columns, alphabetical."""

ORACLE_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.UInt64(),
    "product_id": pl.UInt64(),
    "cart_probability": pl.Float64(),
}

ORACLE_SUFFIX = ".oracle.parquet"
WRITE_CHUNK_ROWS = 2_000_000
"""Event rows per parquet row group in `write_demo`."""


def generate_demo(size: str = "small", seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generate demo events and their oracle table.

    Args:
        size: a key of DEMO_SIZES: "tiny" (unit tests), "small" (default) or "full" (the real
            file's shape: about 3.5k users, 26.5k products and 16.5M rows).
        seed: seed of every random draw. The same seed gives identical frames.

    Returns:
        (events, oracle). `events` has the columns and dtypes of EVENT_SCHEMA, rows in random
        order. `oracle` has one row per shown (request_id, product_id) pair with the probability
        that the generator used to draw a cart for it (ORACLE_SCHEMA).

    Raises:
        ValueError: if `size` is not a key of DEMO_SIZES.
    """
    demo = _simulate(size, seed)
    events = _event_frame(demo, demo.row_order)
    return events, _oracle_frame(demo)


def oracle_path_for(data_path: str | Path) -> Path:
    """Return the oracle file path beside `data_path`: `<dir>/<stem>.oracle.parquet`."""
    path = Path(data_path)
    return path.with_name(path.stem + ORACLE_SUFFIX)


def write_demo(path: str | Path, size: str = "small", seed: int = 0) -> tuple[Path, Path]:
    """Generate demo data and write it to `path` and its oracle to `oracle_path_for(path)`.

    The files hold the same rows as `generate_demo(size, seed)`. Events are written in row
    groups of WRITE_CHUNK_ROWS, so the string columns of the whole file are never in memory at
    once. Parent directories are created and existing files are overwritten.

    Returns:
        (data path, oracle path).

    Raises:
        ValueError: if `size` is not a key of DEMO_SIZES or `path` does not end in .parquet.
    """
    data_path = Path(path)
    if data_path.suffix != ".parquet":
        raise ValueError(f"demo data path {data_path} must end in .parquet, e.g. train.parquet")
    oracle_path = oracle_path_for(data_path)
    demo = _simulate(size, seed)
    data_path.parent.mkdir(parents=True, exist_ok=True)

    with pq.ParquetWriter(data_path, _arrow_event_schema(), compression="zstd") as writer:
        for start in range(0, len(demo.row_order), WRITE_CHUNK_ROWS):
            rows = demo.row_order[start : start + WRITE_CHUNK_ROWS]
            writer.write_table(_event_frame(demo, rows).to_arrow())
    _oracle_frame(demo).write_parquet(oracle_path)
    logger.info("wrote %s and %s", data_path, oracle_path)
    return data_path, oracle_path


@dataclass
class _Demo:
    """A simulated demo data set with its raw ids, before conversion to frames."""

    world: World
    simulation: Simulation
    user_ids: np.ndarray  # (U,) uint64
    product_ids: np.ndarray  # (P,) uint64
    store_ids: np.ndarray  # (S,) uint64
    request_ids: np.ndarray  # (R,) uint64
    row_order: np.ndarray  # (E,) int64 random permutation of the event rows
    product_images: pl.Series  # (P,) String image URLs


def _simulate(size: str, seed: int) -> _Demo:
    """Run every random draw of one demo data set: world, simulation, ids and row order."""
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; use one of {sorted(DEMO_SIZES)}")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    world = build_world(DEMO_SIZES[size], rng)
    simulation = simulate(DEMO_SIZES[size], world, rng)
    product_ids = _unique_ids(len(world.product_category), rng)
    image_hash = splitmix64(product_ids)
    demo = _Demo(
        world=world,
        simulation=simulation,
        user_ids=_unique_ids(len(world.user_city), rng),
        product_ids=product_ids,
        store_ids=_unique_ids(len(world.store_city), rng),
        request_ids=_unique_ids(simulation.num_requests, rng),
        row_order=rng.permutation(len(simulation.user)),
        product_images=pl.Series(
            [f"{IMAGE_URL_PREFIX}{value:016x}.jpg" for value in image_hash.tolist()]
        ),
    )
    logger.info(
        "simulated the %s demo (seed %d): %d rows, %d requests, %d oracle pairs in %.1f s",
        size,
        seed,
        len(simulation.user),
        simulation.num_requests,
        len(simulation.oracle_request),
        time.perf_counter() - started,
    )
    return demo


def _unique_ids(count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `count` distinct uint64 ids spread over the whole uint64 range, like hashed ids."""
    ids = rng.integers(0, 2**64, count, dtype=np.uint64)
    while True:
        _, first = np.unique(ids, return_index=True)
        duplicate = np.ones(count, bool)
        duplicate[first] = False
        if not duplicate.any():
            return ids
        ids[duplicate] = rng.integers(0, 2**64, int(duplicate.sum()), dtype=np.uint64)


def _event_frame(demo: _Demo, rows: np.ndarray) -> pl.DataFrame:
    """Build the events frame of the simulated rows `rows`, (N,) int64, in that order."""
    world, simulation = demo.world, demo.simulation
    product = simulation.product[rows]
    store = simulation.store[rows]
    request = simulation.request[rows]
    has_request = request >= 0

    action_names = pl.Series(sorted(ACTION_CODES, key=ACTION_CODES.__getitem__))
    category_names = pl.Series([category.name for category in CATEGORIES])
    surface_names = pl.Series([surface.name for surface in SURFACES])
    columns = {
        "action_type": action_names.gather(simulation.action[rows]),
        "city_name": pl.Series(world.city_names).gather(world.store_city[store]),
        "position_in_request": pl.Series(simulation.position[rows].astype(np.int64)),
        "product_category": category_names.gather(world.product_category[product]),
        "product_id": pl.Series(demo.product_ids[product]),
        "product_image": demo.product_images.gather(product),
        "product_name": pl.Series(world.product_names).gather(product),
        "request_id": pl.Series(demo.request_ids[np.where(has_request, request, 0)]),
        "source_type": surface_names.gather(np.where(has_request, simulation.surface[rows], 0)),
        "store_id": pl.Series(demo.store_ids[store]),
        "timestamp": pl.Series(simulation.timestamp[rows]),
        "user_id": pl.Series(demo.user_ids[simulation.user[rows]]),
    }
    # Purchases have no request, surface or position.
    events = pl.DataFrame(columns).with_columns(
        pl.when(pl.Series(has_request)).then(pl.col(name)).alias(name)
        for name in ("position_in_request", "request_id", "source_type")
    )
    return events.cast(EVENT_SCHEMA)  # type: ignore[arg-type]


def _oracle_frame(demo: _Demo) -> pl.DataFrame:
    simulation = demo.simulation
    return pl.DataFrame(
        {
            "request_id": demo.request_ids[simulation.oracle_request],
            "product_id": demo.product_ids[simulation.oracle_product],
            "cart_probability": simulation.oracle_probability,
        },
        schema=ORACLE_SCHEMA,
    )


def _arrow_event_schema() -> pa.Schema:
    """Return the Arrow schema of the event chunks, taken from an empty frame."""
    empty = pl.DataFrame(schema=EVENT_SCHEMA)
    return empty.to_arrow().schema
