"""The prepare stage: raw Lavka `train.parquet` to the prepared directory.

The stage validates the input, builds the id mappings from the whole file, applies the
competition's validation split, builds the pretrain and finetune samples and writes the files
listed under "Prepared directory" in docs/architecture.md. `meta.json` is written last, so a
directory that has it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import polars as pl

from cartformer.config import DataConfig
from cartformer.data.encoding import IdMapping
from cartformer.data.reference import (
    build_finetune_samples_reference,
    build_pretrain_samples_reference,
)
from cartformer.data.samples import (
    SampleFrames,
    build_finetune_samples,
    build_pretrain_samples,
    check_data_config,
    draw_request_lags,
    sort_requests,
)
from cartformer.data.schema import REQUIRED_COLUMNS, validate_events
from cartformer.data.split import SplitResult, encode_events, split_events

logger = logging.getLogger(__name__)

META_FORMAT_VERSION = 1
# Rows decoded per batch while encoding: bounds the memory taken by the raw string and u64
# columns, which are several times larger than the encoded ones.
READ_BATCH_ROWS = 1_000_000
SampleBuilder = Literal["vectorized", "reference"]
# Substrings of the count names that record rows, requests or users left out of the samples.
_DROP_MARKERS = (
    "without",
    "excluded",
    "too_small",
    "short_history",
    "no_target",
    "no_state",
    "no_requests_left",
    "truncated",
)


def prepare(
    data_path: str | Path,
    prepared_dir: str | Path,
    cfg: DataConfig,
    *,
    sample_builder: SampleBuilder = "vectorized",
) -> dict[str, Any]:
    """Prepare `data_path` into `prepared_dir` and return the metadata written to `meta.json`.

    `sample_builder="reference"` builds the samples with the slow per-user code of
    `cartformer.data.reference`, which gives the same files. Benchmarks and tests use it.
    Raises `InvalidDataError` if the input breaks the schema and ValueError on invalid sample
    settings in `cfg`, both before any file is written.
    """
    started = time.perf_counter()
    data_path = Path(data_path)
    prepared_dir = Path(prepared_dir)
    if not data_path.is_file():
        raise FileNotFoundError(f"input file {data_path} not found; pass a Lavka train.parquet")
    if sample_builder not in ("vectorized", "reference"):
        raise ValueError(f"sample_builder is {sample_builder!r}; use 'vectorized' or 'reference'")
    check_data_config(cfg)
    logger.info("preparing %s into %s", data_path, prepared_dir)

    scan = pl.scan_parquet(data_path)
    validate_events(scan)
    raw = scan.select(REQUIRED_COLUMNS)
    mappings = _fit_mappings(raw)
    encoded = _read_encoded(raw, mappings)
    logger.info("read and encoded %d rows", encoded.height)

    result = split_events(encoded, mappings[2], cfg)
    t_min = int(encoded["timestamp"].min())
    rows_read = encoded.height
    del encoded

    pretrain, finetune = _build_samples(result, cfg, sample_builder)
    _write_tables(prepared_dir, mappings, result, pretrain, finetune)

    counts = {"rows_read": rows_read, **result.counts, **pretrain.counts, **finetune.counts}
    meta = {
        "format_version": META_FORMAT_VERSION,
        "data_path": str(data_path),
        "config": dataclasses.asdict(cfg),
        "split": {"t_min": t_min, **result.boundaries.to_dict()},
        "vocab_sizes": {mapping.name: mapping.vocab_size for mapping in mappings},
        "counts": {k: v for k, v in counts.items() if not _is_drop_count(k)},
        "dropped": {k: v for k, v in counts.items() if _is_drop_count(k)},
    }
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    (prepared_dir / "meta.json").write_text(text)
    logger.info("prepared %s in %.1f s", prepared_dir, time.perf_counter() - started)
    # Return what the file contains, so that tuples read back as lists in both places.
    return json.loads(text)


def _fit_mappings(raw: pl.LazyFrame) -> tuple[IdMapping, IdMapping, IdMapping]:
    """Fit the user, product and source mappings on the distinct values of the whole file."""
    fitted = []
    for name, column in (("user", "user_id"), ("product", "product_id"), ("source", "source_type")):
        distinct = raw.select(pl.col(column).unique()).collect(engine="streaming")[column]
        fitted.append(IdMapping.fit(name, distinct))
        logger.info("%s mapping: %d values", name, len(fitted[-1]))
    return fitted[0], fitted[1], fitted[2]


def _read_encoded(
    raw: pl.LazyFrame, mappings: tuple[IdMapping, IdMapping, IdMapping]
) -> pl.DataFrame:
    """Read and encode the required columns slice by slice and return them in file order."""
    total = raw.select(pl.len()).collect().item()
    parts = [
        encode_events(raw.slice(offset, READ_BATCH_ROWS), *mappings).collect()
        for offset in range(0, total, READ_BATCH_ROWS)
    ]
    if not parts:
        return encode_events(raw, *mappings).collect()
    return pl.concat(parts, rechunk=False)


def _build_samples(
    result: SplitResult, cfg: DataConfig, sample_builder: SampleBuilder
) -> tuple[SampleFrames, SampleFrames]:
    events, requests, boundaries = result.events, result.requests, result.boundaries
    if sample_builder == "vectorized":
        pretrain = build_pretrain_samples(events, boundaries, cfg)
        finetune = build_finetune_samples(events, requests, boundaries, cfg, cfg.seed)
        return pretrain, finetune
    pretrain = build_pretrain_samples_reference(events, boundaries, cfg)
    lags = draw_request_lags(sort_requests(requests, "train").height, cfg, cfg.seed)
    finetune = build_finetune_samples_reference(events, requests, boundaries, cfg, lags)
    return pretrain, finetune


def _write_tables(
    prepared_dir: Path,
    mappings: tuple[IdMapping, IdMapping, IdMapping],
    result: SplitResult,
    pretrain: SampleFrames,
    finetune: SampleFrames,
) -> None:
    prepared_dir.mkdir(parents=True, exist_ok=True)
    stale_meta = prepared_dir / "meta.json"
    stale_meta.unlink(missing_ok=True)
    for mapping in mappings:
        mapping.save(prepared_dir / "mappings")
    tables = {
        "events": result.events,
        "requests": result.requests,
        "pretrain_train": pretrain.train,
        "pretrain_valid": pretrain.valid,
        "finetune_train": finetune.train,
        "finetune_valid": finetune.valid,
    }
    for name, table in tables.items():
        table.write_parquet(prepared_dir / f"{name}.parquet")
        logger.info("wrote %s.parquet: %d rows", name, table.height)
        if table.height == 0:
            logger.warning("%s.parquet has no rows; see the dropped counts in meta.json", name)


def _is_drop_count(key: str) -> bool:
    return any(marker in key for marker in _DROP_MARKERS)
