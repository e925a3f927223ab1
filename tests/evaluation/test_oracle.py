import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cartformer.evaluation.oracle import oracle_scores

# Raw ids above 2**63 check that the join keeps the full unsigned 64-bit range.
RAW_OFFSET = 2**63 + 5
RAW_PRODUCT = {index: RAW_OFFSET + 1000 * index for index in range(1, 9)}
REQUEST_2001 = 2**64 - 3

VALID_ROWS = [
    {
        "user": 2,
        "request_id": [REQUEST_2001],
        "request_size": [2],
        "candidate_product": [3, 4],
        "candidate_target": [0, 1],
    },
    {
        "user": 1,
        "request_id": [1001, 1002],
        "request_size": [3, 2],
        "candidate_product": [2, 4, 7, 1, 3],
        "candidate_target": [0, 0, 1, 1, 0],
    },
]
# (raw request id, product index) of every validation candidate, in flattened order.
CANDIDATES = [
    (REQUEST_2001, 3),
    (REQUEST_2001, 4),
    (1001, 2),
    (1001, 4),
    (1001, 7),
    (1002, 1),
    (1002, 3),
]
EXPECTED = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def write_prepared(directory: Path) -> Path:
    """Write the prepared files that the oracle reads, following docs/architecture.md."""
    (directory / "mappings").mkdir(parents=True)
    pl.DataFrame(
        VALID_ROWS,
        schema={
            "user": pl.Int32,
            "request_id": pl.List(pl.UInt64),
            "request_size": pl.List(pl.Int32),
            "candidate_product": pl.List(pl.Int32),
            "candidate_target": pl.List(pl.Int8),
        },
    ).write_parquet(directory / "finetune_valid.parquet")
    pl.DataFrame(
        {
            "raw_id": pl.Series(list(RAW_PRODUCT.values()), dtype=pl.UInt64),
            "index": pl.Series(list(RAW_PRODUCT), dtype=pl.Int32),
        }
    ).write_parquet(directory / "mappings" / "product.parquet")
    return directory


def write_oracle(path: Path, rows: list[tuple[int, int, float]]) -> Path:
    request_id, product_id, probability = (list(column) for column in zip(*rows, strict=True))
    pl.DataFrame(
        {
            "request_id": pl.Series(request_id, dtype=pl.UInt64),
            "product_id": pl.Series(product_id, dtype=pl.UInt64),
            "cart_probability": pl.Series(probability, dtype=pl.Float64),
        }
    ).write_parquet(path)
    return path


def full_oracle_rows() -> list[tuple[int, int, float]]:
    """Rows for every candidate, shuffled, plus pairs that are not validation candidates."""
    rows = [
        (request, RAW_PRODUCT[product], probability)
        for (request, product), probability in zip(CANDIDATES, EXPECTED, strict=True)
    ]
    rows += [(1001, RAW_PRODUCT[8], 0.9), (999, RAW_PRODUCT[3], 0.8)]
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[i] for i in order]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared")


def test_oracle_scores_in_candidate_order(prepared: Path, tmp_path: Path) -> None:
    oracle = write_oracle(tmp_path / "oracle.parquet", full_oracle_rows())

    scores = oracle_scores(prepared, oracle)

    assert scores is not None
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, EXPECTED)


@pytest.mark.parametrize("path", [None, ""])
def test_oracle_none_without_path(prepared: Path, path: str | None) -> None:
    assert oracle_scores(prepared, path) is None


def test_oracle_none_for_absent_file(prepared: Path, tmp_path: Path) -> None:
    assert oracle_scores(prepared, tmp_path / "absent.parquet") is None


def test_oracle_fills_few_missing(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [row for row in full_oracle_rows() if row[:2] != (1001, RAW_PRODUCT[7])]
    oracle = write_oracle(tmp_path / "oracle.parquet", rows)

    with caplog.at_level(logging.WARNING, logger="cartformer.evaluation.oracle"):
        scores = oracle_scores(prepared, oracle, max_missing_fraction=0.2)

    assert scores is not None
    assert scores[4] == 0.0
    np.testing.assert_array_equal(np.delete(scores, 4), np.delete(EXPECTED, 4))
    assert "1 of 7 validation candidates" in caplog.text


def test_oracle_rejects_many_missing(prepared: Path, tmp_path: Path) -> None:
    rows = [row for row in full_oracle_rows() if row[:2] != (1001, RAW_PRODUCT[7])]
    oracle = write_oracle(tmp_path / "oracle.parquet", rows)

    with pytest.raises(ValueError, match="1 of 7 validation candidates"):
        oracle_scores(prepared, oracle)


def test_oracle_product_absent_from_mapping(prepared: Path, tmp_path: Path) -> None:
    mapping_path = prepared / "mappings" / "product.parquet"
    pl.read_parquet(mapping_path).filter(pl.col("index") != 3).write_parquet(mapping_path)
    oracle = write_oracle(tmp_path / "oracle.parquet", full_oracle_rows())

    scores = oracle_scores(prepared, oracle, max_missing_fraction=0.5)

    assert scores is not None
    assert scores[0] == 0.0
    assert scores[6] == 0.0
    assert scores[1] == 0.2


def test_oracle_rejects_duplicate_pairs(prepared: Path, tmp_path: Path) -> None:
    rows = [*full_oracle_rows(), (1001, RAW_PRODUCT[7], 0.5)]
    oracle = write_oracle(tmp_path / "oracle.parquet", rows)

    with pytest.raises(ValueError, match="1 duplicate"):
        oracle_scores(prepared, oracle)


def test_oracle_rejects_missing_column(prepared: Path, tmp_path: Path) -> None:
    path = write_oracle(tmp_path / "oracle.parquet", full_oracle_rows())
    pl.read_parquet(path).drop("cart_probability").write_parquet(path)

    with pytest.raises(ValueError, match="cart_probability"):
        oracle_scores(prepared, path)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_oracle_rejects_invalid_probability(prepared: Path, tmp_path: Path, bad: float) -> None:
    rows = [*full_oracle_rows(), (5, 6, bad)]
    oracle = write_oracle(tmp_path / "oracle.parquet", rows)

    with pytest.raises(ValueError, match="outside"):
        oracle_scores(prepared, oracle)
