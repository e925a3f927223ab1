"""Side features of the prepare stage: city and store indices, product token bags, tokenizer.

The optional Lavka columns become model inputs here:

- `city_name` and `store_id` get id mappings (`mappings/city.parquet`, `mappings/store.parquet`,
  index 0 for a null or unseen value). Every positive event carries its own city and store, and
  every request the most common city and store of its rows, ties going to the smallest index.
  The samples carry them as list columns, which `split_sample_columns` moves into the sidecar
  files `features/<sample file>`, one row per row of the sample file.
- `product_name` and `product_category` are tokenized once per product into
  `features/product_text.parquet`, one row per product index. The default tokenizer is a
  WordPiece trained on the texts of the products seen up to the end of the training period,
  and `DataConfig.tokenizer` names a Hugging Face tokenizer instead. Either is saved in
  `features/tokenizer/`.

A file without some of these columns is prepared without the features that need them, and one
log line names the missing columns.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from cartformer.config import DataConfig
from cartformer.data.encoding import INDEX_DTYPE, UNKNOWN_INDEX, IdMapping
from cartformer.data.schema import POSITIVE_ACTIONS
from cartformer.data.split import EVENT_SORT_KEYS
from cartformer.data.text import (
    TEXT_COLUMNS,
    ProductTokenizer,
    TokenBags,
    load_pretrained,
    tokenize_texts,
    train_wordpiece,
)

logger = logging.getLogger(__name__)

FEATURES_DIR = "features"
PRODUCT_TEXT_FILE = "product_text.parquet"
TOKENIZER_DIR = "tokenizer"
TIMINGS_FILE = "timings.json"
CONTEXT_SOURCE_COLUMNS: dict[str, str] = {"city": "city_name", "store": "store_id"}
"""Context feature name -> input column. The name is also the mapping and sample column name."""
READ_BATCH_ROWS = 1_000_000  # rows per slice while reading the product texts


@dataclass
class SideFeatureInfo:
    """Side features built by the prepare stage. `to_meta` is the part stored in meta.json."""

    prepared: tuple[str, ...] = ()
    """Side-feature groups the stage was asked for, whether or not the input had the columns."""
    categorical: tuple[str, ...] = ()
    """Context fields with indices in the samples: a subset of ("city", "store")."""
    text: tuple[str, ...] = ()
    """Text fields with token bags in product_text.parquet: a subset of ("name", "category")."""
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    """"city", "store" (index 0 included) and "text_token" (the tokenizer's vocab_size)."""
    tokenizer: str = ""
    """"wordpiece" for a tokenizer trained here, otherwise the Hugging Face name or path."""
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per step; written to features/timings.json, not to meta.json."""

    def to_meta(self) -> dict[str, Any]:
        return {
            "prepared": list(self.prepared),
            "categorical": list(self.categorical),
            "text": list(self.text),
            "vocab_sizes": dict(self.vocab_sizes),
            "tokenizer": self.tokenizer,
            "counts": dict(self.counts),
        }


def present_context_columns(schema: pl.Schema) -> tuple[str, ...]:
    """Return the context feature names ("city", "store") whose input column `schema` has."""
    return tuple(name for name, column in CONTEXT_SOURCE_COLUMNS.items() if column in schema)


def present_text_fields(schema: pl.Schema) -> tuple[str, ...]:
    """Return the text field names ("name", "category") whose input column `schema` has."""
    return tuple(name for name, column in TEXT_COLUMNS.items() if column in schema)


def log_missing_columns(schema: pl.Schema, groups: Collection[str]) -> None:
    """Log one line naming the columns of the requested side-feature `groups` ("categorical",
    "text") that the input lacks, if any."""
    required = []
    if "categorical" in groups:
        required += CONTEXT_SOURCE_COLUMNS.values()
    if "text" in groups:
        required += TEXT_COLUMNS.values()
    missing = [column for column in required if column not in schema]
    if missing:
        logger.warning(
            "the input has no column(s) %s; the side features that need them are not prepared, "
            "and models use the remaining features (id-only when none is left)",
            missing,
        )


def fit_context_mappings(raw: pl.LazyFrame, names: Sequence[str]) -> dict[str, IdMapping]:
    """Fit the city and store mappings on the distinct non-null values of the whole file."""
    mappings: dict[str, IdMapping] = {}
    for name in names:
        column = CONTEXT_SOURCE_COLUMNS[name]
        distinct = raw.select(pl.col(column).unique()).collect(engine="streaming")[column]
        mappings[name] = IdMapping.fit(name, distinct)
        logger.info("%s mapping: %d values", name, len(mappings[name]))
    return mappings


def context_exprs(mappings: dict[str, IdMapping]) -> list[pl.Expr]:
    """Return the i32 index expressions of the context columns, named "city" and "store"."""
    return [
        mapping.encode_expr(CONTEXT_SOURCE_COLUMNS[name]).alias(name)
        for name, mapping in mappings.items()
    ]


def positive_events_with_context(
    encoded: pl.DataFrame, context: Sequence[str], expected_rows: int
) -> pl.DataFrame:
    """Return the positive events with their context columns, in `build_events`' order.

    `encoded` is the encoded frame of `encode_events` plus the context columns. The filter and
    the stable sort by `EVENT_SORT_KEYS` are those of `cartformer.data.split.build_events`, so
    row i is the same event as row i of the prepared events table. `expected_rows` is that
    table's height, and a different row count raises RuntimeError.
    """
    events = (
        encoded.lazy()
        .filter(pl.col("action").is_in(POSITIVE_ACTIONS))
        .select("user", "product", "source", "action", "timestamp", *context)
        .sort(EVENT_SORT_KEYS, maintain_order=True)
        .collect()
    )
    if events.height != expected_rows:
        raise RuntimeError(
            f"{events.height} positive events with context but {expected_rows} prepared events"
        )
    return events


def requests_with_context(
    requests: pl.DataFrame, encoded: pl.DataFrame, context: Sequence[str]
) -> pl.DataFrame:
    """Add the request's context columns to the requests table of `build_requests`.

    A request's city (store) is the most common one among all rows with its (user, request_id),
    ties going to the smallest index. Requests whose rows disagree are counted in the log.
    Rows are first grouped by `request_id` alone, which is about twice as fast as by the pair,
    and only request ids with several users or several values are counted value by value.
    """
    if not context:
        return requests
    keys = ["user", "request_id"]
    rows = encoded.lazy().filter(pl.col("request_id").is_not_null()).select(*keys, *context)
    ranges = (
        rows.group_by("request_id")
        .agg(
            pl.col("user").min().alias("user"),
            (pl.col("user").min() != pl.col("user").max()).alias("shared"),
            *[pl.col(name).min().alias(name) for name in context],
            *[
                (pl.col(name).min() != pl.col(name).max()).alias(f"{name}_mixed")
                for name in context
            ],
        )
        .collect(engine="streaming")
    )
    result = requests
    for name in context:
        irregular = pl.col("shared") | pl.col(f"{name}_mixed")
        modes = ranges.filter(~irregular).select(*keys, name)
        mixed = ranges.filter(pl.col(f"{name}_mixed")).height
        if mixed:
            logger.info(
                "%d request ids have rows with different %s values; each request takes the most "
                "common one",
                mixed,
                name,
            )
        irregular_ids = ranges.filter(irregular).select("request_id")
        if irregular_ids.height:
            counted = (
                rows.join(irregular_ids.lazy(), on="request_id", how="semi")
                .group_by(*keys, name)
                .agg(pl.len().alias("count"))
                .sort([*keys, "count", name], descending=[False, False, True, False])
                .unique(keys, keep="first", maintain_order=True)
                .select(*keys, name)
                .collect()
            )
            modes = pl.concat([modes, counted.cast(modes.schema)])
        result = result.join(modes, on=keys, how="left", maintain_order="left")
        result = result.with_columns(pl.col(name).fill_null(UNKNOWN_INDEX).cast(INDEX_DTYPE))
    return result


def split_sample_columns(
    frame: pl.DataFrame, base_columns: Sequence[str]
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Split a sample frame into its base columns and a sidecar of `user` plus the rest.

    Returns the sidecar as None when `frame` has no column besides `base_columns`.
    """
    extra = [name for name in frame.columns if name not in base_columns]
    base = frame.select(base_columns)
    if not extra:
        return base, None
    return base, frame.select("user", *extra)


def sidecar_path(sample_path: str | Path) -> Path:
    """Return the sidecar file of a sample file: `features/<name>` beside it."""
    sample_path = Path(sample_path)
    return sample_path.parent / FEATURES_DIR / sample_path.name


# --- product texts -------------------------------------------------------------------------------


def read_product_texts(
    scan: pl.LazyFrame, products: IdMapping, fields: Sequence[str]
) -> pl.DataFrame:
    """Read one text per product and text field, and the product's first event time.

    Returns one row per product index 0..len(products) in index order: `product` (i32),
    `first_seen` (i64 unix seconds, null for index 0) and one String column per field of
    `fields` ("name", "category"). A product takes its first row's text in file order; products
    whose first and last rows disagree are counted in the log. The file is read in slices of
    `READ_BATCH_ROWS` rows so that its string columns are never in memory at once.
    """
    columns = {field_name: TEXT_COLUMNS[field_name] for field_name in fields}
    total = scan.select(pl.len()).collect().item()
    parts = []
    for offset in range(0, total, READ_BATCH_ROWS):
        part = scan.slice(offset, READ_BATCH_ROWS).select(
            "product_id", "timestamp", *[pl.col(c).cast(pl.String) for c in columns.values()]
        )
        parts.append(_first_last_texts(part, columns).collect())
    per_slice = pl.concat(parts)
    merged = per_slice.group_by("product_id", maintain_order=True).agg(
        pl.col("timestamp").min(),
        *[pl.col(f"{c}_first").drop_nulls().first().alias(f"{c}_first") for c in columns.values()],
        *[pl.col(f"{c}_last").drop_nulls().last().alias(f"{c}_last") for c in columns.values()],
    )
    differing = merged.select(
        pl.any_horizontal(
            [pl.col(f"{c}_first") != pl.col(f"{c}_last") for c in columns.values()]
        ).sum()
    ).item()
    if differing:
        logger.info(
            "%d products have different texts in their first and last rows; each uses its "
            "first row's text",
            differing,
        )
    table = merged.select(
        products.encode_expr("product_id").alias("product"),
        pl.col("timestamp").alias("first_seen"),
        *[pl.col(f"{c}_first").alias(field_name) for field_name, c in columns.items()],
    )
    index = pl.DataFrame({"product": pl.int_range(0, products.vocab_size, eager=True)})
    index = index.cast({"product": INDEX_DTYPE})
    return index.join(table, on="product", how="left", maintain_order="left")


def _first_last_texts(part: pl.LazyFrame, columns: dict[str, str]) -> pl.LazyFrame:
    return part.group_by("product_id", maintain_order=True).agg(
        pl.col("timestamp").min(),
        *[pl.col(c).drop_nulls().first().alias(f"{c}_first") for c in columns.values()],
        *[pl.col(c).drop_nulls().last().alias(f"{c}_last") for c in columns.values()],
    )


def build_tokenizer(
    texts: pl.DataFrame, train_end: int, cfg: DataConfig
) -> ProductTokenizer | None:
    """Load `cfg.tokenizer`, or train WordPiece on the texts of products seen by `train_end`.

    `texts` is the table of `read_product_texts`. Returns None, with a logged line, when no
    product seen by `train_end` has a text to train on.
    """
    if cfg.tokenizer:
        logger.info("loading tokenizer %s", cfg.tokenizer)
        return load_pretrained(cfg.tokenizer)
    fields = [name for name in TEXT_COLUMNS if name in texts.columns]
    seen = texts.filter(pl.col("first_seen") <= train_end)
    values = pl.concat([seen[name].drop_nulls() for name in fields]).unique().sort()
    if values.len() == 0:
        logger.warning(
            "no product seen by the end of the training period has a text, so no tokenizer is "
            "trained and the text features are not prepared; pass --tokenizer to use one"
        )
        return None
    logger.info(
        "training a WordPiece tokenizer on %d distinct texts of %d products seen by the end of "
        "training",
        values.len(),
        seen.height,
    )
    return train_wordpiece(values.to_list(), vocab_size=cfg.text_vocab_size)


def tokenize_product_table(
    tokenizer: ProductTokenizer, texts: pl.DataFrame
) -> dict[str, TokenBags]:
    """Return one TokenBags per text field with a bag for every product index.

    Index 0, the reserved unknown product, gets empty bags without a log line.
    """
    bags = {}
    for field_name in (name for name in TEXT_COLUMNS if name in texts.columns):
        known = tokenize_texts(tokenizer, texts[field_name][1:], name=TEXT_COLUMNS[field_name])
        offsets = np.concatenate([[0], known.offsets]).astype(np.int64)
        bags[field_name] = TokenBags(token_ids=known.token_ids, offsets=offsets)
    return bags


def write_product_text(directory: Path, bags: dict[str, TokenBags]) -> Path:
    """Write `product_text.parquet`: `product` (i32) and one list i32 column per text field."""
    num_products = {len(field_bags) for field_bags in bags.values()}
    if len(num_products) != 1:
        raise ValueError(f"text fields have different product counts: {sorted(num_products)}")
    columns = {"product": pa.array(np.arange(num_products.pop(), dtype=np.int32))}
    for field_name, field_bags in bags.items():
        values = pa.array(field_bags.token_ids.astype(np.int32))
        offsets = pa.array(field_bags.offsets.astype(np.int32))
        columns[field_name] = pa.ListArray.from_arrays(offsets, values)
    path = directory / PRODUCT_TEXT_FILE
    pq.write_table(pa.table(columns), path)
    return path


def load_product_text(prepared_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read `features/product_text.parquet` as field -> ((T,) int64 token ids, (P + 1,) offsets).

    Raises FileNotFoundError when the prepared directory has no product texts.
    """
    path = Path(prepared_dir) / FEATURES_DIR / PRODUCT_TEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; text features need `cartformer prepare` on a file with "
            "product_name and product_category"
        )
    table = pq.read_table(path)
    bags = {}
    for name in table.column_names:
        if name == "product":
            continue
        column = table.column(name).combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)
        values = column.values.to_numpy().astype(np.int64)
        bags[name] = (values[offsets[0] : offsets[-1]], offsets - offsets[0])
    return bags


def prepare_text_features(
    data_path: Path,
    prepared_dir: Path,
    products: IdMapping,
    train_end: int,
    cfg: DataConfig,
    info: SideFeatureInfo,
) -> None:
    """Tokenize the product texts of `data_path` into `prepared_dir/features` and fill `info`."""
    scan = pl.scan_parquet(data_path)
    fields = present_text_fields(scan.collect_schema())
    if not fields:
        return
    started = time.perf_counter()
    texts = read_product_texts(scan, products, fields)
    info.seconds["text_read"] = time.perf_counter() - started

    started = time.perf_counter()
    tokenizer = build_tokenizer(texts, train_end, cfg)
    info.seconds["tokenizer"] = time.perf_counter() - started
    if tokenizer is None:
        return

    started = time.perf_counter()
    bags = tokenize_product_table(tokenizer, texts)
    info.seconds["tokenize"] = time.perf_counter() - started

    directory = prepared_dir / FEATURES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / TOKENIZER_DIR)
    write_product_text(directory, bags)
    info.text = tuple(bags)
    info.tokenizer = tokenizer.source
    info.vocab_sizes["text_token"] = tokenizer.vocab_size
    info.counts["text_products_seen_in_training"] = int(
        texts.filter(pl.col("first_seen") <= train_end).height
    )
    info.counts["text_tokens_per_product"] = {
        name: round(float(field_bags.lengths[1:].mean()), 2) if len(field_bags) > 1 else 0.0
        for name, field_bags in bags.items()
    }
    logger.info(
        "product texts: %d products, fields %s, %d token ids (%s), %.1f s",
        len(texts) - 1,
        list(bags),
        tokenizer.vocab_size,
        tokenizer.source,
        sum(info.seconds[key] for key in ("text_read", "tokenizer", "tokenize")),
    )


def write_timings(prepared_dir: Path, info: SideFeatureInfo) -> None:
    """Write the side-feature step times to `features/timings.json` (seconds, wall time)."""
    directory = prepared_dir / FEATURES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    rounded = {key: round(value, 3) for key, value in info.seconds.items()}
    (directory / TIMINGS_FILE).write_text(json.dumps(rounded, indent=2) + "\n")
