"""The prepare stage: raw Lavka `train.parquet` to the prepared directory.

The stage validates the input, builds the id mappings from the whole file, applies the
competition's validation split, builds the pretrain and finetune samples and writes the files
listed under "Prepared directory" in docs/architecture.md. On request it also prepares the
side features of `cartformer.data.side_features` from the optional columns that the input has.
`meta.json` is written last, so a directory that has it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Collection
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
    FINETUNE_SCHEMA,
    PRETRAIN_SCHEMA,
    SampleFrames,
    build_finetune_samples,
    build_pretrain_samples,
    check_data_config,
    draw_request_lags,
    sort_requests,
)
from cartformer.data.schema import REQUIRED_COLUMNS, validate_events
from cartformer.data.side_features import (
    CONTEXT_SOURCE_COLUMNS,
    FEATURES_DIR,
    SideFeatureInfo,
    context_exprs,
    fit_context_mappings,
    log_missing_columns,
    positive_events_with_context,
    prepare_text_features,
    present_context_columns,
    requests_with_context,
    sidecar_path,
    split_sample_columns,
    write_timings,
)
from cartformer.data.split import SplitResult, encode_events, split_events

logger = logging.getLogger(__name__)

EVENT_COLUMNS = ("user", "product", "source", "action", "timestamp")
REQUEST_COLUMNS = ("user", "request_id", "timestamp", "source", "product", "target", "split")
META_FORMAT_VERSION = 1
SIDE_FEATURE_GROUPS = ("categorical", "text")
"""Side-feature groups that the prepare stage builds on request. Time features need nothing
beyond the timestamps that every sample file has."""
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
    side_features: Collection[str] = (),
) -> dict[str, Any]:
    """Prepare `data_path` into `prepared_dir` and return the metadata written to `meta.json`.

    `sample_builder="reference"` builds the samples with the slow per-user code of
    `cartformer.data.reference`, which gives the same files. Benchmarks and tests use it.
    `side_features` names the groups of `SIDE_FEATURE_GROUPS` to build as well, each from the
    input columns it needs; meta.json's "features" records what was built. They cost time (on
    the full-size demo, 19 s of CPU instead of 11 s), so they are built only on request.
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
    unknown = sorted(set(side_features) - set(SIDE_FEATURE_GROUPS))
    if unknown:
        raise ValueError(f"unknown side features {unknown}; choose from {SIDE_FEATURE_GROUPS}")
    check_data_config(cfg)
    logger.info("preparing %s into %s", data_path, prepared_dir)

    scan = pl.scan_parquet(data_path)
    schema = scan.collect_schema()
    log_missing_columns(schema, side_features)
    context = present_context_columns(schema) if "categorical" in side_features else ()
    validate_events(scan, (*REQUIRED_COLUMNS, *[CONTEXT_SOURCE_COLUMNS[name] for name in context]))
    raw = scan.select(*REQUIRED_COLUMNS, *[CONTEXT_SOURCE_COLUMNS[name] for name in context])
    mappings = _fit_mappings(raw)
    context_mappings = fit_context_mappings(raw, context)
    encoded = _read_encoded(raw, mappings, context_exprs(context_mappings))
    logger.info("read and encoded %d rows", encoded.height)

    result = split_events(encoded, mappings[2], cfg)
    t_min = int(encoded["timestamp"].min())
    rows_read = encoded.height
    info = SideFeatureInfo()
    if context and sample_builder == "vectorized":
        started = time.perf_counter()
        result.events = positive_events_with_context(encoded, context, result.events.height)
        result.requests = requests_with_context(result.requests, encoded, context)
        info.seconds["context"] = time.perf_counter() - started
    del encoded

    pretrain, finetune = _build_samples(result, cfg, sample_builder)
    _write_tables(prepared_dir, (*mappings, *context_mappings.values()), result, pretrain, finetune)
    info.categorical = _sidecar_context(pretrain, context)
    info.vocab_sizes.update({name: m.vocab_size for name, m in context_mappings.items()})
    if "text" in side_features:
        prepare_text_features(
            data_path, prepared_dir, mappings[1], result.boundaries.train_end, cfg, info
        )
    info.prepared = tuple(group for group in SIDE_FEATURE_GROUPS if group in side_features)
    if info.prepared:
        write_timings(prepared_dir, info)

    counts = {"rows_read": rows_read, **result.counts, **pretrain.counts, **finetune.counts}
    meta = {
        "format_version": META_FORMAT_VERSION,
        "data_path": str(data_path),
        "config": dataclasses.asdict(cfg),
        "split": {"t_min": t_min, **result.boundaries.to_dict()},
        "vocab_sizes": {mapping.name: mapping.vocab_size for mapping in mappings},
        "counts": {k: v for k, v in counts.items() if not _is_drop_count(k)},
        "dropped": {k: v for k, v in counts.items() if _is_drop_count(k)},
        "features": info.to_meta(),
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
    raw: pl.LazyFrame,
    mappings: tuple[IdMapping, IdMapping, IdMapping],
    extra: list[pl.Expr] | None = None,
) -> pl.DataFrame:
    """Read and encode the required columns slice by slice and return them in file order.

    `extra` expressions (the city and store indices) become more columns after those of
    `encode_events`.
    """
    total = raw.select(pl.len()).collect().item()

    def encode(part: pl.LazyFrame) -> pl.LazyFrame:
        encoded = encode_events(part, *mappings)
        if not extra:
            return encoded
        return pl.concat([encoded, part.select(extra)], how="horizontal")

    parts = [
        encode(raw.slice(offset, READ_BATCH_ROWS)).collect()
        for offset in range(0, total, READ_BATCH_ROWS)
    ]
    if not parts:
        return encode(raw).collect()
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
    mappings: tuple[IdMapping, ...],
    result: SplitResult,
    pretrain: SampleFrames,
    finetune: SampleFrames,
) -> None:
    """Write the mappings and the six tables.

    Sample columns beyond the contract schemas go to the sidecar files
    `features/<name>.parquet`. The context columns of the events and requests are not written.
    """
    prepared_dir.mkdir(parents=True, exist_ok=True)
    stale_meta = prepared_dir / "meta.json"
    stale_meta.unlink(missing_ok=True)
    stale_features = prepared_dir / FEATURES_DIR
    if stale_features.is_dir():
        shutil.rmtree(stale_features)
    for mapping in mappings:
        mapping.save(prepared_dir / "mappings")
    tables = {
        "events": (result.events, EVENT_COLUMNS),
        "requests": (result.requests, REQUEST_COLUMNS),
        "pretrain_train": (pretrain.train, tuple(PRETRAIN_SCHEMA)),
        "pretrain_valid": (pretrain.valid, tuple(PRETRAIN_SCHEMA)),
        "finetune_train": (finetune.train, tuple(FINETUNE_SCHEMA)),
        "finetune_valid": (finetune.valid, tuple(FINETUNE_SCHEMA)),
    }
    for name, (frame, columns) in tables.items():
        table, sidecar = split_sample_columns(frame, columns)
        path = prepared_dir / f"{name}.parquet"
        table.write_parquet(path)
        logger.info("wrote %s.parquet: %d rows", name, table.height)
        if table.height == 0:
            logger.warning("%s.parquet has no rows; see the dropped counts in meta.json", name)
        if sidecar is not None and name not in ("events", "requests"):
            sidecar_path(path).parent.mkdir(parents=True, exist_ok=True)
            sidecar.write_parquet(sidecar_path(path))


def _sidecar_context(pretrain: SampleFrames, context: tuple[str, ...]) -> tuple[str, ...]:
    """Return the context fields that the samples carry; the reference builders carry none."""
    carried = tuple(name for name in context if name in pretrain.train.columns)
    if context and not carried:
        logger.info("the reference sample builders carry no city or store; none is prepared")
    return carried


def _is_drop_count(key: str) -> bool:
    return any(marker in key for marker in _DROP_MARKERS)
