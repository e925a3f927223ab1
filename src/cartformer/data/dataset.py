"""Torch datasets over the prepared pretrain and finetune parquet files, plus batch helpers.

Each dataset keeps every list column as one flat numpy array of values and an (rows + 1,)
array of offsets taken from the Arrow list arrays. `__getitem__` slices one row and builds that
sample's dict of int64 tensors, and `collate` concatenates samples into the unpadded batch layout
of docs/architecture.md.

Side features (`SIDE_FEATURES`) are loaded only when a dataset is built with them: `timestamp`
comes from the sample file itself, `city` and `store` from its sidecar file
`features/<sample file>` that the prepare stage writes for inputs with `city_name` and
`store_id`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

Sample = dict[str, Any]

SIDE_FEATURES = ("city", "store", "timestamp")
"""Optional per-event (and per-request) features a dataset can add to its samples."""
_SIDECAR_FEATURES = ("city", "store")
REQUEST_PREFIX = "request_"
"""Prefix of a request's side-feature column in the finetune files, e.g. `request_city`."""
_FEATURES_DIR = "features"

PRETRAIN_LIST_COLUMNS = ("product", "source", "action", "target_index")
FINETUNE_LIST_COLUMNS = (
    "product",
    "source",
    "action",
    "request_id",
    "request_source",
    "state_index",
    "request_size",
    "candidate_product",
    "candidate_target",
)


@dataclass(frozen=True)
class FlatList:
    """A list column as flat values plus offsets: row i is `values[offsets[i]:offsets[i + 1]]`."""

    values: np.ndarray
    """(total,) values of all rows, in the column's integer dtype."""
    offsets: np.ndarray
    """(rows + 1,) int64 start offsets, starting at 0."""

    @property
    def lengths(self) -> np.ndarray:
        """(rows,) int64 list lengths."""
        return np.diff(self.offsets)

    def row(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    def row_tensor(self, index: int) -> Tensor:
        """Return row `index` as a new int64 tensor."""
        return torch.from_numpy(np.array(self.row(index), dtype=np.int64))

    def owners(self) -> np.ndarray:
        """(total,) row number of every value."""
        return np.repeat(np.arange(self.lengths.shape[0]), self.lengths)


def _flat_list(table: pa.Table, name: str, path: Path) -> FlatList:
    column = table.column(name)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        raise ValueError(
            f"column {name!r} of {path} has type {array.type}, but a list column is expected"
        )
    if not pa.types.is_integer(array.type.value_type):
        raise ValueError(
            f"column {name!r} of {path} has type {array.type}, but a list of integers is expected"
        )
    if array.null_count:
        raise ValueError(
            f"column {name!r} of {path} has {array.null_count} null lists. Rerun `cartformer "
            "prepare` to rebuild the prepared files"
        )
    values = array.flatten()
    if values.null_count:
        raise ValueError(
            f"column {name!r} of {path} has {values.null_count} null values inside its lists. "
            "Rerun `cartformer prepare` to rebuild the prepared files"
        )
    # A sliced Arrow array keeps the offsets of its parent, so rebase them to start at 0.
    offsets = array.offsets.to_numpy().astype(np.int64)
    if offsets.size == 0:
        offsets = np.zeros(1, dtype=np.int64)
    offsets -= offsets[0]
    return FlatList(values=values.to_numpy(), offsets=offsets)


def _read_prepared(
    path: str | Path, list_columns: Sequence[str]
) -> tuple[np.ndarray, dict[str, FlatList]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared file {path} not found. Run `cartformer prepare` first")
    schema = pq.read_schema(path)
    required = ["user", *list_columns]
    missing = [name for name in required if name not in schema.names]
    if missing:
        raise ValueError(
            f"{path} is missing columns {missing}. Expected {required} (see docs/architecture.md)"
        )
    table = pq.read_table(path, columns=required)
    users = table.column("user")
    if users.null_count:
        raise ValueError(f"column 'user' of {path} has {users.null_count} nulls")
    lists = {name: _flat_list(table, name, path) for name in list_columns}
    return users.to_numpy(), lists


def _checked_side_features(side_features: Collection[str]) -> tuple[str, ...]:
    unknown = sorted(set(side_features) - set(SIDE_FEATURES))
    if unknown:
        raise ValueError(f"unknown side features {unknown}; choose from {list(SIDE_FEATURES)}")
    return tuple(name for name in SIDE_FEATURES if name in side_features)


def _read_sidecar(path: Path, users: np.ndarray, columns: Sequence[str]) -> dict[str, FlatList]:
    """Read list `columns` of the sidecar `features/<name>` of sample file `path`.

    The sidecar must have the same `user` column as the sample file, row for row.
    """
    sidecar = path.parent / _FEATURES_DIR / path.name
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"side-feature file {sidecar} not found; city and store features need "
            "`cartformer prepare` on an input with city_name and store_id, or turn them off"
        )
    sidecar_users, lists = _read_prepared(sidecar, columns)
    if not np.array_equal(sidecar_users, users):
        raise ValueError(f"{sidecar} and {path} list different users; rerun `cartformer prepare`")
    return lists


def _check_parallel(lists: Mapping[str, FlatList], names: Sequence[str], path: Path) -> None:
    reference = lists[names[0]].lengths
    for name in names[1:]:
        mismatched = np.flatnonzero(lists[name].lengths != reference)
        if mismatched.size:
            raise ValueError(
                f"columns {names[0]!r} and {name!r} of {path} have different list lengths in "
                f"{mismatched.size} rows (first row {int(mismatched[0])}), but they must be parallel"
            )


def _check_positions(
    positions: FlatList, history_lengths: np.ndarray, name: str, path: Path
) -> None:
    """Check that every value of `positions` indexes into its row's history."""
    limits = history_lengths[positions.owners()]
    invalid = np.flatnonzero((positions.values < 0) | (positions.values >= limits))
    if invalid.size:
        row = int(positions.owners()[invalid[0]])
        raise ValueError(
            f"column {name!r} of {path} has {invalid.size} positions outside the history "
            f"(first in row {row}: {int(positions.values[invalid[0]])} with history length "
            f"{int(history_lengths[row])})"
        )


def _check_nonempty_history(history_lengths: np.ndarray, path: Path) -> None:
    empty = np.flatnonzero(history_lengths == 0)
    if empty.size:
        raise ValueError(
            f"{path} has {empty.size} rows with an empty 'product' history (first row "
            f"{int(empty[0])}). Rerun `cartformer prepare`, which drops such users"
        )


class PretrainDataset(Dataset[Sample]):
    """Pretrain samples of `pretrain_train.parquet` or `pretrain_valid.parquet`, one per user.

    A sample is `{"user": (1,), "history": {...}}` with int64 tensors: `product`, `source`,
    `action`, `position` (arange) of shape (n,), `lengths` = [n], `target_index` (t,) and
    `target_lengths` = [t]. Each name of `side_features` adds a history tensor of shape (n,):
    `city`, `store` (indices) or `timestamp` (unix seconds).
    """

    def __init__(self, path: str | Path, side_features: Collection[str] = ()) -> None:
        self.path = Path(path)
        self.side_features = _checked_side_features(side_features)
        columns = PRETRAIN_LIST_COLUMNS
        if "timestamp" in self.side_features:
            columns = (*columns, "timestamp")
        self.users, self.lists = _read_prepared(self.path, columns)
        sidecar = [name for name in self.side_features if name in _SIDECAR_FEATURES]
        if sidecar:
            self.lists.update(_read_sidecar(self.path, self.users, sidecar))
        _check_parallel(self.lists, ("product", "source", "action", *self.side_features), self.path)
        self.history_lengths = self.lists["product"].lengths
        _check_nonempty_history(self.history_lengths, self.path)
        _check_positions(
            self.lists["target_index"], self.history_lengths, "target_index", self.path
        )
        logger.info(
            "loaded %d pretrain samples with %d events and %d targets from %s",
            len(self),
            self.lists["product"].values.size,
            self.lists["target_index"].values.size,
            self.path,
        )

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def __getitem__(self, index: int) -> Sample:
        length = int(self.history_lengths[index])
        target_index = self.lists["target_index"].row_tensor(index)
        history = {
            "product": self.lists["product"].row_tensor(index),
            "source": self.lists["source"].row_tensor(index),
            "action": self.lists["action"].row_tensor(index),
            "position": torch.arange(length),
            "lengths": torch.tensor([length]),
            "target_index": target_index,
            "target_lengths": torch.tensor([target_index.shape[0]]),
        }
        for name in self.side_features:
            history[name] = self.lists[name].row_tensor(index)
        return {"user": torch.tensor([int(self.users[index])]), "history": history}


class FinetuneDataset(Dataset[Sample]):
    """Finetune samples of `finetune_train.parquet` or `finetune_valid.parquet`, one per user.

    A sample contains int64 tensors:

    - `user` (1,)
    - `history`: `product`, `source`, `action`, `position` (n,), `lengths` = [n], an empty
      `target_index` and `target_lengths` = [0]
    - `requests`: `source`, `state_index`, `lengths` (candidates per request) and `request_id`
      of shape (r,), and `num_requests` = [r]. `request_id` stores the bits of the u64 ids,
      which `tensor.numpy().view(np.uint64)` recovers.
    - `candidates`: `product` and `target` (1 = cart, 0 = view) of shape (c,)

    Each name of `side_features` adds a `history` tensor of shape (n,) and a `requests` tensor
    of shape (r,): `city`, `store` (indices) or `timestamp` (unix seconds; a request's time is
    its earliest row's).
    """

    def __init__(self, path: str | Path, side_features: Collection[str] = ()) -> None:
        self.path = Path(path)
        self.side_features = _checked_side_features(side_features)
        columns = FINETUNE_LIST_COLUMNS
        if "timestamp" in self.side_features:
            columns = (*columns, "timestamp", "request_timestamp")
        self.users, self.lists = _read_prepared(self.path, columns)
        sidecar = [name for name in self.side_features if name in _SIDECAR_FEATURES]
        if sidecar:
            request_sidecar = [REQUEST_PREFIX + name for name in sidecar]
            self.lists.update(_read_sidecar(self.path, self.users, [*sidecar, *request_sidecar]))
        lists = self.lists
        _check_parallel(lists, ("product", "source", "action", *self.side_features), self.path)
        request_side = [REQUEST_PREFIX + name for name in self.side_features]
        _check_parallel(
            lists,
            ("request_id", "request_source", "state_index", "request_size", *request_side),
            self.path,
        )
        _check_parallel(lists, ("candidate_product", "candidate_target"), self.path)
        self.history_lengths = lists["product"].lengths
        _check_nonempty_history(self.history_lengths, self.path)
        _check_positions(lists["state_index"], self.history_lengths, "state_index", self.path)
        self._check_request_sizes()
        logger.info(
            "loaded %d finetune samples with %d events, %d requests and %d candidates from %s",
            len(self),
            lists["product"].values.size,
            lists["request_id"].values.size,
            lists["candidate_product"].values.size,
            self.path,
        )

    def _check_request_sizes(self) -> None:
        sizes = self.lists["request_size"]
        if (sizes.values < 0).any():
            raise ValueError(f"column 'request_size' of {self.path} has negative sizes")
        size_totals = np.bincount(sizes.owners(), weights=sizes.values, minlength=len(self))
        size_totals = size_totals.astype(np.int64)
        mismatched = np.flatnonzero(size_totals != self.lists["candidate_product"].lengths)
        if mismatched.size:
            row = int(mismatched[0])
            raise ValueError(
                f"column 'request_size' of {self.path} does not sum to the length of "
                f"'candidate_product' in {mismatched.size} rows (first row {row}: "
                f"{int(size_totals[row])} vs {int(self.lists['candidate_product'].lengths[row])})"
            )

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def __getitem__(self, index: int) -> Sample:
        lists = self.lists
        length = int(self.history_lengths[index])
        request_ids = lists["request_id"].row(index)
        if request_ids.dtype == np.uint64:
            request_ids = request_ids.view(np.int64)
        history = {
            "product": lists["product"].row_tensor(index),
            "source": lists["source"].row_tensor(index),
            "action": lists["action"].row_tensor(index),
            "position": torch.arange(length),
            "lengths": torch.tensor([length]),
            "target_index": torch.zeros(0, dtype=torch.int64),
            "target_lengths": torch.tensor([0]),
        }
        requests = {
            "source": lists["request_source"].row_tensor(index),
            "state_index": lists["state_index"].row_tensor(index),
            "lengths": lists["request_size"].row_tensor(index),
            "num_requests": torch.tensor([lists["request_id"].lengths[index]]),
            "request_id": torch.from_numpy(np.array(request_ids, dtype=np.int64)),
        }
        for name in self.side_features:
            history[name] = lists[name].row_tensor(index)
            requests[name] = lists[REQUEST_PREFIX + name].row_tensor(index)
        return {
            "user": torch.tensor([int(self.users[index])]),
            "history": history,
            "requests": requests,
            "candidates": {
                "product": lists["candidate_product"].row_tensor(index),
                "target": lists["candidate_target"].row_tensor(index),
            },
        }


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge samples into one batch.

    Tensors are concatenated along dim 0, nested dicts are merged recursively and any other
    value becomes a list with one entry per sample. Every sample must have the same keys.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    keys = list(batch[0].keys())
    for sample in batch[1:]:
        if list(sample.keys()) != keys:
            raise ValueError(
                f"samples have different keys: {keys} and {list(sample.keys())}, but collate "
                "needs samples of one kind"
            )
    merged: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in batch]
        if isinstance(values[0], Tensor):
            merged[key] = torch.cat(values, dim=0)
        elif isinstance(values[0], Mapping):
            merged[key] = collate(values)
        else:
            merged[key] = values
    return merged


def move_to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move every tensor inside nested dicts, lists and tuples to `device`, keeping other values."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device, non_blocking) for value in batch)
    return batch


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of samples with similar history lengths, in a new random order every epoch.

    Each epoch shuffles the samples, cuts the permutation into pools of ``pool_batches``
    batches, sorts every pool by history length, cuts it into batches and shuffles the order
    of all batches. Padding inside a batch shrinks to the length spread of one pool while the
    batches stay random. Every sample appears exactly once per epoch.
    """

    def __init__(
        self, lengths: np.ndarray, batch_size: int, seed: int = 0, pool_batches: int = 50
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.pool_size = batch_size * pool_batches
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size) if len(self.lengths) else 0

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.lengths))
        batches: list[np.ndarray] = []
        for start in range(0, len(order), self.pool_size):
            pool = order[start : start + self.pool_size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches.extend(np.split(pool, np.arange(self.batch_size, len(pool), self.batch_size)))
        for index in rng.permutation(len(batches)):
            yield batches[index].tolist()


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of samples with similar history lengths, each within a budget of padded events.

    A batch costs `len(batch) * max(lengths[batch])` events once its histories are padded for
    attention. Each epoch shuffles the samples, cuts the permutation into pools of about
    ``pool_batches`` budgets' worth of events, sorts every pool by history length and cuts it
    greedily into the largest batches that stay within ``max_tokens``. The order of all batches
    is then shuffled. A single history longer than the budget forms a batch of its own. Steps
    therefore cost about the same whatever the lengths, and every sample appears exactly once
    per epoch.

    Args:
        lengths: (num_samples,) history lengths, the events each sample feeds the transformer.
        max_tokens: padded events per batch, at least 1.
        seed: seed of the per-epoch shuffles; epoch e uses the generator seeded with
            (seed, e), so ``epoch`` can be set to continue an interrupted run.
        pool_batches: budgets per sorting pool; larger pools pad less and shuffle less.
    """

    def __init__(
        self, lengths: np.ndarray, max_tokens: int, seed: int = 0, pool_batches: int = 50
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if (self.lengths < 1).any():
            raise ValueError("every history length must be at least 1 to be batched by events")
        self.max_tokens = max_tokens
        self.pool_tokens = max_tokens * pool_batches
        self.seed = seed
        self.epoch = 0

    def _batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        # Pools end where the running sum of events crosses a multiple of the pool budget.
        pool_ids = np.cumsum(self.lengths[order]) // self.pool_tokens
        pool_starts = np.flatnonzero(np.diff(pool_ids, prepend=-1))
        batches: list[np.ndarray] = []
        for pool in np.split(order, pool_starts[1:]):
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches.extend(_cut_sorted(pool, self.lengths[pool], self.max_tokens))
        return [batches[index] for index in rng.permutation(len(batches))]

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(self.epoch)
        self.epoch += 1
        for batch in batches:
            yield batch.tolist()


def _cut_sorted(indices: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut samples sorted by ascending length into consecutive batches with
    ``count * longest <= max_tokens``; a sample over the budget gets a batch of its own.

    The loop runs once per batch: each step finds the batch end with one vectorized test.
    """
    batches: list[np.ndarray] = []
    start = 0
    total = len(indices)
    while start < total:
        # Sorted lengths make lengths[end - 1] the longest of indices[start:end].
        counts = np.arange(1, total - start + 1)
        fits = counts * lengths[start:] <= max_tokens
        size = max(int(np.argmin(fits)) if not fits.all() else total - start, 1)
        batches.append(indices[start : start + size])
        start += size
    return batches
