from __future__ import annotations

import logging

import polars as pl
import pytest

from cartformer.data.schema import (
    ACTION_CODES,
    REQUIRED_COLUMNS,
    InvalidDataError,
    validate_events,
)


def test_action_codes() -> None:
    assert ACTION_CODES == {"AT_View": 0, "AT_CartUpdate": 1, "AT_Click": 2, "AT_Purchase": 3}


def test_required_columns() -> None:
    assert set(REQUIRED_COLUMNS) == {
        "action_type",
        "product_id",
        "source_type",
        "timestamp",
        "user_id",
        "request_id",
    }


def test_valid_frame_passes(lavka_frame: pl.DataFrame) -> None:
    validate_events(lavka_frame)
    validate_events(lavka_frame.lazy())


def test_only_required_columns_pass(lavka_frame: pl.DataFrame) -> None:
    validate_events(lavka_frame.select(REQUIRED_COLUMNS))


def test_extra_columns_ignored(lavka_frame: pl.DataFrame) -> None:
    validate_events(lavka_frame.with_columns(pl.lit([1]).alias("extra")))


def test_missing_column(lavka_frame: pl.DataFrame) -> None:
    with pytest.raises(InvalidDataError, match="missing required column.*'timestamp'"):
        validate_events(lavka_frame.drop("timestamp"))


def test_string_id_rejected(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(pl.col("user_id").cast(pl.String))
    with pytest.raises(InvalidDataError, match="column 'user_id' has dtype String"):
        validate_events(frame)


def test_float_timestamp_rejected(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(pl.col("timestamp").cast(pl.Float64))
    with pytest.raises(InvalidDataError, match="'timestamp'"):
        validate_events(frame)


def test_signed_ids_accepted(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(
        pl.col("user_id").cast(pl.Int64),
        pl.col("product_id").cast(pl.Int32),
        pl.col("request_id").cast(pl.Int64),
        pl.col("timestamp").cast(pl.UInt32),
    )
    validate_events(frame)


def test_negative_id_rejected(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(pl.col("product_id").cast(pl.Int64))
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) < 2)
        .then(pl.lit(-4, dtype=pl.Int64))
        .otherwise(pl.col("product_id"))
        .alias("product_id")
    )
    with pytest.raises(
        InvalidDataError, match=r"'product_id' has 2 negative id\(s\) \(e\.g\. \[-4\]\)"
    ):
        validate_events(frame)


def test_huge_timestamp_rejected(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(pl.col("timestamp").cast(pl.UInt64))
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.lit(2**64 - 1, dtype=pl.UInt64))
        .otherwise(pl.col("timestamp"))
        .alias("timestamp")
    )
    with pytest.raises(InvalidDataError, match="'timestamp' has 1 value"):
        validate_events(frame)


def test_categorical_strings_accepted(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(
        pl.col("action_type").cast(pl.Enum(list(ACTION_CODES))),
        pl.col("source_type").cast(pl.Categorical),
    )
    validate_events(frame)


def test_unknown_action_rejected(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(
        pl.when(pl.int_range(pl.len()) < 3)
        .then(pl.lit("AT_Like"))
        .otherwise(pl.col("action_type"))
        .alias("action_type")
    )
    with pytest.raises(InvalidDataError) as error:
        validate_events(frame)
    message = str(error.value)
    assert "'action_type' has 3 row(s)" in message
    assert "AT_Like" in message
    assert "\n" not in message


@pytest.mark.parametrize("column", ["user_id", "product_id", "timestamp", "action_type"])
def test_null_rejected(lavka_frame: pl.DataFrame, column: str) -> None:
    frame = lavka_frame.with_columns(
        pl.when(pl.int_range(pl.len()).is_in([4, 9]))
        .then(None)
        .otherwise(pl.col(column))
        .alias(column)
    )
    with pytest.raises(InvalidDataError) as error:
        validate_events(frame)
    message = str(error.value)
    assert f"column '{column}' has 2 null value(s)" in message
    assert "rows [4, 9]" in message


def test_empty_frame_rejected(lavka_frame: pl.DataFrame) -> None:
    with pytest.raises(InvalidDataError, match="no rows"):
        validate_events(lavka_frame.head(0))


def test_null_request_on_view_logged(
    lavka_frame: pl.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    views = pl.col("action_type") == "AT_View"
    first_views = views & (views.cum_sum() <= 5)
    frame = lavka_frame.with_columns(
        pl.when(first_views).then(None).otherwise(pl.col("request_id")).alias("request_id")
    )
    with caplog.at_level(logging.INFO, logger="cartformer.data.schema"):
        validate_events(frame)
    assert "5 view, click or cart rows have a null request_id" in caplog.text


def test_all_null_request_column_accepted(lavka_frame: pl.DataFrame) -> None:
    frame = lavka_frame.with_columns(pl.lit(None).alias("request_id"))
    validate_events(frame)


def test_unknown_column_name() -> None:
    with pytest.raises(ValueError, match="no schema for columns"):
        validate_events(pl.DataFrame({"a": [1]}), columns=["a"])


def test_millisecond_timestamps_rejected():
    frame = pl.DataFrame(
        {
            "action_type": ["AT_View"],
            "product_id": pl.Series([1], dtype=pl.UInt64),
            "source_type": ["ST_Search"],
            "timestamp": [1_700_000_000_000],
            "user_id": pl.Series([1], dtype=pl.UInt64),
            "request_id": pl.Series([1], dtype=pl.UInt64),
        }
    )
    with pytest.raises(InvalidDataError, match="divide milliseconds by 1000"):
        validate_events(frame)
