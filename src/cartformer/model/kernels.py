"""Memory-bounded kernels for the catalogue softmax.

A softmax over a whole catalogue needs the log-sum-exp of a (P, M) logit matrix: P predicted
events against M products. Built from plain autograd ops, that matrix and several temporaries
of the same size are stored for the backward pass (about 0.4 GB each for 4,000 events against
26,500 products), and every elementwise pass streams them through memory. `matmul_logsumexp`
instead walks over blocks of rows and keeps only the (P,) result. The backward pass
recomputes each block's logits and finishes the block's softmax, gradient and matmuls while
the block is still in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_BLOCK_ROWS = 128
"""Rows per block: 128 rows of 26,500 float32 logits take 13 MiB, less than the 32 MiB L3
cache of the machine in docs/benchmarks.md."""


def matmul_logsumexp(
    queries: Tensor, keys: Tensor, bias: Tensor | None = None, block_rows: int = DEFAULT_BLOCK_ROWS
) -> Tensor:
    """Compute logsumexp_j(<queries_p, keys_j> + bias_j) for every row p without storing the
    (P, M) logits.

    Args:
        queries: (P, D) float rows q_p, for example temperature-scaled user vectors.
        keys: (M, D) float keys k_j, for example normalized catalogue vectors.
        bias: optional (M,) float offset per key, for example -log q_j of a sampling
            correction; None adds nothing.
        block_rows: rows of queries per block; memory beyond the inputs is O(block_rows * M).

    Returns:
        (P,) log-sum-exp of each row, differentiable with respect to queries, keys and bias.
        Equal to `torch.logsumexp(queries @ keys.T + bias, dim=1)` up to float rounding.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must be (P, D) and (M, D), got {tuple(queries.shape)} and "
            f"{tuple(keys.shape)}"
        )
    if keys.shape[0] == 0:
        raise ValueError("keys is empty; the softmax needs at least one key")
    if bias is None:
        bias = keys.new_zeros(keys.shape[0])
    if bias.shape != (keys.shape[0],):
        raise ValueError(f"bias must have shape ({keys.shape[0]},), got {tuple(bias.shape)}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    return _MatmulLogSumExp.apply(queries, keys, bias, block_rows)


class _MatmulLogSumExp(torch.autograd.Function):
    """Blockwise forward and recomputing backward of `matmul_logsumexp`.

    With s_pj = softmax_j(<q_p, k_j> + b_j) and g_p the incoming gradient of row p:
    dq_p = sum_j g_p s_pj k_j, dk_j = sum_p g_p s_pj q_p, db_j = sum_p g_p s_pj.
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, bias: Tensor, block_rows: int) -> Tensor:  # type: ignore[override]
        result = queries.new_empty(queries.shape[0])
        for start in range(0, queries.shape[0], block_rows):
            block = torch.addmm(bias, queries[start : start + block_rows], keys.T)
            result[start : start + block_rows] = torch.logsumexp(block, dim=1)
        ctx.save_for_backward(queries, keys, bias, result)
        ctx.block_rows = block_rows
        return result

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        queries, keys, bias, result = ctx.saved_tensors
        block_rows = ctx.block_rows
        needs_queries, needs_keys, needs_bias = ctx.needs_input_grad[:3]
        # One extra column folds the row's -logsumexp into the block's matmul:
        # [q_p, -lse_p] . [k_j, 1] + b_j = <q_p, k_j> + b_j - lse_p, so exp of the block is the
        # softmax with a single elementwise pass.
        shifted_queries = torch.cat([queries, -result[:, None]], dim=1)
        shifted_keys = torch.cat([keys, keys.new_ones(keys.shape[0], 1)], dim=1)
        weighted_queries = queries * grad[:, None]
        grad_queries = torch.empty_like(queries) if needs_queries else None
        grad_keys = torch.zeros_like(keys) if needs_keys else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        for start in range(0, queries.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            softmax = torch.addmm(bias, shifted_queries[rows], shifted_keys.T).exp_()
            # The row weights g_p multiply the (rows, D) results, not the (rows, M) block.
            if grad_queries is not None:
                torch.mm(softmax, keys, out=grad_queries[rows])
                grad_queries[rows] *= grad[rows, None]
            if grad_keys is not None:
                grad_keys.addmm_(softmax.T, weighted_queries[rows])
            if grad_bias is not None:
                grad_bias.addmv_(softmax.T, grad[rows])
        return grad_queries, grad_keys, grad_bias, None
