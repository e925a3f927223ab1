"""Training losses: calibrated pairwise logistic for finetune, catalogue softmax for pretrain."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cartformer.model.ops import make_pairs


def calibrated_pairwise_logistic(logits: Tensor, targets: Tensor, lengths: Tensor) -> Tensor:
    """Mean calibrated pairwise logistic loss over the ordered pairs of each request: the sum
    of `calibrated_pairwise_logistic_sum` divided by its pair count (at least 1)."""
    total, pairs = calibrated_pairwise_logistic_sum(logits, targets, lengths)
    return total / pairs.clamp(min=1.0)


def calibrated_pairwise_logistic_sum(
    logits: Tensor, targets: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """Sum the calibrated pairwise logistic loss over the ordered pairs of each request.

    For every ordered pair (i, j) inside one request with t_i > t_j, the pair loss is
    -log(sigmoid(c_i) / (sigmoid(c_i) + sigmoid(c_j))), computed in log space as
    logsumexp(logsigmoid(c_i), logsigmoid(c_j)) - logsigmoid(c_i). The result is the mean over
    these pairs.

    Args:
        logits: (C,) float scores c of the concatenated candidates.
        targets: (C,) targets t, of which only the order matters.
        lengths: (R,) candidates per request, summing to C.

    Returns:
        (sum of pair losses, number of ordered pairs), both scalars in the dtype of `logits`.
        The sum is exactly 0, still connected to `logits` so `backward` works, when no request
        has a pair with different targets. Sum and count let several batches or processes
        combine into one mean.
    """
    if logits.shape != targets.shape or logits.dim() != 1:
        raise ValueError(
            f"logits and targets must be 1-D of equal shape, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    total = int(lengths.sum())
    if total != logits.shape[0]:
        raise ValueError(f"request lengths sum to {total} but there are {logits.shape[0]} logits")
    first, second = make_pairs(lengths)
    is_ordered = targets[first] > targets[second]
    log_sigmoid = F.logsigmoid(logits)
    log_first = log_sigmoid[first]
    log_denominator = torch.logaddexp(log_first, log_sigmoid[second])
    pair_losses = log_denominator - log_first
    # A weighted sum avoids a host sync, and an empty set of ordered pairs gives 0, not NaN.
    weights = is_ordered.to(logits.dtype)
    return (pair_losses * weights).sum(), weights.sum()


class CalibratedPairwiseLogistic(nn.Module):
    """Module wrapper of `calibrated_pairwise_logistic`: (C,), (C,), (R,) -> scalar."""

    def forward(self, logits: Tensor, targets: Tensor, lengths: Tensor) -> Tensor:
        return calibrated_pairwise_logistic(logits, targets, lengths)


def catalogue_softmax_losses(
    users: Tensor, positives: Tensor, catalogue: Tensor, temperature: Tensor
) -> Tensor:
    """Compute the per-prediction softmax cross-entropy of the positive against the catalogue.

    The logits of prediction p are [<u_p, c_p>, <u_p, n_1>, ..., <u_p, n_M>] * temperature with
    the positive in front, and the loss is -log_softmax of the positive. The catalogue is not
    filtered, so it also contains the positive item: K = M + 1 logits per prediction, the
    positive counted twice in the denominator.

    Args:
        users: (P, D) normalized user vectors u.
        positives: (P, D) normalized vectors c of the items that happened.
        catalogue: (M, D) normalized vectors n of every candidate item.
        temperature: scalar or (1,) multiplier of the cosine logits.

    Returns:
        (P,) losses. Memory is O(P * M) for the logits.
    """
    positive_logits = (users * positives).sum(dim=-1, keepdim=True)
    catalogue_logits = users @ catalogue.T
    logits = torch.cat([positive_logits, catalogue_logits], dim=1) * temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]
