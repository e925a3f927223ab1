"""Reference scorers for the finetune validation candidates and the loader of those candidates.

Every scorer uses only information available at training time: the encoded positive events of
`prepared/events.parquet` with `timestamp <= train_end`, where `train_end` comes from
`prepared/meta.json`. Scores come back in the flattened order of `finetune_valid.parquet`: user
rows in file order, each user's requests in order, each request's candidates in order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FINETUNE_VALID_FILE = "finetune_valid.parquet"
EVENTS_FILE = "events.parquet"
META_FILE = "meta.json"

CART_ACTION = 1
POSITIVE_ACTIONS = (1, 2, 3)
BASELINE_NAMES = ("random", "popularity", "user_history_count")

_VALID_COLUMNS = ("user", "request_id", "request_size", "candidate_product", "candidate_target")
_EVENT_COLUMNS = ("user", "product", "action", "timestamp")


class ValidationGroups(NamedTuple):
    """Targets and request layout of the finetune validation sample.

    Fields: `targets` (C,) int8 (1 = cart, 0 = view), `lengths` (R,) int64 candidates per
    request, `request_id` (R,) uint64 raw request ids, `user` (R,) int64 user index.
    """

    targets: np.ndarray
    lengths: np.ndarray
    request_id: np.ndarray
    user: np.ndarray


@dataclass(frozen=True)
class ValidationCandidates:
    """The finetune validation sample flattened to one entry per candidate.

    `groups` is the request layout. `product` and `user` are (C,) int64: the candidate's product
    index and the index of the user it was shown to.
    """

    groups: ValidationGroups
    product: np.ndarray
    user: np.ndarray


def load_validation_groups(prepared_dir: str | Path) -> ValidationGroups:
    """Read the targets and request layout of `finetune_valid.parquet`.

    Returns arrays in the flattened order described in the module docstring: `targets` (C,),
    `lengths` (R,), `request_id` (R,), `user` (R,).
    """
    return load_validation_candidates(prepared_dir).groups


def load_validation_candidates(prepared_dir: str | Path) -> ValidationCandidates:
    """Read `finetune_valid.parquet` and flatten it to one entry per candidate.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if a column is missing or null, or the list lengths disagree.
    """
    path = Path(prepared_dir) / FINETUNE_VALID_FILE
    table = _read_columns(path, _VALID_COLUMNS)

    request_id = _flatten(table, "request_id", path).astype(np.uint64, copy=False)
    request_size = _flatten(table, "request_size", path).astype(np.int64, copy=False)
    candidate_product = _flatten(table, "candidate_product", path).astype(np.int64, copy=False)
    candidate_target = _flatten(table, "candidate_target", path).astype(np.int8, copy=False)
    row_user = table.column("user").to_numpy().astype(np.int64, copy=False)

    requests_per_row = _parallel_list_lengths(table, "request_id", "request_size", path)
    candidates_per_row = _parallel_list_lengths(
        table, "candidate_product", "candidate_target", path
    )
    _check_request_sizes(request_size, requests_per_row, candidates_per_row, path)
    if candidate_product.size and candidate_product.min() < 0:
        raise ValueError(f"{path}: column 'candidate_product' has negative product indices")
    if not np.isin(candidate_target, (0, 1)).all():
        bad = np.unique(candidate_target[~np.isin(candidate_target, (0, 1))])
        raise ValueError(
            f"{path}: column 'candidate_target' must be 0 (view) or 1 (cart), found {bad.tolist()}"
        )

    request_user = np.repeat(row_user, requests_per_row)
    groups = ValidationGroups(
        targets=candidate_target,
        lengths=request_size,
        request_id=request_id,
        user=request_user,
    )
    return ValidationCandidates(
        groups=groups,
        product=candidate_product,
        user=np.repeat(request_user, request_size),
    )


def compute_baseline_scores(prepared_dir: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Score every finetune validation candidate with each baseline.

    Baselines, each a (C,) float64 array in the flattened candidate order:

    - `random`: uniform in [0, 1) from `numpy.random.default_rng(seed)`.
    - `popularity`: number of cart events (action 1) with the product up to `train_end`.
    - `user_history_count`: the user's number of positive events (actions 1, 2, 3) with the
      product up to `train_end`, plus a popularity fraction in [0, 1) that breaks ties. See
      `user_history_scores`.
    """
    prepared = Path(prepared_dir)
    candidates = load_validation_candidates(prepared)
    train_end = read_train_end(prepared)
    events = _read_training_events(prepared / EVENTS_FILE, train_end)

    num_products = int(max(events["product"].max(initial=0), candidates.product.max(initial=0))) + 1
    popularity = product_popularity(events["product"], events["action"], num_products)
    rng = np.random.default_rng(seed)
    return {
        "random": rng.random(candidates.product.shape[0]),
        "popularity": popularity[candidates.product].astype(np.float64),
        "user_history_count": user_history_scores(
            events["user"], events["product"], candidates.user, candidates.product, popularity
        ),
    }


def product_popularity(product: np.ndarray, action: np.ndarray, num_products: int) -> np.ndarray:
    """Count cart events per product.

    Args:
        product: (E,) product index of each event.
        action: (E,) action code of each event; only `CART_ACTION` counts.
        num_products: length of the output; larger than every product index.

    Returns:
        (num_products,) int64 number of cart events per product index.
    """
    return np.bincount(product[action == CART_ACTION], minlength=num_products).astype(np.int64)


def user_history_scores(
    event_user: np.ndarray,
    event_product: np.ndarray,
    candidate_user: np.ndarray,
    candidate_product: np.ndarray,
    popularity: np.ndarray,
) -> np.ndarray:
    """Score candidates by the user's own event count with the product, ties by popularity.

    The score is `count + popularity_rank / num_popularity_values`, where `popularity_rank` is
    the dense rank (0 = least popular) of the product's popularity among all product indices.
    The fraction lies in [0, 1), so one more event with a product outranks any popularity
    difference. This is exact in float64 while `count * num_popularity_values < 2**52`.
    Candidates with equal count and equal popularity get equal scores.

    Args:
        event_user, event_product: (E,) indices of the training-period positive events.
        candidate_user, candidate_product: (C,) indices of the candidates to score.
        popularity: (P,) popularity per product index; P is larger than every product index.

    Returns:
        (C,) float64 scores.
    """
    num_products = popularity.shape[0]
    max_user = int(max(event_user.max(initial=0), candidate_user.max(initial=0)))
    if (max_user + 1) * num_products > np.iinfo(np.int64).max:
        raise ValueError(
            f"(user, product) keys overflow int64 with {max_user + 1} users and "
            f"{num_products} products"
        )
    event_keys = event_user.astype(np.int64) * num_products + event_product
    candidate_keys = candidate_user.astype(np.int64) * num_products + candidate_product

    unique_keys, key_counts = np.unique(event_keys, return_counts=True)
    position = np.searchsorted(unique_keys, candidate_keys)
    position = np.minimum(position, max(unique_keys.shape[0] - 1, 0))
    if unique_keys.shape[0]:
        found = unique_keys[position] == candidate_keys
        history_count = np.where(found, key_counts[position], 0)
    else:
        history_count = np.zeros(candidate_keys.shape[0], dtype=np.int64)

    distinct_popularity, popularity_rank = np.unique(popularity, return_inverse=True)
    popularity_fraction = popularity_rank / distinct_popularity.shape[0]
    return history_count.astype(np.float64) + popularity_fraction[candidate_product]


def read_train_end(prepared_dir: str | Path) -> int:
    """Read the training period's end (unix seconds) from `meta.json`."""
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the prepare stage first")
    split = json.loads(path.read_text()).get("split", {})
    if "train_end" not in split:
        raise ValueError(f"{path} has no 'split.train_end' key; rerun the prepare stage")
    train_end = split["train_end"]
    if isinstance(train_end, bool) or not isinstance(train_end, (int, float)):
        raise ValueError(f"{path}: 'train_end' must be unix seconds, got {train_end!r}")
    return int(train_end)


def _read_training_events(path: Path, train_end: int) -> dict[str, np.ndarray]:
    """Read the positive events with `timestamp <= train_end` as (E,) int64 arrays."""
    table = _read_columns(path, _EVENT_COLUMNS)
    for name in _EVENT_COLUMNS:
        if table.column(name).null_count:
            raise ValueError(f"{path}: column {name!r} has null values; rerun the prepare stage")
    columns = {name: table.column(name).to_numpy().astype(np.int64) for name in _EVENT_COLUMNS}

    for name in ("user", "product"):
        if columns[name].size and columns[name].min() < 0:
            raise ValueError(f"{path}: column {name!r} has negative indices")
    unexpected = ~np.isin(columns["action"], POSITIVE_ACTIONS)
    if unexpected.any():
        codes = np.unique(columns["action"][unexpected]).tolist()
        raise ValueError(
            f"{path}: column 'action' has codes {codes}, expected only positive events "
            f"{list(POSITIVE_ACTIONS)}; rerun the prepare stage"
        )

    in_training = columns["timestamp"] <= train_end
    logger.info(
        "baselines use %d of %d positive events (timestamp <= train_end %d)",
        int(in_training.sum()),
        in_training.shape[0],
        train_end,
    )
    return {name: values[in_training] for name, values in columns.items()}


def _read_columns(path: Path, columns: tuple[str, ...]) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the prepare stage first")
    names = pq.read_schema(path).names
    missing = [name for name in columns if name not in names]
    if missing:
        raise ValueError(f"{path} is missing columns {missing}; rerun the prepare stage")
    return pq.read_table(path, columns=list(columns))


def _flatten(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise ValueError(f"{path}: column {name!r} has {column.null_count} null rows")
    values = pc.list_flatten(column)
    if values.null_count:
        raise ValueError(f"{path}: column {name!r} has {values.null_count} null elements")
    return values.to_numpy()


def _parallel_list_lengths(table: pa.Table, first: str, second: str, path: Path) -> np.ndarray:
    """Return the per-row list lengths of two columns that must be parallel, shape (rows,)."""
    first_lengths = pc.list_value_length(table.column(first)).to_numpy().astype(np.int64)
    second_lengths = pc.list_value_length(table.column(second)).to_numpy().astype(np.int64)
    mismatched = np.flatnonzero(first_lengths != second_lengths)
    if mismatched.size:
        row = int(mismatched[0])
        raise ValueError(
            f"{path}: lists {first!r} and {second!r} differ in length in {mismatched.size} rows "
            f"(first in row {row}: {first_lengths[row]} and {second_lengths[row]}); "
            "rerun the prepare stage"
        )
    return first_lengths


def _check_request_sizes(
    request_size: np.ndarray,
    requests_per_row: np.ndarray,
    candidates_per_row: np.ndarray,
    path: Path,
) -> None:
    if request_size.size and request_size.min() < 0:
        raise ValueError(f"{path}: column 'request_size' has negative values")
    row_of_request = np.repeat(np.arange(requests_per_row.shape[0]), requests_per_row)
    size_per_row = np.bincount(
        row_of_request, weights=request_size, minlength=requests_per_row.shape[0]
    ).astype(np.int64)
    mismatched = np.flatnonzero(size_per_row != candidates_per_row)
    if mismatched.size:
        row = int(mismatched[0])
        raise ValueError(
            f"{path}: 'request_size' sums to {size_per_row[row]} in row {row} but "
            f"'candidate_product' has {candidates_per_row[row]} entries "
            f"({mismatched.size} rows differ); rerun the prepare stage"
        )
