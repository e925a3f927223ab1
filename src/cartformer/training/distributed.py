"""Training in several processes under torchrun: the process group, sharded batches, reductions.

``torchrun --nproc-per-node N -m cartformer ...`` starts N copies of the command and sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each.
:func:`init_process_group` joins them into one process group (gloo on the CPU, nccl on CUDA), and
training wraps the model in ``DistributedDataParallel``. Every helper here also works without a
process group, where it acts as the only process (rank 0 of 1), so a plain single-process run
needs no setup.

Each training step of N processes covers one global batch that a single process with an N times
larger batch budget would also form: :class:`ShardedBatchSampler` builds the same global batches
on every rank and hands each rank its part.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sized
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# NOTE: the other processes wait at a barrier while rank 0 prepares the data or writes the
# report, which can take many minutes on the full competition file. Two hours is a guess that
# leaves room for that, but a process that really hangs is also reported only after this long.
BARRIER_TIMEOUT = timedelta(hours=2)


def env_world_size() -> int:
    """Return the number of processes that torchrun started (``WORLD_SIZE``), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(*devices: torch.device) -> bool:
    """Join the torchrun process group when ``WORLD_SIZE`` is above 1.

    ``devices`` are the devices the command trains on. CUDA devices select the nccl backend and
    make ``cuda:LOCAL_RANK`` this process's current device; CPU devices select gloo. The group
    lasts until the process exits, so a second call (another command in the same process) keeps
    it: a group created again under torchrun can hang in its rendezvous. Returns whether a group
    was created; a call without torchrun does nothing.

    Raises:
        ValueError: when ``devices`` mix CUDA and other devices, which one backend cannot serve.
    """
    if env_world_size() <= 1 or dist.is_initialized():
        return False
    device_types = sorted({device.type for device in devices})
    if len(device_types) > 1:
        raise ValueError(
            f"under torchrun every stage must train on one device type, got {device_types}; "
            "pass the same --device to all stages"
        )
    if device_types == ["cuda"]:
        # NOTE: this nccl branch has never run (no GPU where it was written); gloo on the CPU is
        # the tested path.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    atexit.register(destroy_process_group)
    logger.info(
        "joined a %s process group of %d processes as rank %d",
        backend,
        get_world_size(),
        get_rank(),
    )
    return True


def destroy_process_group() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    """Return the number of processes in the group, 1 without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def get_rank() -> int:
    """Return this process's rank in the group, 0 without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_main_process() -> bool:
    """Check whether this process is rank 0, the one that writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every process of the group reaches this call; return at once without one."""
    if get_world_size() <= 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the processes in place and return it; without a group, return it as is.

    The tensor must be on this process's training device (the CPU for gloo, CUDA for nccl).
    """
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def local_device(device: torch.device) -> torch.device:
    """Return ``cuda:LOCAL_RANK`` for a CUDA ``device`` in a group of several processes, so each
    process trains on its own GPU, and ``device`` otherwise."""
    if device.type != "cuda" or get_world_size() <= 1:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index is not None and device.index != local.index:
        logger.warning("ignoring --device %s under torchrun: this process uses %s", device, local)
    return local


def main_process_only(
    default: Callable[[], T],
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a function so that only rank 0 runs it.

    The other processes wait at a barrier until rank 0 returns or raises, then return
    ``default()``. Without a process group the function runs as usual.
    """

    def decorate(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            if get_world_size() <= 1:
                return function(*args, **kwargs)
            if not is_main_process():
                barrier()
                return default()
            try:
                return function(*args, **kwargs)
            finally:
                barrier()

        return wrapper

    return decorate


def shard_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Return the (about num_samples / world_size,) sample indices of ``rank`` for evaluation:
    every ``world_size``-th sample from ``rank`` on, so the ranks cover each sample once."""
    return np.arange(rank, num_samples, world_size, dtype=np.int64)


class ShardedBatchSampler(Sampler[list[int]]):
    """Split the global batches of a batch sampler among the processes of a group.

    Every rank wraps an identical ``global_sampler`` (same lengths, seed and epoch, with a budget
    of ``world_size`` times one process's budget), so all ranks form the same global batches.
    :func:`split_batch` cuts each global batch into ``world_size`` parts of about equal padded
    cost, and rank r takes part r. Every rank therefore runs the same number of steps.

    A global batch with fewer samples than processes cannot give every rank a sample. Such
    batches are merged, in order, until the merged batch has enough samples; a remainder joins
    the last batch. Their count is logged every epoch. With ``world_size`` 1 the batches are
    those of ``global_sampler``, unchanged.

    Args:
        global_sampler: a batch sampler with an ``epoch`` attribute that fixes its batch order,
            such as ``TokenBudgetBatchSampler`` or ``LengthBucketBatchSampler``.
        lengths: (num_samples,) history lengths of the dataset, at least 1 each.
        rank: this process's rank, in 0..world_size-1.
        world_size: the number of processes.

    Raises:
        ValueError: for an invalid rank, or a dataset with fewer samples than processes.
    """

    def __init__(
        self, global_sampler: Any, lengths: np.ndarray, rank: int, world_size: int
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if not hasattr(global_sampler, "epoch"):
            raise ValueError(
                f"{type(global_sampler).__name__} has no epoch attribute; wrap a sampler whose "
                "epoch fixes its batches, such as TokenBudgetBatchSampler"
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) < world_size:
            raise ValueError(
                f"the training set has {len(self.lengths)} samples, fewer than the {world_size} "
                "processes; start fewer processes"
            )
        self.global_sampler = global_sampler
        self.rank = rank
        self.world_size = world_size

    @property
    def epoch(self) -> int:
        """The epoch of the wrapped sampler, which fixes the next epoch's global batches."""
        return int(self.global_sampler.epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.global_sampler.epoch = value

    def __len__(self) -> int:
        if self.world_size == 1 and isinstance(self.global_sampler, Sized):
            return len(self.global_sampler)
        epoch = self.epoch
        batches, _ = self._global_batches()
        self.epoch = epoch
        return len(batches)

    def __iter__(self) -> Iterator[list[int]]:
        if self.world_size == 1:
            yield from self.global_sampler
            return
        epoch = self.epoch
        batches, merged = self._global_batches()
        if merged:
            logger.info(
                "epoch %d: merged %d global batches with fewer than %d samples into their "
                "neighbours, so every process gets a sample in every step",
                epoch,
                merged,
                self.world_size,
            )
        for batch in batches:
            yield split_batch(batch, self.lengths, self.world_size)[self.rank].tolist()

    def _global_batches(self) -> tuple[list[np.ndarray], int]:
        """Draw the next epoch's global batches and merge those below ``world_size`` samples.

        Returns the batches and the number of global batches that were merged."""
        batches: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        merged = 0
        for batch in self.global_sampler:
            batch = np.asarray(batch, dtype=np.int64)
            if len(batch) >= self.world_size:
                batches.append(batch)
                continue
            merged += 1
            pending.append(batch)
            if sum(len(part) for part in pending) >= self.world_size:
                batches.append(np.concatenate(pending))
                pending = []
        if pending:
            # The dataset has at least world_size samples, so some batch came before.
            batches[-1] = np.concatenate([batches[-1], *pending])
        return batches, merged


def split_batch(batch: np.ndarray, lengths: np.ndarray, parts: int) -> list[np.ndarray]:
    """Cut one batch into ``parts`` non-empty parts of about equal padded cost.

    The batch is sorted by descending length and cut into consecutive runs. A run costs
    ``len(run) * its longest length``, the padded events of its attention. A binary search finds
    the smallest cost limit that the greedy cut meets with at most ``parts`` runs, so the
    costliest part is as cheap as consecutive runs of the sorted batch allow.

    Args:
        batch: (n,) sample indices, n >= parts.
        lengths: (num_samples,) history length of every sample, at least 1.
        parts: the number of parts, at least 1.

    Returns:
        ``parts`` int64 arrays of sample indices, the longest histories in the first part.
    """
    if len(batch) < parts:
        raise ValueError(f"a batch of {len(batch)} samples cannot be split into {parts} parts")
    ordered = batch[np.argsort(-lengths[batch], kind="stable")]
    sorted_lengths = lengths[ordered]
    low = int(sorted_lengths[0])
    high = -(-len(ordered) // parts) * low
    while low < high:
        middle = (low + high) // 2
        if _cut_points(sorted_lengths, middle, parts) is None:
            low = middle + 1
        else:
            high = middle
    starts = _cut_points(sorted_lengths, low, parts)
    # The search starts from a limit that ceil(n / parts) samples per run meet, so one exists.
    assert starts is not None
    # Fewer runs than parts: halve the run with the most samples, which raises no run's cost.
    bounds = [*starts, len(ordered)]
    while len(bounds) - 1 < parts:
        sizes = np.diff(bounds)
        widest = int(np.argmax(sizes))
        bounds.insert(widest + 1, bounds[widest] + int(sizes[widest]) // 2)
    return [ordered[bounds[i] : bounds[i + 1]] for i in range(parts)]


def _cut_points(sorted_lengths: np.ndarray, max_cost: int, max_runs: int) -> list[int] | None:
    """Cut lengths sorted in descending order greedily into the longest runs with
    ``len(run) * first length <= max_cost``, each of at least 1 sample.

    Returns the start of each run, or None when more than ``max_runs`` runs are needed. The loop
    runs at most ``max_runs + 1`` times."""
    starts: list[int] = []
    start = 0
    total = len(sorted_lengths)
    while start < total:
        if len(starts) == max_runs:
            return None
        starts.append(start)
        start += max(max_cost // int(sorted_lengths[start]), 1)
    return starts
