import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st

from cartformer.model.losses import (
    CalibratedPairwiseLogistic,
    calibrated_pairwise_logistic,
    catalogue_softmax_losses,
    log_expected_counts,
    sample_candidates,
    sampled_softmax_losses,
)


def brute_force_cpl(logits: list[float], targets: list[int], lengths: list[int]) -> float:
    """Plain double loop over the pairs of each request, for reference."""
    total, count, start = 0.0, 0, 0
    for length in lengths:
        for i in range(start, start + length):
            for j in range(start, start + length):
                if targets[i] > targets[j]:
                    sigma_i = 1.0 / (1.0 + math.exp(-logits[i]))
                    sigma_j = 1.0 / (1.0 + math.exp(-logits[j]))
                    total += -math.log(sigma_i / (sigma_i + sigma_j))
                    count += 1
        start += length
    return total / count if count else 0.0


@st.composite
def requests(draw):
    lengths = draw(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=5))
    size = sum(lengths)
    logits = draw(st.lists(st.floats(-8.0, 8.0), min_size=size, max_size=size))
    targets = draw(st.lists(st.integers(0, 2), min_size=size, max_size=size))
    return logits, targets, lengths


@settings(max_examples=60)
@given(requests())
def test_cpl_matches_brute_force(case):
    logits, targets, lengths = case
    loss = calibrated_pairwise_logistic(
        torch.tensor(logits, dtype=torch.float64),
        torch.tensor(targets),
        torch.tensor(lengths),
    )
    assert loss.shape == ()
    assert math.isclose(loss.item(), brute_force_cpl(logits, targets, lengths), abs_tol=1e-9)


@settings(max_examples=30)
@given(requests())
def test_cpl_gradients_finite(case):
    logits, targets, lengths = case
    logits_tensor = torch.tensor(logits, requires_grad=True)
    calibrated_pairwise_logistic(
        logits_tensor, torch.tensor(targets), torch.tensor(lengths)
    ).backward()
    assert bool(torch.isfinite(logits_tensor.grad).all())


def test_cpl_zero_without_pairs():
    logits = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    loss = calibrated_pairwise_logistic(logits, torch.tensor([1, 1, 0]), torch.tensor([2, 1]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros(3))


def test_cpl_stable_at_extreme_logits():
    logits = torch.tensor([-200.0, 200.0], requires_grad=True)
    loss = calibrated_pairwise_logistic(logits, torch.tensor([1, 0]), torch.tensor([2]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert bool(torch.isfinite(logits.grad).all())


def test_cpl_module_matches_function():
    logits = torch.randn(6)
    targets = torch.tensor([1, 0, 0, 0, 1, 0])
    lengths = torch.tensor([3, 3])
    expected = calibrated_pairwise_logistic(logits, targets, lengths)
    assert torch.equal(CalibratedPairwiseLogistic()(logits, targets, lengths), expected)


def test_catalogue_softmax_matches_formula():
    torch.manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    positives = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    catalogue = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    temperature = torch.tensor([2.0])

    losses = catalogue_softmax_losses(users, positives, catalogue, temperature)

    positive = (users * positives).sum(-1) * 2.0
    negatives = users @ catalogue.T * 2.0
    expected = -positive + torch.log(positive.exp() + negatives.exp().sum(-1))
    assert losses.shape == (4,)
    assert torch.allclose(losses, expected, atol=1e-6)


def unit_rows(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)


def plain_sampled_softmax(users, candidates, columns, temperature, log_q=None) -> torch.Tensor:
    """Plain per-row loop over the predictions, for reference."""
    losses = []
    for row in range(users.shape[0]):
        logits = [
            float(users[row] @ candidates[k]) * temperature - (0.0 if log_q is None else log_q[k])
            for k in range(candidates.shape[0])
        ]
        positive = logits[int(columns[row])]
        losses.append(math.log(sum(math.exp(value) for value in logits)) - positive)
    return torch.tensor(losses, dtype=torch.float64)


def test_sampled_matches_plain_reference():
    users, candidates = unit_rows(5), unit_rows(7, seed=1)
    columns = torch.tensor([0, 3, 3, 6, 1])
    log_q = torch.linspace(-2.0, 1.0, 7, dtype=torch.float64)
    temperature = torch.tensor([3.0], dtype=torch.float64)
    plain = sampled_softmax_losses(users, candidates, columns, temperature)
    corrected = sampled_softmax_losses(users, candidates, columns, temperature, log_q)
    assert plain.shape == (5,)
    assert torch.allclose(plain, plain_sampled_softmax(users, candidates, columns, 3.0))
    assert torch.allclose(
        corrected, plain_sampled_softmax(users, candidates, columns, 3.0, log_q.tolist())
    )


def test_sampled_full_catalogue_drops_duplicate_positive():
    """With every catalogue product as a candidate and no logQ, the sampled loss is the
    cross-entropy of the M catalogue logits at the positive's column. The catalogue softmax adds
    the positive logit s in front, so it is that loss plus log(1 + exp(s) / S), with S the sum
    of the M exponentials. That sum is sampled + log1p(exp(-sampled))."""
    users, catalogue = unit_rows(6), unit_rows(9, seed=1)
    positives = torch.tensor([1, 4, 4, 9, 2, 7])  # product indices, in column index - 1
    columns = positives - 1
    temperature = torch.tensor([2.5], dtype=torch.float64)

    sampled = sampled_softmax_losses(users, catalogue, columns, temperature)
    full = catalogue_softmax_losses(users, catalogue[columns], catalogue, temperature)

    cross_entropy = F.cross_entropy(users @ catalogue.T * 2.5, columns, reduction="none")
    assert torch.allclose(sampled, cross_entropy)
    assert torch.allclose(full, sampled + torch.log1p(torch.exp(-sampled)))


def test_sampled_constant_log_q_changes_nothing():
    users, candidates = unit_rows(4), unit_rows(6, seed=1)
    columns = torch.tensor([5, 0, 2, 2])
    temperature = torch.tensor([4.0], dtype=torch.float64)
    constant = torch.full((6,), 3.7, dtype=torch.float64)
    assert torch.allclose(
        sampled_softmax_losses(users, candidates, columns, temperature, constant),
        sampled_softmax_losses(users, candidates, columns, temperature),
    )


def test_sampled_log_q_shifts_logits():
    """Subtracting log_q equals scoring each candidate k with logit - log_q[k]."""
    users, candidates = unit_rows(3), unit_rows(4, seed=1)
    columns = torch.tensor([0, 1, 3])
    log_q = torch.tensor([0.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    temperature = torch.tensor([2.0], dtype=torch.float64)
    shifted = users @ candidates.T * 2.0 - log_q
    expected = torch.logsumexp(shifted, dim=1) - shifted[torch.arange(3), columns]
    losses = sampled_softmax_losses(users, candidates, columns, temperature, log_q)
    assert torch.allclose(losses, expected)
    # A larger correction of a negative lowers its logit and so the loss.
    lowered = sampled_softmax_losses(
        users, candidates, columns, temperature, log_q + 5 * (torch.arange(4) == 2)
    )
    assert bool((lowered < losses).all())


def test_sampled_gradients_flow():
    users = unit_rows(5).requires_grad_()
    candidates = unit_rows(8, seed=1).requires_grad_()
    temperature = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    log_q = torch.zeros(8, dtype=torch.float64)
    columns = torch.tensor([0, 1, 1, 4, 7])
    sampled_softmax_losses(users, candidates, columns, temperature, log_q).sum().backward()
    for tensor in (users, candidates, temperature):
        assert tensor.grad is not None
        assert bool(torch.isfinite(tensor.grad).all())
        assert bool((tensor.grad != 0).any())


def test_candidates_dedupe_positives():
    positives = torch.tensor([3, 5, 3, 3])
    candidates, columns = sample_candidates(positives, num_products=10, num_negatives=0)
    assert candidates.tolist() == [3, 5]
    assert columns.tolist() == [0, 1, 0, 0]


def test_candidates_duplicate_positive_not_negative():
    """Three predictions of product 3 and one of 5: each row has exactly one column per
    product, so row 0's loss is the two-way softmax over products 3 and 5."""
    positives = torch.tensor([3, 5, 3, 3])
    candidates, columns = sample_candidates(positives, num_products=10, num_negatives=0)
    users, vectors = unit_rows(4), unit_rows(2, seed=1)
    losses = sampled_softmax_losses(users, vectors, columns, torch.tensor([1.0]))
    logits = users[0] @ vectors.T
    assert candidates.numel() == 2
    assert math.isclose(losses[0].item(), -torch.log_softmax(logits, 0)[0].item(), rel_tol=1e-12)


def test_candidates_contain_positives_and_draws():
    generator = torch.Generator().manual_seed(0)
    positives = torch.tensor([7, 2, 7])
    candidates, columns = sample_candidates(positives, 50, 20, generator=generator)
    assert torch.equal(candidates[columns], positives)
    assert torch.equal(candidates, torch.unique(candidates))
    assert candidates.numel() <= 3 + 20
    assert candidates.numel() > 2


def test_candidates_never_draw_unknown():
    generator = torch.Generator().manual_seed(0)
    candidates, _ = sample_candidates(torch.tensor([1]), 4, 1000, generator=generator)
    assert candidates.tolist() == [1, 2, 3]


def test_candidates_reproducible_with_seed():
    positives = torch.tensor([4, 9])
    first, _ = sample_candidates(positives, 1000, 30, torch.Generator().manual_seed(5))
    second, _ = sample_candidates(positives, 1000, 30, torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    global_first, _ = sample_candidates(positives, 1000, 30)
    torch.manual_seed(5)
    global_second, _ = sample_candidates(positives, 1000, 30)
    assert torch.equal(first, second)
    assert torch.equal(global_first, global_second)


def test_candidates_reject_unknown_positive():
    with pytest.raises(ValueError, match="reserved unknown"):
        sample_candidates(torch.tensor([2, 0]), 10, 4)


def test_candidates_reject_negative_count():
    with pytest.raises(ValueError, match="num_negatives"):
        sample_candidates(torch.tensor([2]), 10, -1)


def test_log_expected_counts_formula():
    counts = torch.tensor([100, 6, 0, 3, 1])  # index 0 is ignored, so M = 4 and total 10
    candidates = torch.tensor([1, 2, 3])
    log_q = log_expected_counts(candidates, counts, num_predictions=8, num_negatives=20)
    uniform = 20 / 4
    expected = [
        math.log(8 * 6 / 10 + uniform),
        math.log(8 * 1 / 10 + uniform),  # count 0 is taken as 1
        math.log(8 * 3 / 10 + uniform),
    ]
    assert log_q.shape == (3,)
    assert log_q.dtype == torch.float32
    assert torch.allclose(log_q, torch.tensor(expected))


def test_log_expected_counts_without_counts_is_constant():
    log_q = log_expected_counts(torch.tensor([1, 3, 4]), torch.zeros(5, dtype=torch.int64), 8, 2)
    assert torch.allclose(log_q, torch.full((3,), math.log(8 + 2 / 4)))


def test_log_expected_counts_finite_without_negatives():
    counts = torch.tensor([0, 5, 0, 0])
    log_q = log_expected_counts(torch.tensor([1, 2]), counts, num_predictions=3, num_negatives=0)
    assert bool(torch.isfinite(log_q).all())
    assert torch.allclose(log_q, torch.tensor([math.log(3.0), math.log(3 / 5)]))
