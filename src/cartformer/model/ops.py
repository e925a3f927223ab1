"""Index operations on unpadded batches: sequences concatenated along dim 0 with their `lengths`.

`B` is the number of sequences, `N = lengths.sum()` the number of concatenated elements and `L`
the padded length (by default `lengths.max()`). All functions are vectorized and keep the device
of their inputs. Functions whose output size depends on the values of `lengths` read it back to
the host once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_lengths(lengths: Tensor) -> None:
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")


def _max_length(lengths: Tensor, max_len: int | None) -> int:
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        return longest
    if max_len < longest:
        raise ValueError(f"max_len={max_len} is shorter than the longest sequence ({longest})")
    return max_len


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Build the mask of valid positions of right-padded sequences.

    Args:
        lengths: (B,) integer sequence lengths.
        max_len: padded length L, or `lengths.max()` when None.

    Returns:
        (B, L) bool tensor, True at positions `j < lengths[i]`.
        Example: lengths [2, 3, 1] -> [[T, T, F], [T, T, T], [T, F, F]].
    """
    _check_lengths(lengths)
    length = _max_length(lengths, max_len)
    positions = torch.arange(length, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def sequence_offsets(lengths: Tensor) -> Tensor:
    """Return the (B,) start offsets of the sequences in the concatenated (N,) layout.

    Example: lengths [2, 3, 1] -> [0, 2, 5].
    """
    _check_lengths(lengths)
    return torch.cumsum(lengths, dim=0) - lengths


def make_groups(lengths: Tensor) -> Tensor:
    """Return the (N,) sequence number of every concatenated element.

    Example: lengths [2, 3, 1] -> [0, 0, 1, 1, 1, 2]. Zero lengths contribute no elements.
    """
    _check_lengths(lengths)
    sequence_ids = torch.arange(lengths.numel(), device=lengths.device)
    return torch.repeat_interleave(sequence_ids, lengths)


def make_pairs(lengths: Tensor) -> Tensor:
    """Build all ordered pairs of elements inside each sequence, diagonal included.

    Args:
        lengths: (B,) integer sequence lengths.

    Returns:
        (2, P) int64 global element indices with `P = sum(lengths ** 2)`. Pairs of one sequence
        are contiguous and ordered by first element, then second element.
        Example: lengths [1, 2] -> [[0, 1, 1, 2, 2], [0, 1, 2, 1, 2]].
    """
    _check_lengths(lengths)
    lengths = lengths.long()
    pair_counts = lengths * lengths
    pair_groups = make_groups(pair_counts)
    index_in_group = torch.arange(pair_groups.numel(), device=lengths.device)
    index_in_group = index_in_group - sequence_offsets(pair_counts)[pair_groups]

    group_lengths = lengths[pair_groups]
    group_offsets = sequence_offsets(lengths)[pair_groups]
    first = group_offsets + torch.div(index_in_group, group_lengths, rounding_mode="floor")
    second = group_offsets + torch.remainder(index_in_group, group_lengths)
    return torch.stack([first, second])


def pad_sequences(
    values: Tensor,
    lengths: Tensor,
    max_len: int | None = None,
    padding_value: float = 0.0,
) -> Tensor:
    """Scatter concatenated sequences into a right-padded tensor.

    Args:
        values: (N, ...) concatenated sequences, N = lengths.sum().
        lengths: (B,) integer sequence lengths.
        max_len: padded length L, or `lengths.max()` when None.
        padding_value: fill value of the padded positions.

    Returns:
        (B, L, ...) tensor with the dtype and device of `values`.
    """
    mask = lengths_to_mask(lengths, max_len)
    if values.shape[0] != int(lengths.sum()):
        raise ValueError(
            f"values has {values.shape[0]} rows but lengths sum to {int(lengths.sum())}"
        )
    padded = values.new_full((*mask.shape, *values.shape[1:]), padding_value)
    padded[mask] = values
    return padded


def unpad(padded: Tensor, lengths: Tensor) -> Tensor:
    """Gather the valid positions of a right-padded tensor, the inverse of `pad_sequences`.

    Args:
        padded: (B, L, ...) right-padded sequences.
        lengths: (B,) integer sequence lengths, each at most L.

    Returns:
        (N, ...) concatenated sequences, N = lengths.sum().
    """
    mask = lengths_to_mask(lengths, padded.shape[1])
    if padded.shape[0] != mask.shape[0]:
        raise ValueError(f"padded has {padded.shape[0]} sequences but lengths has {mask.shape[0]}")
    return padded[mask]


def history_matches(
    history_product: Tensor,
    lengths: Tensor,
    candidate_product: Tensor,
    candidate_sample: Tensor,
    candidate_state: Tensor,
    num_products: int,
) -> tuple[Tensor, Tensor]:
    """Count each candidate's product in its user's history up to the scoring state.

    Args:
        history_product: (N,) product of every history event, sequences concatenated.
        lengths: (B,) history length of each sample.
        candidate_product: (C,) candidate products, each below `num_products`.
        candidate_sample: (C,) sample that each candidate belongs to.
        candidate_state: (C,) local history position of the state that scores the candidate;
            only events at positions 0..state are counted.
        num_products: upper bound of the product indices.

    Returns:
        count: (C,) int64 number of matching events.
        events_since: (C,) int64 state position minus the position of the latest matching
            event, or -1 where the count is 0.
    """
    max_len = int(lengths.max()) + 1 if lengths.numel() else 1
    sample = make_groups(lengths)
    position = torch.arange(
        history_product.shape[0], device=lengths.device
    ) - torch.repeat_interleave(sequence_offsets(lengths), lengths)
    keys, _ = torch.sort((sample * num_products + history_product) * max_len + position)
    base = (candidate_sample * num_products + candidate_product) * max_len
    upper = torch.searchsorted(keys, base + candidate_state, right=True)
    lower = torch.searchsorted(keys, base, right=False)
    count = upper - lower
    latest = keys[(upper - 1).clamp(min=0)] % max_len if keys.numel() else upper
    events_since = torch.where(count > 0, candidate_state - latest, torch.full_like(count, -1))
    return count, events_since
