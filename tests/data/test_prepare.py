from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from cartformer.config import DataConfig
from cartformer.data.encoding import IdMapping
from cartformer.data.prepare import prepare
from cartformer.data.samples import FINETUNE_SCHEMA, PRETRAIN_SCHEMA
from cartformer.data.schema import InvalidDataError
from cartformer.data.split import EVENT_SORT_KEYS

TABLES = (
    "events",
    "requests",
    "pretrain_train",
    "pretrain_valid",
    "finetune_train",
    "finetune_valid",
)


@pytest.fixture
def prepared(tmp_path: Path, lavka_file: Path) -> tuple[Path, dict]:
    out = tmp_path / "prepared"
    return out, prepare(lavka_file, out, DataConfig())


def test_writes_all_files(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    for name in TABLES:
        assert (out / f"{name}.parquet").is_file(), name
    for name in ("user", "product", "source"):
        assert (out / "mappings" / f"{name}.parquet").is_file(), name
    assert (out / "meta.json").is_file()


def test_meta_file_matches_return(prepared: tuple[Path, dict]) -> None:
    out, meta = prepared
    assert json.loads((out / "meta.json").read_text()) == meta


def test_meta_counts(prepared: tuple[Path, dict], lavka_frame: pl.DataFrame) -> None:
    out, meta = prepared
    requests = pl.read_parquet(out / "requests.parquet")
    counts = meta["counts"]
    assert counts["rows_read"] == lavka_frame.height
    assert counts["positive_events"] == pl.read_parquet(out / "events.parquet").height
    assert counts["requests_train"] == int((requests["split"] == "train").sum())
    assert counts["requests_valid"] == int((requests["split"] == "valid").sum())
    assert counts["pretrain_train_users"] == pl.read_parquet(out / "pretrain_train.parquet").height
    assert counts["finetune_valid_users"] == pl.read_parquet(out / "finetune_valid.parquet").height


def test_meta_dropped_counts(prepared: tuple[Path, dict]) -> None:
    _, meta = prepared
    dropped = meta["dropped"]
    assert dropped["requests_too_small"] > 0
    assert dropped["rows_view_cart_excluded_surface"] > 0
    assert "finetune_train_requests_no_state" in dropped
    assert "pretrain_valid_users_no_target" in dropped
    assert not set(dropped) & set(meta["counts"])


def test_meta_split_and_vocab(prepared: tuple[Path, dict], lavka_frame: pl.DataFrame) -> None:
    _, meta = prepared
    split = meta["split"]
    assert split["valid_end"] == lavka_frame["timestamp"].max()
    assert split["valid_start"] == split["valid_end"] - 30 * 86400
    assert split["train_end"] == split["valid_start"] - 2 * 86400
    assert split["train_end_iso"].startswith("20")
    assert meta["vocab_sizes"]["user"] == lavka_frame["user_id"].n_unique() + 1
    assert meta["vocab_sizes"]["product"] == lavka_frame["product_id"].n_unique() + 1
    assert meta["vocab_sizes"]["source"] == lavka_frame["source_type"].n_unique() + 1


def test_mappings_load(prepared: tuple[Path, dict]) -> None:
    out, meta = prepared
    users = IdMapping.load(out / "mappings", "user")
    assert users.vocab_size == meta["vocab_sizes"]["user"]


def test_sample_tables(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    assert dict(pl.read_parquet(out / "pretrain_train.parquet").schema) == PRETRAIN_SCHEMA
    finetune = pl.read_parquet(out / "finetune_train.parquet")
    assert dict(finetune.schema) == FINETUNE_SCHEMA
    assert finetune.height > 0


def test_events_sorted(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    events = pl.read_parquet(out / "events.parquet")
    assert events.columns == ["user", "product", "source", "action", "timestamp"]
    assert events.equals(events.sort(EVENT_SORT_KEYS))


def test_reference_builder_same_output(tmp_path: Path, lavka_file: Path) -> None:
    fast = prepare(lavka_file, tmp_path / "fast", DataConfig())
    plain = prepare(lavka_file, tmp_path / "plain", DataConfig(), sample_builder="reference")
    assert fast["counts"] == plain["counts"]
    assert fast["dropped"] == plain["dropped"]
    for name in TABLES:
        left = pl.read_parquet(tmp_path / "fast" / f"{name}.parquet")
        right = pl.read_parquet(tmp_path / "plain" / f"{name}.parquet")
        assert left.equals(right), name


def test_deterministic(tmp_path: Path, lavka_file: Path) -> None:
    prepare(lavka_file, tmp_path / "a", DataConfig())
    prepare(lavka_file, tmp_path / "b", DataConfig())
    for name in TABLES:
        left = pl.read_parquet(tmp_path / "a" / f"{name}.parquet")
        right = pl.read_parquet(tmp_path / "b" / f"{name}.parquet")
        assert left.equals(right), name


def test_invalid_input_writes_nothing(tmp_path: Path, lavka_frame: pl.DataFrame) -> None:
    path = tmp_path / "bad.parquet"
    lavka_frame.with_columns(pl.col("user_id").cast(pl.String)).write_parquet(path)
    with pytest.raises(InvalidDataError, match="user_id"):
        prepare(path, tmp_path / "out", DataConfig())
    assert not (tmp_path / "out").exists()


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare(tmp_path / "none.parquet", tmp_path / "out", DataConfig())


def test_unknown_sample_builder(lavka_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sample_builder"):
        prepare(lavka_file, tmp_path / "out", DataConfig(), sample_builder="fast")  # type: ignore[arg-type]
