"""Tests of the side features of the prepare stage: city, store, product texts, tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cartformer.config import DataConfig
from cartformer.data.demo import write_demo
from cartformer.data.encoding import UNKNOWN_INDEX, IdMapping
from cartformer.data.prepare import prepare
from cartformer.data.side_features import (
    load_product_text,
    read_product_texts,
    requests_with_context,
    sidecar_path,
)
from cartformer.data.text import load_wordpiece, tokenize_texts

TABLES = ("events", "requests", "pretrain_train", "pretrain_valid", "finetune_train")
SAMPLES = ("pretrain_train", "pretrain_valid", "finetune_train", "finetune_valid")
BOTH = ("categorical", "text")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("side") / "train.parquet"
    write_demo(path, size="tiny", seed=1)
    return path


@pytest.fixture(scope="module")
def prepared(demo: Path) -> tuple[Path, dict]:
    out = demo.parent / "with_features"
    return out, prepare(demo, out, DataConfig(), side_features=BOTH)


def test_base_tables_unchanged(demo: Path, prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    plain = demo.parent / "plain"
    prepare(demo, plain, DataConfig())
    for name in (*TABLES, "finetune_valid"):
        expected = pl.read_parquet(plain / f"{name}.parquet")
        actual = pl.read_parquet(out / f"{name}.parquet")
        assert actual.equals(expected), name


def test_plain_prepare_builds_none(demo: Path) -> None:
    plain = demo.parent / "plain_meta"
    meta = prepare(demo, plain, DataConfig())
    assert meta["features"]["prepared"] == []
    assert meta["features"]["categorical"] == []
    assert not (plain / "features").exists()


def test_meta_features(prepared: tuple[Path, dict]) -> None:
    _, meta = prepared
    features = meta["features"]
    assert features["prepared"] == ["categorical", "text"]
    assert features["categorical"] == ["city", "store"]
    assert features["text"] == ["name", "category"]
    assert features["vocab_sizes"]["city"] == 4
    assert features["vocab_sizes"]["store"] == 7
    assert features["tokenizer"] == "wordpiece"


def test_sidecars_parallel(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    for name in SAMPLES:
        samples = pl.read_parquet(out / f"{name}.parquet")
        sidecar = pl.read_parquet(sidecar_path(out / f"{name}.parquet"))
        assert sidecar["user"].equals(samples["user"]), name
        for column in ("city", "store"):
            lengths = sidecar[column].list.len()
            assert lengths.equals(samples["product"].list.len()), (name, column)
        if name.startswith("finetune"):
            for column in ("request_city", "request_store"):
                lengths = sidecar[column].list.len()
                assert lengths.equals(samples["request_id"].list.len()), (name, column)


def _decoded_events(out: Path, name: str) -> pl.DataFrame:
    """Sample histories of `name` decoded to raw (user_id, timestamp, product_id, store_id)."""
    mappings = out / "mappings"
    samples = pl.read_parquet(out / f"{name}.parquet")
    sidecar = pl.read_parquet(sidecar_path(out / f"{name}.parquet"))
    rows = samples.select("user", "timestamp", "product").explode("timestamp", "product")
    stores = sidecar.select("store").explode("store")
    return pl.DataFrame(
        {
            "user_id": IdMapping.load(mappings, "user").decode(rows["user"]),
            "timestamp": rows["timestamp"],
            "product_id": IdMapping.load(mappings, "product").decode(rows["product"]),
            "store_id": IdMapping.load(mappings, "store").decode(stores["store"]),
        }
    )


def test_event_store_matches_input(demo: Path, prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    raw = pl.read_parquet(demo).filter(pl.col("action_type") != "AT_View")
    events = _decoded_events(out, "pretrain_valid")
    matched = events.join(
        raw.select("user_id", "timestamp", "product_id", "store_id"),
        on=["user_id", "timestamp", "product_id", "store_id"],
        how="semi",
    )
    assert matched.height == events.height


def test_request_store_matches_input(demo: Path, prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    samples = pl.read_parquet(out / "finetune_valid.parquet")
    sidecar = pl.read_parquet(sidecar_path(out / "finetune_valid.parquet"))
    requests = pl.DataFrame(
        {
            "request_id": samples["request_id"].explode(),
            "store": sidecar["request_store"].explode(),
        }
    )
    stores = IdMapping.load(out / "mappings", "store")
    requests = requests.with_columns(stores.decode(requests["store"]).alias("store_id"))
    raw = pl.read_parquet(demo).filter(pl.col("request_id").is_not_null())
    expected = raw.group_by("request_id").agg(pl.col("store_id").mode().min())
    joined = requests.join(expected, on="request_id", how="left", suffix="_raw")
    assert joined["store_id"].equals(joined["store_id_raw"], check_names=False)


def test_request_mode_ties_and_shared_ids() -> None:
    encoded = pl.DataFrame(
        {
            "user": [1, 1, 1, 2, 2, 3, 3, 3],
            "request_id": [10, 10, 10, 10, 11, 12, 12, None],
            "store": [4, 5, 5, 7, 3, 9, 8, 1],
        },
        schema={"user": pl.Int32, "request_id": pl.UInt64, "store": pl.Int32},
    )
    requests = pl.DataFrame(
        {"user": [1, 2, 2, 3, 4], "request_id": [10, 10, 11, 12, 13]},
        schema={"user": pl.Int32, "request_id": pl.UInt64},
    )
    result = requests_with_context(requests, encoded, ["store"])
    # (1, 10): 5 twice beats 4; (2, 10) shares the id with user 1 but has its own 7; a tie
    # (3, 12) goes to the smaller 8; (4, 13) has no rows and gets the unknown index.
    assert result["store"].to_list() == [5, 7, 3, 8, UNKNOWN_INDEX]


def test_product_text_bags(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    bags = load_product_text(out)
    products = IdMapping.load(out / "mappings", "product")
    tokenizer = load_wordpiece(out / "features" / "tokenizer")
    raw = pl.read_parquet(out.parent / "train.parquet")
    names = raw.group_by("product_id").agg(pl.col("product_name").first())
    names = names.with_columns(products.encode(names["product_id"]).alias("product"))
    names = names.sort("product")
    token_ids, offsets = bags["name"]
    assert offsets.shape == (len(products) + 2,)
    assert offsets[1] == 0  # index 0, the unknown product, has an empty bag
    expected = tokenize_texts(tokenizer, names["product_name"])
    assert np.array_equal(token_ids, expected.token_ids)
    assert np.array_equal(offsets[1:], expected.offsets)


def test_tokenizer_trained_on_training_texts(tmp_path: Path, demo: Path) -> None:
    frame = pl.read_parquet(demo)
    late = (
        frame.sort("timestamp")
        .tail(1)
        .with_columns(
            pl.lit(2**63, dtype=pl.UInt64).alias("product_id"),
            pl.lit("Зефирчики").alias("product_name"),
            pl.lit("AT_Purchase").alias("action_type"),
        )
    )
    path = tmp_path / "late.parquet"
    pl.concat([frame, late]).write_parquet(path)
    meta = prepare(path, tmp_path / "out", DataConfig(), side_features=("text",))
    tokenizer = load_wordpiece(tmp_path / "out" / "features" / "tokenizer")
    assert "Зефирчики" not in tokenizer.backend.get_vocab()
    assert tokenizer.unk_token_id not in tokenizer.encode(["Зефирчики"])[0]
    first_seen = frame.group_by("product_id").agg(pl.col("timestamp").min())["timestamp"]
    seen = int((first_seen <= meta["split"]["train_end"]).sum())
    assert meta["features"]["counts"]["text_products_seen_in_training"] == seen


def test_missing_columns_one_line(
    tmp_path: Path, demo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ids_only.parquet"
    pl.read_parquet(demo).drop("city_name", "store_id", "product_name").write_parquet(path)
    caplog.set_level(logging.WARNING)
    meta = prepare(path, tmp_path / "out", DataConfig(), side_features=BOTH)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "city_name" in warnings[0]
    assert "product_name" in warnings[0]
    assert meta["features"]["categorical"] == []
    assert meta["features"]["text"] == ["category"]
    assert not sidecar_path(tmp_path / "out" / "pretrain_train.parquet").exists()


def test_first_row_text_and_count(caplog: pytest.LogCaptureFixture) -> None:
    scan = pl.DataFrame(
        {
            "product_id": [7, 3, 7, 3],
            "timestamp": [5, 1, 2, 9],
            "product_name": ["new", "b", "old", "b"],
            "product_category": ["x", "y", "x", "y"],
        },
        schema_overrides={"product_id": pl.UInt64},
    ).lazy()
    products = IdMapping.fit("product", pl.Series([3, 7], dtype=pl.UInt64))
    caplog.set_level(logging.INFO)
    texts = read_product_texts(scan, products, ("name", "category"))
    assert texts["product"].to_list() == [0, 1, 2]
    assert texts["name"].to_list() == [None, "b", "new"]
    assert texts["first_seen"].to_list() == [None, 1, 2]
    assert "1 products have different texts" in caplog.text


def test_pretrained_tokenizer_directory(tmp_path: Path, demo: Path, prepared: tuple) -> None:
    pytest.importorskip("transformers")
    out, _ = prepared
    cfg = DataConfig(tokenizer=str(out / "features" / "tokenizer"))
    meta = prepare(demo, tmp_path / "hf", cfg, side_features=("text",))
    assert meta["features"]["tokenizer"] == cfg.tokenizer
    assert (
        meta["features"]["vocab_sizes"]["text_token"]
        == prepared[1]["features"]["vocab_sizes"]["text_token"]
    )
    assert (tmp_path / "hf" / "features" / "tokenizer" / "tokenizer.json").is_file()
