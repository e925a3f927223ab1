"""Per-request NDCG@k over flattened candidate groups, vectorized with numpy.

Candidates of all requests are concatenated along one axis and `lengths` gives the number of
candidates in each request, the same layout as the `candidates` part of a finetune batch.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

# Cells of one padded (rows, width) block: 2**22 float64 cells take 32 MiB, and the sort and
# masks take a few times that.
_PADDED_CHUNK_ELEMENTS = 1 << 22


def ndcg_at_k(scores: ArrayLike, targets: ArrayLike, lengths: ArrayLike, k: int = 10) -> np.ndarray:
    """Compute NDCG@k of every request with linear gains.

    DCG@k of a request is `sum(target / log2(rank + 2))` over its first `k` candidates ranked by
    descending score, with `rank` counted from 0. NDCG@k divides it by the DCG@k of the ranking by
    descending target. A request whose ideal DCG is 0 (no positive target, or no candidate) gets
    0, as in `sklearn.metrics.ndcg_score`.

    Ties: candidates with equal scores keep their input order, so the earlier candidate ranks
    higher. This is a deterministic stable sort. `sklearn.metrics.ndcg_score(..., ignore_ties=True)`
    (scikit-learn 1.9) reverses the order of the unstable `np.argsort`, so the two agree whenever
    the scores inside a request are distinct. A NaN score raises an error. Scores of -inf are valid
    and rank last.

    Args:
        scores: (C,) float scores of all candidates, requests concatenated.
        targets: (C,) non-negative relevance labels (1 = cart, 0 = view in this project;
            graded labels also work).
        lengths: (R,) number of candidates per request; must sum to C.
        k: number of top positions that count.

    Returns:
        (R,) float64 NDCG@k per request, in [0, 1].
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    score_values = _to_numpy(scores, "scores").astype(np.float64, copy=False)
    target_values = _to_numpy(targets, "targets").astype(np.float64, copy=False)
    request_lengths = _to_numpy(lengths, "lengths")
    _check_inputs(score_values, target_values, request_lengths)
    request_lengths = request_lengths.astype(np.int64, copy=False)

    dcg = _dcg_at_k(score_values, target_values, request_lengths, k)
    ideal_dcg = _dcg_at_k(target_values, target_values, request_lengths, k)

    ndcg = np.zeros(request_lengths.shape[0], dtype=np.float64)
    np.divide(dcg, ideal_dcg, out=ndcg, where=ideal_dcg > 0)
    return ndcg


def mean_ndcg_at_k(
    scores: ArrayLike,
    targets: ArrayLike,
    lengths: ArrayLike,
    k: int = 10,
    min_candidates: int = 2,
) -> float:
    """Average NDCG@k over requests with at least `min_candidates` candidates.

    The default of 2 skips single-candidate requests, whose ranking is trivial. Shapes are those
    of `ndcg_at_k`.

    Raises:
        ValueError: if no request has `min_candidates` candidates.
    """
    per_request = ndcg_at_k(scores, targets, lengths, k=k)
    request_lengths = _to_numpy(lengths, "lengths")
    counted = request_lengths >= min_candidates
    if not counted.any():
        raise ValueError(
            f"no request has at least {min_candidates} candidates "
            f"(got {request_lengths.shape[0]} requests); NDCG@{k} is undefined"
        )
    return float(per_request[counted].mean())


def _dcg_at_k(
    ranking_key: np.ndarray, gains: np.ndarray, lengths: np.ndarray, k: int
) -> np.ndarray:
    """Sum the discounted gains of each request's top k candidates by descending key.

    Requests are padded to a (rows, width) matrix and sorted row-wise. To bound memory, requests
    are bucketed by their length rounded up to a power of two, and each bucket is processed in
    chunks of about `_PADDED_CHUNK_ELEMENTS` cells. The Python loop runs over buckets and chunks,
    never over single requests.

    Args:
        ranking_key: (C,) values to rank by, higher first; no NaN.
        gains: (C,) gains of the candidates.
        lengths: (R,) int64 candidates per request, summing to C.
        k: number of top positions that count.

    Returns:
        (R,) float64 DCG@k per request.
    """
    num_requests = lengths.shape[0]
    dcg = np.zeros(num_requests, dtype=np.float64)
    if ranking_key.shape[0] == 0:
        return dcg

    request_start = np.cumsum(lengths) - lengths
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    width = np.left_shift(1, np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64))
    requests_by_width = np.argsort(width, kind="stable")
    bucket_starts = np.flatnonzero(np.diff(width[requests_by_width])) + 1

    for bucket in np.split(requests_by_width, bucket_starts):
        bucket_width = int(width[bucket[0]])
        rows_per_chunk = max(_PADDED_CHUNK_ELEMENTS // bucket_width, 1)
        for chunk_start in range(0, bucket.shape[0], rows_per_chunk):
            requests = bucket[chunk_start : chunk_start + rows_per_chunk]
            first = request_start[requests][:, None]
            size = lengths[requests][:, None]
            column = np.arange(bucket_width)

            # Padding cells get key -inf, so they sort after every real candidate. A real -inf
            # key still comes first because the stable sort keeps its lower column.
            is_real = column < size
            candidate = np.where(is_real, first + column, 0)
            padded_key = np.where(is_real, -ranking_key[candidate], np.inf)

            top = np.argsort(padded_key, axis=1, kind="stable")[:, :k]
            top_is_real = top < size
            top_candidate = np.where(top_is_real, first + top, 0)
            top_gain = np.where(top_is_real, gains[top_candidate], 0.0)
            dcg[requests] = top_gain @ discount[: top.shape[1]]
    return dcg


def _to_numpy(values: ArrayLike, name: str) -> np.ndarray:
    """Convert a torch tensor or array-like to a one-dimensional numpy array."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        array = tensor.numpy()
    else:
        array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_inputs(scores: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> None:
    if scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must have the same length, got {scores.shape[0]} "
            f"and {targets.shape[0]}"
        )
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be non-negative, got minimum {lengths.min()}")
    total = int(lengths.sum())
    if total != scores.shape[0]:
        raise ValueError(
            f"lengths sum to {total} but there are {scores.shape[0]} scores; "
            "pass one length per request covering all candidates"
        )
    if np.isnan(scores).any():
        raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN values")
    if not np.isfinite(targets).all():
        raise ValueError("targets contain NaN or infinite values")
    if targets.size and targets.min() < 0:
        raise ValueError(f"targets must be non-negative, got minimum {targets.min()}")
