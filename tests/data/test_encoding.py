from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cartformer.data.encoding import NO_SURFACE, UNKNOWN_INDEX, IdMapping


def user_mapping() -> IdMapping:
    return IdMapping.fit("user", pl.Series([50, 7, 7, 3, 2**64 - 1], dtype=pl.UInt64))


def test_indices_follow_sorted_ids() -> None:
    mapping = user_mapping()
    assert mapping.table["raw_id"].to_list() == [3, 7, 50, 2**64 - 1]
    assert mapping.table["index"].to_list() == [1, 2, 3, 4]


def test_vocab_size_includes_unknown() -> None:
    mapping = user_mapping()
    assert len(mapping) == 4
    assert mapping.vocab_size == 5


def test_table_dtypes() -> None:
    mapping = user_mapping()
    assert mapping.table.schema == pl.Schema({"raw_id": pl.UInt64, "index": pl.Int32})


def test_encode_known_ids() -> None:
    encoded = user_mapping().encode(pl.Series([7, 3, 2**64 - 1, 50], dtype=pl.UInt64))
    assert encoded.dtype == pl.Int32
    assert encoded.to_list() == [2, 1, 4, 3]


def test_encode_signed_input() -> None:
    encoded = user_mapping().encode(pl.Series([7, 50], dtype=pl.Int64))
    assert encoded.to_list() == [2, 3]


def test_encode_unseen_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cartformer.data.encoding"):
        encoded = user_mapping().encode(pl.Series([7, 8, 9], dtype=pl.UInt64))
    assert encoded.to_list() == [2, UNKNOWN_INDEX, UNKNOWN_INDEX]
    assert "2 of 3 user values are null or unseen" in caplog.text


def test_encode_rejects_string_ids() -> None:
    with pytest.raises(ValueError, match="dtype String, expected an integer type"):
        user_mapping().encode(pl.Series(["7"]))


def test_fit_drops_null_ids() -> None:
    mapping = IdMapping.fit("product", pl.Series([None, 4, 2]))
    assert mapping.keys.to_list() == [2, 4]


def test_encode_expr_lazy() -> None:
    frame = pl.LazyFrame({"user_id": [50, 3]})
    encoded = frame.select(user_mapping().encode_expr("user_id")).collect()
    assert encoded["user_id"].to_list() == [3, 1]


def test_decode_roundtrip() -> None:
    mapping = user_mapping()
    raw = pl.Series([2**64 - 1, 3, 50], dtype=pl.UInt64)
    assert mapping.decode(mapping.encode(raw)).to_list() == raw.to_list()


def test_decode_unknown_is_null() -> None:
    decoded = user_mapping().decode(np.array([0, 2]))
    assert decoded.to_list() == [None, 7]


def test_decode_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        user_mapping().decode(np.array([1, 5]))


def test_null_surface_value() -> None:
    mapping = IdMapping.fit("source", pl.Series(["ST_Search", None, "ST_Catalog"]))
    assert mapping.table["value"].to_list() == sorted(["ST_Search", NO_SURFACE, "ST_Catalog"])
    encoded = mapping.encode(pl.Series([None, "ST_Search"], dtype=pl.String))
    assert mapping.decode(encoded).to_list() == [NO_SURFACE, "ST_Search"]


def test_surface_categorical_input() -> None:
    mapping = IdMapping.fit("source", pl.Series(["b", "a"], dtype=pl.Categorical))
    encoded = mapping.encode(pl.Series(["a", "b"], dtype=pl.Categorical))
    assert encoded.to_list() == [1, 2]


def test_save_load_roundtrip(tmp_path: Path) -> None:
    mapping = user_mapping()
    path = mapping.save(tmp_path / "mappings")
    loaded = IdMapping.load(tmp_path / "mappings", "user")
    assert path == tmp_path / "mappings" / "user.parquet"
    assert loaded.table.equals(mapping.table)
    assert pl.read_parquet(path).schema == pl.Schema({"raw_id": pl.UInt64, "index": pl.Int32})


def test_source_file_columns(tmp_path: Path) -> None:
    IdMapping.fit("source", pl.Series(["x"])).save(tmp_path)
    assert pl.read_parquet(tmp_path / "source.parquet").columns == ["value", "index"]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        IdMapping.load(tmp_path, "product")


def test_load_renumbered_file(tmp_path: Path) -> None:
    pl.DataFrame(
        {"raw_id": pl.Series([1, 2], dtype=pl.UInt64), "index": pl.Series([2, 1], dtype=pl.Int32)}
    ).write_parquet(tmp_path / "user.parquet")
    with pytest.raises(ValueError, match="does not number its sorted keys"):
        IdMapping.load(tmp_path, "user")


def test_unknown_mapping_name() -> None:
    with pytest.raises(ValueError, match="unknown mapping name 'shelf'"):
        IdMapping.fit("shelf", pl.Series([1]))


def test_unsorted_keys_rejected() -> None:
    with pytest.raises(ValueError, match="sorted, unique and non-null"):
        IdMapping("user", pl.Series([3, 1]))
