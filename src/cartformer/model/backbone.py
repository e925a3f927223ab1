"""Causal transformer over a shopper's history of positive events, shared by pretrain and finetune."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cartformer.config import ModelConfig
from cartformer.model.layers import ContextEncoder, FeedbackEncoder, ItemEncoder
from cartformer.model.ops import lengths_to_mask


@dataclass
class BackboneOutput:
    """Per-event outputs of the backbone, in the unpadded (N,) layout of the history."""

    states: Tensor
    """(N, D) transformer output h_t: the user state after event t."""
    item_embeddings: Tensor
    """(N, D) item encoder output i_t of the event's product."""
    context_embeddings: Tensor
    """(N, D) context encoder output c_t of the event's surface."""


class Backbone(nn.Module):
    """Encode events as tokens and run a causal transformer over each history.

    A token is i_t + c_t + f_t + p_t: item, context, feedback and absolute position embeddings.
    The tokens of all sequences are padded to (B, L, D) and pass through `nn.TransformerEncoder`
    with a causal mask and a key-padding mask, so the state of event t depends only on events
    0..t of the same sequence.

    Args:
        config: sizes. `num_products`, `num_sources` and `num_actions` include index 0.
        item_encoder, context_encoder, feedback_encoder: replacements for the default embedding
            encoders, following the contract in `cartformer.model.layers`.
    """

    def __init__(
        self,
        config: ModelConfig,
        item_encoder: nn.Module | None = None,
        context_encoder: nn.Module | None = None,
        feedback_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dim = config.embedding_dim
        if dim % config.num_heads != 0:
            raise ValueError(
                f"ModelConfig.embedding_dim={dim} is not divisible by num_heads={config.num_heads}"
            )
        self.config = config
        self.item_encoder = item_encoder if item_encoder is not None else ItemEncoder(config)
        self.context_encoder = (
            context_encoder if context_encoder is not None else ContextEncoder(config)
        )
        self.feedback_encoder = (
            feedback_encoder if feedback_encoder is not None else FeedbackEncoder(config)
        )
        self.position_embeddings = nn.Embedding(config.max_seq_len, dim)

        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=config.num_heads,
            dim_feedforward=4 * dim,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
        )
        # In torch 2.13 the nested-tensor path is skipped whenever a mask is given, as the causal
        # mask always is here, and disabling it also silences the constructor warning. Eval mode
        # under no_grad still takes the fused layer kernel, which a test compares with train mode.
        self.transformer = nn.TransformerEncoder(
            layer, config.num_layers, enable_nested_tensor=False
        )

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def encode_items(self, product_indices: Tensor) -> Tensor:
        """Embed products with the history's item encoder: (M,) int64 -> (M, D)."""
        return self.item_encoder({"product": product_indices})

    def forward(self, history: Mapping[str, Tensor]) -> BackboneOutput:
        """Run the transformer over a batch of histories.

        Args:
            history: unpadded features `product`, `source`, `action`, `position` of shape (N,)
                and `lengths` of shape (B,), every length in 1..max_seq_len.

        Returns:
            BackboneOutput with (N, D) states, item and context embeddings.
        """
        lengths = history["lengths"]
        max_len = self._check_lengths(lengths, history["product"].shape[0])

        item_embeddings = self.item_encoder(history)
        context_embeddings = self.context_encoder(history)
        feedback_embeddings = self.feedback_encoder(history)
        position_embeddings = self.position_embeddings(history["position"])
        tokens = item_embeddings + context_embeddings + feedback_embeddings + position_embeddings

        valid = lengths_to_mask(lengths, max_len)
        padded = tokens.new_zeros(*valid.shape, tokens.shape[-1])
        padded[valid] = tokens
        causal_mask = torch.triu(
            torch.ones(max_len, max_len, dtype=torch.bool, device=tokens.device), diagonal=1
        )
        # Every query row keeps key 0 of its own sequence, so no row is fully masked and padded
        # rows stay finite. The padded rows are dropped below.
        encoded = self.transformer(padded, mask=causal_mask, src_key_padding_mask=~valid)
        return BackboneOutput(
            states=encoded[valid],
            item_embeddings=item_embeddings,
            context_embeddings=context_embeddings,
        )

    def _check_lengths(self, lengths: Tensor, num_events: int) -> int:
        if lengths.numel() == 0:
            raise ValueError("history.lengths is empty, but a batch needs at least one sequence")
        shortest, longest, total = (
            int(v) for v in torch.stack([lengths.min(), lengths.max(), lengths.sum()]).tolist()
        )
        if shortest < 1:
            raise ValueError(
                "history.lengths contains 0. Drop samples with an empty history before batching"
            )
        if longest > self.config.max_seq_len:
            raise ValueError(
                f"history.lengths has a sequence of {longest} events, more than "
                f"ModelConfig.max_seq_len={self.config.max_seq_len}. Truncate the history or "
                "raise max_seq_len"
            )
        if total != num_events:
            raise ValueError(
                f"history.lengths sums to {total} but history.product has {num_events} events"
            )
        return longest
