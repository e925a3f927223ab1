"""Training losses: calibrated pairwise logistic for finetune, full or sampled catalogue softmax
for pretrain."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cartformer.model.kernels import matmul_logsumexp
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
        (P,) losses. The (P, M) logits are never stored: `matmul_logsumexp` walks over blocks
        of rows, so memory beyond the inputs is O(block rows * M).
    """
    scaled_users = users * temperature
    positive_logits = (scaled_users * positives).sum(dim=-1)
    catalogue_logsumexp = matmul_logsumexp(scaled_users, catalogue)
    return torch.logaddexp(catalogue_logsumexp, positive_logits) - positive_logits


def sample_candidates(
    positives: Tensor,
    num_products: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Build the candidate set of one sampled-softmax step.

    The candidates are the unique products among the positives (in-batch negatives) and
    `num_negatives` products drawn uniformly with replacement from 1..num_products-1. Index 0,
    the reserved unknown product, is never drawn. Every product gets exactly one column, so a
    product that is the positive of several predictions is never a negative of any of them.

    Args:
        positives: (P,) int64 product indices of the events to predict, each in
            1..num_products-1.
        num_products: catalogue size including the reserved index 0, at least 2.
        num_negatives: uniform draws N, at least 0.
        generator: source of the uniform draws, on the device of `positives`. None uses
            torch's global generator of that device, which `torch.manual_seed` seeds.

    Returns:
        `candidates`, (K,) sorted unique int64 product indices with K <= P + N, and
        `positive_columns`, (P,) int64 column of each prediction's positive in `candidates`.
    """
    if num_products < 2:
        raise ValueError(f"num_products is {num_products}, but the catalogue needs at least 2")
    if num_negatives < 0:
        raise ValueError(f"num_negatives is {num_negatives}, but it must be 0 or more")
    if bool(((positives < 1) | (positives >= num_products)).any()):
        raise ValueError(
            f"a positive product index is outside 1..{num_products - 1}, the catalogue of the "
            "sampled softmax. Index 0 is the reserved unknown product, which prepared data never "
            "contains as a target. Set ModelConfig.num_products from the prepared meta.json"
        )
    negatives = torch.randint(
        1, num_products, (num_negatives,), generator=generator, device=positives.device
    )
    candidates, columns = torch.unique(
        torch.cat([positives, negatives]), sorted=True, return_inverse=True
    )
    return candidates, columns[: positives.shape[0]]


def log_expected_counts(
    candidates: Tensor, target_counts: Tensor, num_predictions: int, num_negatives: int
) -> Tensor:
    """Return the logQ correction of each candidate: the log of its expected count in a step.

    The candidates of a step are P in-batch positives, which follow the distribution of the
    training targets, plus N uniform draws over the M = len(target_counts) - 1 products. The
    expected count of product j among these P + N draws is

        Q_j = P * q_j + N / M,    q_j = max(c_j, 1) / max(sum_{k=1..M} c_k, 1),

    with c_j = target_counts[j]. A product that appears in a batch was a target at least once,
    so its count is taken as at least 1, which keeps log Q_j finite. The floor also applies to
    products that only the uniform draws bring, adding at most P / sum c_k to their Q_j. The mix of batch and
    uniform negatives is the mixed negative sampling of Yang et al. 2020 ("Mixed Negative
    Sampling for Learning Two-tower Neural Networks in Recommendations", WWW '20 Companion),
    and subtracting log Q_j from the logits is the sampling-bias correction of Yi et al. 2019
    ("Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations", RecSys
    '19). Q_j / (P + N) is the probability that one draw is j, and the constant log(P + N)
    cancels in the softmax. With all counts 0, q_j = 1 for every product, so Q_j is the same
    for every candidate and the correction changes no loss.

    Args:
        candidates: (K,) int64 product indices in 1..M.
        target_counts: (M + 1,) counts of each product among the training targets, index 0
            included and ignored.
        num_predictions: P, the predictions of the step.
        num_negatives: N, the uniform draws of the step.

    Returns:
        (K,) float32 log Q_j.
    """
    total = target_counts[1:].sum().clamp(min=1).to(torch.float64)
    in_batch = num_predictions * target_counts[candidates].clamp(min=1).to(torch.float64) / total
    uniform = num_negatives / (target_counts.shape[0] - 1)
    return torch.log(in_batch + uniform).to(torch.float32)


def sampled_softmax_losses(
    users: Tensor,
    candidates: Tensor,
    positive_columns: Tensor,
    temperature: Tensor,
    log_q: Tensor | None = None,
) -> Tensor:
    """Compute the per-prediction softmax cross-entropy over a sampled candidate set.

    The logit of prediction p for candidate k is s_pk = <u_p, v_k> * temperature - log Q_k,
    or without the correction term when `log_q` is None, and the loss is
    logsumexp_k(s_pk) - s_p,positive_columns[p]. The positive appears once among the K logits,
    unlike `catalogue_softmax_losses`, which puts it in front of the catalogue and so counts
    it twice. With every catalogue product as a candidate and no correction, the loss equals
    the cross-entropy of the M catalogue logits at the positive's column.

    Args:
        users: (P, D) normalized user vectors u.
        candidates: (K, D) normalized vectors v of the unique candidate products.
        positive_columns: (P,) int64 column in `candidates` of each prediction's positive.
        temperature: scalar or (1,) multiplier of the cosine logits.
        log_q: (K,) logQ correction subtracted from every logit of a candidate, for example
            `log_expected_counts`, or None for no correction.

    Returns:
        (P,) losses. As in `catalogue_softmax_losses`, the (P, K) logits are never stored.
    """
    # The temperature scales the (P, D) users, the correction is the bias of each block's
    # addmm and the positive logits come from (P, D) rows, so no extra pass runs over logits.
    scaled_users = users * temperature
    positive_logits = (scaled_users * candidates[positive_columns]).sum(dim=-1)
    bias = None
    if log_q is not None:
        bias = -log_q.to(scaled_users.dtype)
        positive_logits = positive_logits + bias[positive_columns]
    return matmul_logsumexp(scaled_users, candidates, bias) - positive_logits
