from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from cartformer.config import DataConfig
from cartformer.data.encoding import NO_SURFACE, IdMapping
from cartformer.data.prepare import prepare
from cartformer.data.reference import (
    encode_events_reference,
    fit_mappings_reference,
    prepare_reference,
    read_events_reference,
    split_events_reference,
)
from cartformer.data.split import split_events

TABLES = (
    "events",
    "requests",
    "pretrain_train",
    "pretrain_valid",
    "finetune_train",
    "finetune_valid",
    "mappings/user",
    "mappings/product",
    "mappings/source",
)
SURFACES = ("A", "B", "C")
# Indices of SURFACES in a mapping fitted on them and NO_SURFACE, which sorts first.
SURFACE_INDEX = {NO_SURFACE: 1, "A": 2, "B": 3, "C": 4}


def encoded_frame(rows: list[tuple[int, int, int, int, int, int | None]]) -> pl.DataFrame:
    """Build encoded events from (user, product, source, action, timestamp, request_id) rows."""
    columns = ("user", "product", "source", "action", "timestamp", "request_id")
    dtypes = (pl.Int32, pl.Int32, pl.Int32, pl.Int8, pl.Int64, pl.UInt64)
    return pl.DataFrame(rows, schema=dict(zip(columns, dtypes, strict=True)), orient="row")


def source_mapping() -> IdMapping:
    return IdMapping.fit("source", pl.Series([NO_SURFACE, *SURFACES]))


def assert_same_split(encoded: pl.DataFrame, cfg: DataConfig) -> None:
    fast = split_events(encoded, source_mapping(), cfg)
    plain = split_events_reference(encoded, SURFACE_INDEX, cfg)
    assert plain.boundaries == fast.boundaries
    assert_frame_equal(plain.events, fast.events)
    assert_frame_equal(plain.requests, fast.requests)
    assert plain.counts == fast.counts


def run_both(tmp_path: Path, frame: pl.DataFrame, cfg: DataConfig) -> tuple[Path, Path]:
    data = tmp_path / "train.parquet"
    frame.write_parquet(data)
    prepare(data, tmp_path / "vectorized", cfg)
    prepare_reference(data, tmp_path / "reference", cfg)
    return tmp_path / "vectorized", tmp_path / "reference"


@pytest.mark.parametrize(
    ("seed", "cfg"),
    [
        (0, DataConfig()),
        (1, DataConfig(min_request_size=6, excluded_surfaces=(), max_history=16)),
        (2, DataConfig(min_history=2, max_requests=3, excluded_surfaces=("ST_Main", "ST_No"))),
    ],
)
def test_prepare_matches_vectorized(
    tmp_path: Path, make_frame: Callable[..., pl.DataFrame], seed: int, cfg: DataConfig
) -> None:
    fast, plain = run_both(tmp_path, make_frame(seed=seed), cfg)
    for name in TABLES:
        expected = pl.read_parquet(fast / f"{name}.parquet")
        actual = pl.read_parquet(plain / f"{name}.parquet")
        assert actual.schema == expected.schema, name
        assert actual.equals(expected), name

    meta = json.loads((fast / "meta.json").read_text())
    reference = json.loads((plain / "reference_meta.json").read_text())
    assert reference["counts"] == {**meta["counts"], **meta["dropped"]}
    assert reference["split"] == meta["split"]
    assert reference["vocab_sizes"] == meta["vocab_sizes"]


def test_prepare_writes_no_meta_json(tmp_path: Path, lavka_frame: pl.DataFrame) -> None:
    _, plain = run_both(tmp_path, lavka_frame, DataConfig())
    assert not (plain / "meta.json").exists()
    assert (plain / "reference_meta.json").is_file()


def test_mappings_sorted_from_one() -> None:
    frame = pl.DataFrame(
        {
            "user_id": pl.Series([30, 10, 20, 10], dtype=pl.UInt64),
            "product_id": pl.Series([7, 5, 7, 9], dtype=pl.UInt64),
            "source_type": ["B", None, "A", "B"],
        }
    )
    mappings = fit_mappings_reference(frame)
    assert mappings["user"] == {10: 1, 20: 2, 30: 3}
    assert mappings["product"] == {5: 1, 7: 2, 9: 3}
    assert mappings["source"] == {NO_SURFACE: 1, "A": 2, "B": 3}


def test_encode_columns_and_dtypes() -> None:
    frame = pl.DataFrame(
        {
            "action_type": ["AT_Purchase", "AT_View"],
            "product_id": pl.Series([9, 5], dtype=pl.Int64),
            "source_type": [None, "ST_Main"],
            "timestamp": pl.Series([100, 50], dtype=pl.Int32),
            "user_id": pl.Series([4, 4], dtype=pl.UInt32),
            "request_id": pl.Series([None, 77], dtype=pl.UInt64),
        }
    )
    encoded = encode_events_reference(frame, fit_mappings_reference(frame))
    expected = pl.DataFrame(
        {
            "user": pl.Series([1, 1], dtype=pl.Int32),
            "product": pl.Series([2, 1], dtype=pl.Int32),
            "source": pl.Series([1, 2], dtype=pl.Int32),
            "action": pl.Series([3, 0], dtype=pl.Int8),
            "timestamp": pl.Series([100, 50], dtype=pl.Int64),
            "request_id": pl.Series([None, 77], dtype=pl.UInt64),
        }
    )
    assert_frame_equal(encoded, expected)


def test_request_source_tie_takes_smallest() -> None:
    # Product 1 has one row on A and one on B, so its surface is A (the smaller index). The
    # request then has one group on A and one on B (product 2), and takes A again. A tie broken
    # towards the larger index would give B twice.
    a, b = SURFACE_INDEX["A"], SURFACE_INDEX["B"]
    encoded = encoded_frame(
        [
            (1, 1, b, 0, 100, 5),
            (1, 1, a, 1, 101, 5),
            (1, 2, b, 0, 102, 5),
            (1, 3, b, 1, 90 * 86400, None),
        ]
    )
    cfg = DataConfig(min_request_size=2, excluded_surfaces=())

    result = split_events_reference(encoded, SURFACE_INDEX, cfg)

    assert result.requests["source"].to_list() == [a]
    assert result.requests["product"].to_list() == [[1, 2]]
    assert result.requests["target"].to_list() == [[1, 0]]
    assert_same_split(encoded, cfg)


def test_shared_request_id_per_user() -> None:
    a = SURFACE_INDEX["A"]
    encoded = encoded_frame(
        [
            (1, 1, a, 0, 100, 5),
            (1, 2, a, 1, 100, 5),
            (2, 1, a, 1, 200, 5),
            (2, 3, a, 0, 200, 5),
            (2, 4, a, 0, 200, 5),
        ]
    )
    cfg = DataConfig(min_request_size=2, excluded_surfaces=())

    result = split_events_reference(encoded, SURFACE_INDEX, cfg)

    assert result.requests["user"].to_list() == [1, 2]
    assert result.requests["request_id"].to_list() == [5, 5]
    assert result.counts["request_ids_shared_by_users"] == 1
    assert_same_split(encoded, cfg)


def test_request_drop_counts() -> None:
    a, c = SURFACE_INDEX["A"], SURFACE_INDEX["C"]
    rows = [
        (1, 1, a, 0, 100, 1),  # request 1: too small (one product)
        (1, 1, a, 0, 100, 2),  # request 2: views only
        (1, 2, a, 0, 100, 2),
        (1, 1, a, 1, 100, 3),  # request 3: carts only
        (1, 2, a, 1, 100, 3),
        (1, 1, c, 0, 100, 4),  # request 4: excluded surface
        (1, 2, a, 0, 100, None),  # view without request
    ]
    cfg = DataConfig(min_request_size=2, excluded_surfaces=("C",))

    counts = split_events_reference(encoded_frame(rows), SURFACE_INDEX, cfg).counts

    assert counts["requests_too_small"] == 1
    assert counts["requests_without_cart"] == 1
    assert counts["requests_without_view"] == 1
    assert counts["rows_view_cart_excluded_surface"] == 1
    assert counts["rows_view_cart_without_request"] == 1
    assert counts["request_candidates"] == 3
    assert_same_split(encoded_frame(rows), cfg)


def test_read_missing_column(tmp_path: Path, lavka_frame: pl.DataFrame) -> None:
    path = tmp_path / "train.parquet"
    lavka_frame.drop("request_id").write_parquet(path)
    with pytest.raises(ValueError, match="request_id"):
        read_events_reference(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_events_reference(tmp_path / "absent.parquet")
