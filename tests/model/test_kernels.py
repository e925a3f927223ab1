import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cartformer.model.kernels import matmul_logsumexp


def random_inputs(rows: int, keys: int, dim: int, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(rows, dim, generator=generator, dtype=dtype) * 3
    key_matrix = torch.randn(keys, dim, generator=generator, dtype=dtype)
    bias = torch.randn(keys, generator=generator, dtype=dtype)
    return (
        queries.requires_grad_(),
        key_matrix.requires_grad_(),
        bias.requires_grad_(),
    )


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    keys=st.integers(1, 30),
    dim=st.integers(1, 8),
    block_rows=st.integers(1, 50),
    seed=st.integers(0, 10_000),
)
def test_matches_plain_logsumexp(rows, keys, dim, block_rows, seed):
    queries, key_matrix, bias = random_inputs(rows, keys, dim, seed)
    ours = matmul_logsumexp(queries, key_matrix, bias, block_rows=block_rows)
    plain = torch.logsumexp(queries @ key_matrix.T + bias, dim=1)
    assert torch.allclose(ours, plain, atol=1e-10)

    weights = torch.randn(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ours_grads = torch.autograd.grad((ours * weights).sum(), (queries, key_matrix, bias))
    plain_grads = torch.autograd.grad((plain * weights).sum(), (queries, key_matrix, bias))
    for ours_grad, plain_grad in zip(ours_grads, plain_grads, strict=True):
        assert torch.allclose(ours_grad, plain_grad, atol=1e-9)


def test_gradcheck():
    queries, key_matrix, bias = random_inputs(7, 5, 3, seed=1)
    assert torch.autograd.gradcheck(
        lambda q, k, b: matmul_logsumexp(q, k, b, block_rows=3), (queries, key_matrix, bias)
    )


def test_without_bias_float32():
    queries, key_matrix, _ = random_inputs(300, 200, 16, seed=2, dtype=torch.float32)
    ours = matmul_logsumexp(queries, key_matrix)
    assert torch.allclose(ours, torch.logsumexp(queries @ key_matrix.T, dim=1), atol=1e-4)


def test_large_logits_stay_finite():
    queries = torch.full((2, 1), 1000.0)
    key_matrix = torch.tensor([[1.0], [0.5]])
    result = matmul_logsumexp(queries, key_matrix)
    assert torch.isfinite(result).all()


def test_rejects_mismatched_width():
    with pytest.raises(ValueError, match="must be"):
        matmul_logsumexp(torch.zeros(2, 3), torch.zeros(4, 5))


def test_rejects_empty_keys():
    with pytest.raises(ValueError, match="empty"):
        matmul_logsumexp(torch.zeros(2, 3), torch.zeros(0, 3))
