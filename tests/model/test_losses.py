import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cartformer.model.losses import (
    CalibratedPairwiseLogistic,
    calibrated_pairwise_logistic,
    catalogue_softmax_losses,
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
