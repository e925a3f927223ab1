"""Reading and checking the inputs of `cartformer score`: a requests file and an event log.

A requests file has the Lavka schema of the competition's test file: one row per shown
(request, product), with `user_id`, `request_id`, `product_id`, `timestamp` (unix seconds) and
`source_type`. It may lack `action_type` and `position_in_request` and may carry an integer
`index` column, which is passed through to the scores. The event log is a Lavka
`train.parquet`, from which the positive events (cart updates, clicks, purchases) form the
histories.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from cartformer.data.encoding import INDEX_DTYPE, IdMapping
from cartformer.data.schema import (
    ACTION_CODES,
    CART,
    POSITIVE_ACTIONS,
    InvalidDataError,
    validate_events,
)

logger = logging.getLogger(__name__)

REQUEST_COLUMNS: tuple[str, ...] = (
    "user_id",
    "request_id",
    "product_id",
    "timestamp",
    "source_type",
)
"""Columns every requests file needs."""
INDEX_COLUMN = "index"
"""Optional integer row id of a requests file, as in the competition's test file."""
EVENT_LOG_COLUMNS: tuple[str, ...] = (
    "action_type",
    "product_id",
    "source_type",
    "timestamp",
    "user_id",
)
"""Columns of the event log that the histories and the fallback popularity use."""


def scan_parquet_file(path: str | Path, role: str) -> pl.LazyFrame:
    """Open `path` lazily, raising a one-line error when it is missing or not parquet.

    `role` names the file in messages, e.g. "requests file".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} not found: {path}; check the path")
    try:
        pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"cannot read {role} {path} as parquet ({first_line}); pass a Lavka-schema parquet file"
        ) from error
    return pl.scan_parquet(path)


def read_requests(path: str | Path) -> pl.DataFrame:
    """Read and check a requests file.

    Returns one row per input row, in file order, with `user_id`, `request_id`, `product_id`
    (UInt64), `timestamp` (Int64), `source_type` (String, nullable) and, when the file has it,
    `index` (Int64). Raises `InvalidDataError` with one line naming the column and the fix on a
    missing column, a wrong dtype, a null id or timestamp, a negative id, millisecond timestamps
    or an empty file.
    """
    path = Path(path)
    lazy = scan_parquet_file(path, "requests file")
    schema = lazy.collect_schema()
    missing = [name for name in REQUEST_COLUMNS if name not in schema]
    if missing:
        raise InvalidDataError(
            f"requests file {path} has no column(s) {missing}; a requests file needs "
            f"{list(REQUEST_COLUMNS)} as in the competition's test file, so add them"
        )
    try:
        validate_events(lazy, REQUEST_COLUMNS)
    except InvalidDataError as error:
        raise InvalidDataError(f"requests file {path}: {error}") from error

    has_index = INDEX_COLUMN in schema
    if has_index and not schema[INDEX_COLUMN].is_integer():
        raise InvalidDataError(
            f"requests file {path}: column 'index' has dtype {schema[INDEX_COLUMN]}, expected an "
            "integer type; cast it or drop the column"
        )
    columns = [
        pl.col("user_id").cast(pl.UInt64),
        pl.col("request_id").cast(pl.UInt64),
        pl.col("product_id").cast(pl.UInt64),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("source_type").cast(pl.String),
    ]
    if has_index:
        columns.append(pl.col(INDEX_COLUMN).cast(pl.Int64))
    frame = lazy.select(columns).collect()

    null_requests = frame["request_id"].null_count()
    if null_requests:
        raise InvalidDataError(
            f"requests file {path}: column 'request_id' has {null_requests} null value(s); every "
            "row of a requests file needs a request_id, so drop purchase rows or fill the id"
        )
    if has_index:
        null_index = frame[INDEX_COLUMN].null_count()
        if null_index:
            raise InvalidDataError(
                f"requests file {path}: column 'index' has {null_index} null value(s); fill "
                "them or drop the column"
            )
        duplicated = frame.height - frame[INDEX_COLUMN].n_unique()
        if duplicated:
            logger.warning(
                "requests file %s: %d rows repeat an earlier 'index' value; `cartformer submit` "
                "rejects such a file",
                path,
                duplicated,
            )
    logger.info("read %d request rows from %s", frame.height, path)
    return frame


def read_event_log(
    path: str | Path,
    users: pl.Series,
    history_end: int,
    popularity_end: int,
    products: IdMapping,
    sources: IdMapping,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read the positive events that form histories and the cart counts of the fallback score.

    Args:
        path: Lavka-schema event log.
        users: raw user ids (UInt64) whose histories are needed.
        history_end: latest event time (unix seconds) any history may contain.
        popularity_end: latest event time counted in the product popularity.
        products, sources: the run's mappings; unseen values map to index 0.

    Returns:
        events: positive events of `users` with timestamp <= `history_end`: `user_id` (UInt64),
            `product`, `source` (Int32 indices), `action` (Int8 code), `timestamp` (Int64),
            sorted by (user_id, timestamp, action, product, source) as in the prepared events.
        popularity: `product_id` (UInt64) and `carts` (UInt32), the number of cart events of
            every product with timestamp <= `popularity_end`, over all users.
    """
    lazy = scan_parquet_file(path, "event log")
    try:
        validate_events(lazy, EVENT_LOG_COLUMNS)
    except InvalidDataError as error:
        raise InvalidDataError(f"event log {path}: {error}") from error

    action = (
        pl.col("action_type").cast(pl.String).replace_strict(ACTION_CODES, return_dtype=pl.Int8)
    )
    coded = lazy.select(
        pl.col("user_id").cast(pl.UInt64),
        pl.col("product_id").cast(pl.UInt64),
        pl.col("source_type"),
        pl.col("timestamp").cast(pl.Int64),
        action.alias("action"),
    ).filter(pl.col("action").is_in(POSITIVE_ACTIONS))

    request_users = pl.DataFrame({"user_id": users.cast(pl.UInt64).unique()}).lazy()
    history = (
        coded.filter(pl.col("timestamp") <= history_end)
        .join(request_users, on="user_id", how="semi")
        .select(
            "user_id",
            products.encode_expr("product_id").alias("product"),
            sources.encode_expr("source_type").alias("source"),
            "action",
            "timestamp",
        )
        .sort(["user_id", "timestamp", "action", "product", "source"], maintain_order=True)
    )
    popularity = (
        coded.filter((pl.col("action") == CART) & (pl.col("timestamp") <= popularity_end))
        .group_by("product_id")
        .agg(pl.len().cast(pl.UInt32).alias("carts"))
    )
    events, popularity_table = pl.collect_all([history, popularity])
    events = events.with_columns(pl.col("product", "source").cast(INDEX_DTYPE))
    logger.info(
        "read %d positive history events of %d users from %s",
        events.height,
        events["user_id"].n_unique(),
        path,
    )
    return events, popularity_table
