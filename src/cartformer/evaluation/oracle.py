"""The demo generator's true cart probabilities as scores of the validation candidates.

On demo data the generator writes, for every (request, product) pair it shows, the probability
with which it drew a cart. If carts are drawn independently, ranking by that probability maximizes
the expected DCG. Its NDCG@10 is therefore a practical ceiling of the validation metric, but not a
strict bound, because NDCG divides by the ideal DCG of the drawn targets. Real data has no oracle
file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from cartformer.evaluation.baselines import load_validation_candidates

logger = logging.getLogger(__name__)

PRODUCT_MAPPING_FILE = Path("mappings") / "product.parquet"
ORACLE_SCHEMA = {"request_id": pl.UInt64, "product_id": pl.UInt64, "cart_probability": pl.Float64}
DEFAULT_MAX_MISSING_FRACTION = 1e-3


def oracle_scores(
    prepared_dir: str | Path,
    oracle_path: str | Path | None,
    max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
) -> np.ndarray | None:
    """Look up the generator's cart probability of every finetune validation candidate.

    Candidates are matched to oracle rows on the raw request id and the raw product id. Product
    indices and raw ids correspond through `prepared/mappings/product.parquet`. A candidate with
    no oracle row, or with a product index that the mapping does not contain, is missing.

    Args:
        prepared_dir: the run's `prepared` directory.
        oracle_path: parquet file with columns `request_id` (u64), `product_id` (u64) and
            `cart_probability` (f64), one row per pair. None or "" means there is no oracle.
        max_missing_fraction: the largest fraction of candidates that may be missing. Missing
            candidates get probability 0 and their count is logged.

    Returns:
        (C,) float64 cart probabilities in the flattened order of `finetune_valid.parquet`
        (see `cartformer.evaluation.baselines`), or None when there is no oracle file.

    Raises:
        ValueError: if the oracle file is invalid, or more than `max_missing_fraction` of the
            candidates are missing.
    """
    if oracle_path is None or str(oracle_path) == "":
        return None
    path = Path(oracle_path)
    if not path.is_file():
        logger.info("no oracle file at %s, so there are no oracle scores", path)
        return None

    prepared = Path(prepared_dir)
    candidates = load_validation_candidates(prepared)
    groups = candidates.groups
    raw_id, product_index = _read_product_mapping(prepared / PRODUCT_MAPPING_FILE)
    oracle = _read_oracle(path)

    # Both sides get an int64 key (position of the request among the sorted validation request
    # ids) * num_products + product index, so the match is one sorted search.
    validation_requests = np.unique(groups.request_id)
    num_products = int(max(product_index.max(initial=0), candidates.product.max(initial=0))) + 1
    if validation_requests.shape[0] * num_products > np.iinfo(np.int64).max:
        raise ValueError(
            f"(request, product) keys overflow int64 with {validation_requests.shape[0]} "
            f"requests and {num_products} products"
        )
    candidate_request = np.repeat(groups.request_id, groups.lengths)
    candidate_keys = (
        np.searchsorted(validation_requests, candidate_request) * num_products + candidates.product
    )
    oracle_keys, oracle_probability = _oracle_keys(
        oracle, validation_requests, raw_id, product_index, num_products, path
    )

    position = np.searchsorted(oracle_keys, candidate_keys)
    position = np.minimum(position, max(oracle_keys.shape[0] - 1, 0))
    if oracle_keys.shape[0]:
        found = oracle_keys[position] == candidate_keys
        probability = np.where(found, oracle_probability[position], 0.0)
    else:
        found = np.zeros(candidate_keys.shape[0], dtype=bool)
        probability = np.zeros(candidate_keys.shape[0], dtype=np.float64)

    _check_missing(int((~found).sum()), found.shape[0], max_missing_fraction, path)
    return probability


def _oracle_keys(
    oracle: pl.DataFrame,
    validation_requests: np.ndarray,
    raw_id: np.ndarray,
    product_index: np.ndarray,
    num_products: int,
    path: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Key the oracle rows of validation requests and mapped products, sorted by key.

    Args:
        oracle: the checked oracle table with N rows.
        validation_requests: (R,) sorted unique uint64 request ids of the validation sample.
        raw_id: (P,) sorted uint64 raw product ids of the mapping.
        product_index: (P,) int64 product index of each `raw_id`.
        num_products: key multiplier, larger than every product index.
        path: the oracle file, for error messages.

    Returns:
        (M,) sorted int64 keys and (M,) float64 cart probabilities, M <= N.
    """
    request = oracle.get_column("request_id").to_numpy()
    product = oracle.get_column("product_id").to_numpy()
    probability = oracle.get_column("cart_probability").to_numpy()

    request_position = _sorted_positions(validation_requests, request)
    product_position = _sorted_positions(raw_id, product)
    matchable = (request_position >= 0) & (product_position >= 0)
    keys = (
        request_position[matchable] * num_products + product_index[product_position[matchable]]
    ).astype(np.int64)

    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    num_duplicates = int((np.diff(keys) == 0).sum())
    if num_duplicates:
        raise ValueError(
            f"oracle file {path} has {num_duplicates} duplicate (request_id, product_id) rows "
            "for validation candidates; each pair must appear once"
        )
    return keys, probability[matchable][order]


def _sorted_positions(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Return the (N,) int64 position of each value in `sorted_values`, or -1 where absent."""
    if sorted_values.shape[0] == 0:
        return np.full(values.shape[0], -1, dtype=np.int64)
    position = np.searchsorted(sorted_values, values)
    position = np.minimum(position, sorted_values.shape[0] - 1)
    return np.where(sorted_values[position] == values, position, -1).astype(np.int64)


def _check_missing(
    num_missing: int, num_candidates: int, max_missing_fraction: float, path: Path
) -> None:
    if num_missing > max_missing_fraction * num_candidates:
        raise ValueError(
            f"oracle file {path} has no cart_probability for {num_missing} of {num_candidates} "
            f"validation candidates (allowed fraction {max_missing_fraction}); regenerate it "
            "from the same demo data as the run"
        )
    if num_missing:
        logger.warning(
            "oracle file %s has no cart_probability for %d of %d validation candidates, "
            "which get probability 0",
            path,
            num_missing,
            num_candidates,
        )


def _read_product_mapping(mapping_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the product mapping as (P,) sorted uint64 raw ids and (P,) int64 indices."""
    if not mapping_path.is_file():
        raise FileNotFoundError(f"{mapping_path} not found; run the prepare stage first")
    mapping = pl.read_parquet(mapping_path)
    missing_columns = [name for name in ("raw_id", "index") if name not in mapping.columns]
    if missing_columns:
        raise ValueError(f"{mapping_path} is missing columns {missing_columns}")
    if mapping.null_count().row(0) != (0,) * mapping.width:
        raise ValueError(f"{mapping_path} has null values; rerun the prepare stage")

    mapping = mapping.sort("raw_id")
    raw_id = mapping.get_column("raw_id").cast(pl.UInt64).to_numpy()
    index = mapping.get_column("index").to_numpy().astype(np.int64)
    if index.size and index.min() < 0:
        raise ValueError(f"{mapping_path}: column 'index' has negative values")
    if np.any(raw_id[1:] == raw_id[:-1]):
        raise ValueError(f"{mapping_path}: column 'raw_id' has duplicate values")
    return raw_id, index


def _read_oracle(path: Path) -> pl.DataFrame:
    """Read and check the oracle file: typed columns, no nulls, probabilities in [0, 1]."""
    oracle = pl.read_parquet(path)
    missing_columns = [name for name in ORACLE_SCHEMA if name not in oracle.columns]
    if missing_columns:
        raise ValueError(f"oracle file {path} is missing columns {missing_columns}")
    oracle = oracle.select(
        pl.col(name).cast(dtype, strict=True) for name, dtype in ORACLE_SCHEMA.items()
    )

    num_null = oracle.null_count().row(0)
    if any(num_null):
        counts = dict(zip(ORACLE_SCHEMA, num_null, strict=True))
        raise ValueError(f"oracle file {path} has null values: {counts}")
    probability = oracle.get_column("cart_probability")
    out_of_range = int((probability.is_nan() | (probability < 0) | (probability > 1)).sum())
    if out_of_range:
        raise ValueError(
            f"oracle file {path} has {out_of_range} cart_probability values outside [0, 1]"
        )
    return oracle
