"""Input columns of the Lavka `train.parquet`, action codes and input validation.

`validate_events` checks a raw event frame before any work is done on it, so that a bad file fails
with one line that names the column, shows a few bad values and states the fix.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

logger = logging.getLogger(__name__)

VIEW = 0
CART = 1
CLICK = 2
PURCHASE = 3

ACTION_CODES: dict[str, int] = {
    "AT_View": VIEW,
    "AT_CartUpdate": CART,
    "AT_Click": CLICK,
    "AT_Purchase": PURCHASE,
}
POSITIVE_ACTIONS: tuple[int, ...] = (CART, CLICK, PURCHASE)

_INT64_MAX = 2**63 - 1
_MAX_EXAMPLES = 3


class ColumnKind(enum.Enum):
    """Category of an input column, which decides its accepted dtypes and value checks."""

    ID = "id"  # any integer dtype that casts losslessly to UInt64: no negative values
    INTEGER = "integer"  # any integer dtype that casts losslessly to Int64
    STRING = "string"  # String, Categorical or Enum


@dataclass(frozen=True)
class ColumnSpec:
    """Expected type and nullability of one input column."""

    name: str
    kind: ColumnKind
    required: bool
    nullable: bool
    description: str


COLUMN_SPECS: dict[str, ColumnSpec] = {
    spec.name: spec
    for spec in (
        ColumnSpec(
            "action_type", ColumnKind.STRING, True, False, "event type, one of ACTION_CODES"
        ),
        ColumnSpec("product_id", ColumnKind.ID, True, False, "product id"),
        ColumnSpec("source_type", ColumnKind.STRING, True, True, "surface, null on purchases"),
        ColumnSpec("timestamp", ColumnKind.INTEGER, True, False, "event time, unix seconds"),
        ColumnSpec("user_id", ColumnKind.ID, True, False, "user id"),
        ColumnSpec("request_id", ColumnKind.ID, True, True, "request id, null on purchases"),
        ColumnSpec("city_name", ColumnKind.STRING, False, True, "city of the store"),
        ColumnSpec("position_in_request", ColumnKind.INTEGER, False, True, "slot in the request"),
        ColumnSpec("product_category", ColumnKind.STRING, False, True, "product category name"),
        ColumnSpec("product_image", ColumnKind.STRING, False, True, "product image URL"),
        ColumnSpec("product_name", ColumnKind.STRING, False, True, "product name"),
        ColumnSpec("store_id", ColumnKind.ID, False, True, "store id"),
    )
}
REQUIRED_COLUMNS: tuple[str, ...] = tuple(s.name for s in COLUMN_SPECS.values() if s.required)


class InvalidDataError(ValueError):
    """The input events break the schema. The message names the column and the fix."""


def validate_events(
    frame: pl.DataFrame | pl.LazyFrame, columns: Sequence[str] = REQUIRED_COLUMNS
) -> None:
    """Raise `InvalidDataError` unless `frame` has valid `columns` of the Lavka schema.

    The checks run in this order. Every listed column must be present with a dtype of its
    `ColumnKind`, and the frame must have rows. Id columns must have no negative values, UInt64
    integer columns must fit Int64 and non-nullable columns must have no nulls. `action_type`
    must contain only the four known values.
    Null `request_id` on view, click or cart rows is allowed. Those rows form no request group,
    and their count is logged. Extra columns are ignored. A LazyFrame is scanned once for the
    value checks, and once more only when a check fails, to collect example rows.
    """
    lazy = frame.lazy()
    schema = lazy.collect_schema()
    unknown = [name for name in columns if name not in COLUMN_SPECS]
    if unknown:
        raise ValueError(f"no schema for columns {unknown}; known columns are {list(COLUMN_SPECS)}")
    missing = [name for name in columns if name not in schema]
    if missing:
        raise InvalidDataError(
            f"missing required column(s) {missing}; the input has {list(schema)}, "
            f"add the missing column(s) in the Lavka train.parquet schema"
        )
    for name in columns:
        _check_dtype(COLUMN_SPECS[name], schema[name])

    checks = _value_check_exprs([COLUMN_SPECS[name] for name in columns], schema)
    summaries = [pl.len().alias("__rows")]
    if "request_id" in columns and "action_type" in columns:
        non_purchase = pl.col("action_type").cast(pl.String) != "AT_Purchase"
        requestless = non_purchase & pl.col("request_id").is_null()
        summaries.append(requestless.sum().alias("__requestless"))
    if "timestamp" in columns:
        too_large = pl.col("timestamp") > MAX_UNIX_SECONDS
        summaries.append(too_large.sum().alias("__timestamp_too_large"))
    counts = lazy.select(*summaries, *checks.values()).collect().row(0, named=True)
    if counts["__rows"] == 0:
        raise InvalidDataError("the input has no rows; pass a file with at least one event")
    for key in checks:
        if counts[key]:
            _raise_value_error(lazy, key, counts[key])
    if counts.get("__timestamp_too_large"):
        raise InvalidDataError(
            f"column 'timestamp' has {counts['__timestamp_too_large']} rows after the year 2200 "
            f"(larger than {MAX_UNIX_SECONDS}); timestamps must be unix seconds, so divide "
            "milliseconds by 1000"
        )
    if counts.get("__requestless"):
        logger.info(
            "%d view, click or cart rows have a null request_id; they count as positive events "
            "but form no request group",
            counts["__requestless"],
        )


MAX_UNIX_SECONDS = 7_258_118_400
"""2200-01-01 in unix seconds; later timestamps are most likely milliseconds."""


def _check_dtype(spec: ColumnSpec, dtype: pl.DataType) -> None:
    if spec.nullable and dtype == pl.Null:
        return
    if spec.kind is ColumnKind.STRING:
        valid = dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum))
        expected = "String, Categorical or Enum"
    else:
        valid = dtype.is_integer()
        expected = "an integer type (Int8..Int64, UInt8..UInt64)"
    if not valid:
        raise InvalidDataError(
            f"column '{spec.name}' has dtype {dtype}, expected {expected}; "
            f"cast it in the input file (the column holds the {spec.description})"
        )


def _value_check_exprs(specs: list[ColumnSpec], schema: pl.Schema) -> dict[str, pl.Expr]:
    """Build one counting expression per value check, keyed by '<check>:<column>'."""
    checks: dict[str, pl.Expr] = {}
    for spec in specs:
        column = pl.col(spec.name)
        dtype = schema[spec.name]
        if spec.kind is ColumnKind.ID and dtype.is_signed_integer():
            checks[f"negative:{spec.name}"] = (column < 0).sum()
        if spec.kind is ColumnKind.INTEGER and dtype == pl.UInt64:
            checks[f"too_large:{spec.name}"] = (column > _INT64_MAX).sum()
        if not spec.nullable:
            checks[f"null:{spec.name}"] = column.null_count()
        if spec.name == "action_type":
            known = column.cast(pl.String).is_in(list(ACTION_CODES))
            checks["unknown:action_type"] = (column.is_not_null() & ~known).sum()
    return {key: expr.alias(key) for key, expr in checks.items()}


def _raise_value_error(lazy: pl.LazyFrame, key: str, count: int) -> None:
    check, name = key.split(":", 1)
    column = pl.col(name)
    if check == "null":
        rows = _example_rows(lazy, column.is_null())
        raise InvalidDataError(
            f"column '{name}' has {count} null value(s) (e.g. at rows {rows}); "
            f"every event needs the column {name}, so drop or fill these rows"
        )
    if check == "negative":
        values = _example_values(lazy, name, column < 0)
        raise InvalidDataError(
            f"column '{name}' has {count} negative id(s) (e.g. {values}); ids must be "
            f"non-negative integers that fit UInt64, so fix or drop these rows"
        )
    if check == "too_large":
        values = _example_values(lazy, name, column > _INT64_MAX)
        raise InvalidDataError(
            f"column '{name}' has {count} value(s) above the Int64 maximum (e.g. {values}); "
            f"fix or drop these rows"
        )
    text = column.cast(pl.String)
    values = _example_values(lazy, name, column.is_not_null() & ~text.is_in(list(ACTION_CODES)))
    raise InvalidDataError(
        f"column 'action_type' has {count} row(s) with unknown action types (e.g. {values}); "
        f"expected one of {list(ACTION_CODES)}, so map or drop these rows"
    )


def _example_rows(lazy: pl.LazyFrame, condition: pl.Expr) -> list[int]:
    rows = lazy.with_row_index("__row").filter(condition).select("__row").head(_MAX_EXAMPLES)
    return rows.collect()["__row"].to_list()


def _example_values(lazy: pl.LazyFrame, name: str, condition: pl.Expr) -> list[object]:
    column = pl.col(name)
    if COLUMN_SPECS[name].kind is ColumnKind.STRING:
        column = column.cast(pl.String)
    values = lazy.filter(condition).select(column.unique(maintain_order=True))
    return values.head(_MAX_EXAMPLES).collect()[name].to_list()
