"""Causal transformer over a shopper's history of positive events, shared by pretrain and finetune."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cartformer.config import ModelConfig
from cartformer.model.features import log_time_buckets, time_gap_buckets
from cartformer.model.layers import (
    TIME_GAP,
    ContextEncoder,
    FeedbackEncoder,
    ItemEncoder,
    SideContextEncoder,
    TextItemEncoder,
)
from cartformer.model.ops import make_groups, sequence_offsets

TextBags = Mapping[str, tuple[np.ndarray | Tensor, np.ndarray | Tensor]]
"""Text field -> ((T,) token ids, (num_products + 1,) offsets), one bag per product index."""


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
    The tokens pass through post-norm transformer layers with causal self-attention, so the
    state of event t depends only on events 0..t of the same sequence. Everything except the
    attention itself (projections, feed-forward, norms) runs on the N real tokens; only the
    attention's queries, keys and values are padded to (B, L), with L the longest sequence of
    the batch, so batches of similar lengths waste little work.

    Side features: with `config.use_text` the item encoder is a `TextItemEncoder` over
    `text_bags`, and with `use_categorical` or `use_time` the context encoder is a
    `SideContextEncoder`. The backbone computes the history's gap buckets (`time_gap_buckets`)
    and a request's gap to its scoring state (`encode_request_context`) itself.

    Args:
        config: sizes. `num_products`, `num_sources` and `num_actions` include index 0.
        item_encoder, context_encoder, feedback_encoder: replacements for the default embedding
            encoders, following the contract in `cartformer.model.layers`.
        text_bags: the product token bags that `config.use_text` needs, see `TextBags`.
    """

    def __init__(
        self,
        config: ModelConfig,
        item_encoder: nn.Module | None = None,
        context_encoder: nn.Module | None = None,
        feedback_encoder: nn.Module | None = None,
        text_bags: TextBags | None = None,
    ) -> None:
        super().__init__()
        dim = config.embedding_dim
        if dim % config.num_heads != 0:
            raise ValueError(
                f"ModelConfig.embedding_dim={dim} is not divisible by num_heads={config.num_heads}"
            )
        self.config = config
        self.item_encoder = (
            item_encoder if item_encoder is not None else _default_item_encoder(config, text_bags)
        )
        if context_encoder is None:
            use_side_context = config.use_categorical or config.use_time
            context_encoder = (
                SideContextEncoder(config) if use_side_context else ContextEncoder(config)
            )
        self.context_encoder = context_encoder
        self.feedback_encoder = (
            feedback_encoder if feedback_encoder is not None else FeedbackEncoder(config)
        )
        self.position_embeddings = nn.Embedding(config.max_seq_len, dim)

        attention_dropout = (
            config.dropout if config.attention_dropout is None else config.attention_dropout
        )
        self.layers = nn.ModuleList(
            CausalEncoderLayer(dim, config.num_heads, config.dropout, attention_dropout)
            for _ in range(config.num_layers)
        )

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def encode_items(self, product_indices: Tensor) -> Tensor:
        """Embed products with the history's item encoder: (M,) int64 -> (M, D)."""
        return self.item_encoder({"product": product_indices})

    def encode_request_context(
        self,
        history: Mapping[str, Tensor],
        requests: Mapping[str, Tensor],
        state_positions: Tensor,
    ) -> Tensor:
        """Embed the context of R requests: (R, D).

        Args:
            history: the batch's history; with `use_time` its `timestamp` (N,) is read.
            requests: `source` (R,), plus `city`, `store` and `timestamp` (R,) as the side
                features of the config need them.
            state_positions: (R,) global history position of each request's scoring state.
                With `use_time` the request's gap feature is the time from that state's event
                to the request, as the gap of an event is the time from the previous event.
        """
        features = requests
        if self.config.use_time:
            gap = requests["timestamp"] - history["timestamp"][state_positions]
            buckets = log_time_buckets(gap, self.config.num_gap_buckets)
            features = {**requests, TIME_GAP: buckets}
        return self.context_encoder(features)

    def forward(self, history: Mapping[str, Tensor]) -> BackboneOutput:
        """Run the transformer over a batch of histories.

        Args:
            history: unpadded features `product`, `source`, `action`, `position` of shape (N,)
                and `lengths` of shape (B,), every length in 1..max_seq_len, plus the side
                features of the config (`city`, `store`, `timestamp` (N,)).

        Returns:
            BackboneOutput with (N, D) states, item and context embeddings.
        """
        lengths = history["lengths"]
        max_len = self._check_lengths(lengths, history["product"].shape[0])

        item_embeddings = self.item_encoder(history)
        context_features = history
        if self.config.use_time:
            buckets = time_gap_buckets(history["timestamp"], lengths, self.config.num_gap_buckets)
            context_features = {**history, TIME_GAP: buckets}
        context_embeddings = self.context_encoder(context_features)
        feedback_embeddings = self.feedback_encoder(history)
        position_embeddings = self.position_embeddings(history["position"])
        tokens = item_embeddings + context_embeddings + feedback_embeddings + position_embeddings

        batch = lengths.shape[0]
        slots = padded_slots(lengths, max_len)
        encoded = tokens
        for layer in self.layers:
            encoded = layer(encoded, slots, batch, max_len)
        return BackboneOutput(
            states=encoded,
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


class CausalEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with causal attention over unpadded tokens.

    It computes what `nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout, "gelu",
    batch_first=True)` computes on right-padded sequences with a causal and key-padding mask,
    with the same parameter shapes (a test copies the weights across and compares outputs):

        x = norm1(x + dropout(out_proj(attention(in_proj(x)))))
        x = norm2(x + dropout(linear2(dropout(gelu(linear1(x))))))

    The input stays in the unpadded (N, D) layout. Only the attention pads its queries, keys
    and values to (B, L) and runs `scaled_dot_product_attention` with `is_causal=True`: with
    right padding, the keys a real query may see (0..t) are all real, so no key-padding mask is
    needed and PyTorch can pick its fused causal kernel. Padded query rows are dropped.

    `attention_dropout` is the dropout on attention weights, which the torch layer ties to
    `dropout`.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout_attention_output = nn.Dropout(dropout)
        self.dropout_hidden = nn.Dropout(dropout)
        self.dropout_feedforward_output = nn.Dropout(dropout)

    def forward(self, x: Tensor, slots: Tensor, batch: int, max_len: int) -> Tensor:
        """Transform the tokens of a batch of sequences.

        Args:
            x: (N, D) tokens, sequences concatenated in order.
            slots: (N,) int64 index of every token in the flattened (B * L) padded layout, as
                `padded_slots` returns.
            batch, max_len: B and L of the padded layout.

        Returns:
            (N, D) transformed tokens.
        """
        num_tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = x.new_zeros(batch * max_len, 3 * dim).index_copy(0, slots, self.in_proj(x))
        qkv = qkv.view(batch, max_len, 3, self.num_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            is_causal=True,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(batch * max_len, dim).index_select(0, slots)
        x = self.norm1(x + self.dropout_attention_output(self.out_proj(attended)))
        hidden = self.dropout_hidden(F.gelu(self.linear1(x)))
        return self.norm2(x + self.dropout_feedforward_output(self.linear2(hidden)))


def _default_item_encoder(config: ModelConfig, text_bags: TextBags | None) -> nn.Module:
    if not config.use_text:
        return ItemEncoder(config)
    if text_bags is None:
        raise ValueError(
            "ModelConfig.use_text is on but no text_bags were given. Load them with "
            "cartformer.data.side_features.load_product_text(prepared_dir)"
        )
    return TextItemEncoder(config, text_bags)


def padded_slots(lengths: Tensor, max_len: int) -> Tensor:
    """Return the (N,) index of every token in the flattened (B * L) right-padded layout.

    Example: lengths [2, 3], max_len 3 -> [0, 1, 3, 4, 5].
    """
    groups = make_groups(lengths)
    local = torch.arange(groups.shape[0], device=lengths.device) - sequence_offsets(lengths)[groups]
    return groups * max_len + local


def head_config(backbone: Backbone, config: ModelConfig | None) -> ModelConfig:
    """Return the config of a head built on ``backbone``: ``config``, or the backbone's own when
    None, after checking that both have the same width."""
    config = config if config is not None else backbone.config
    if config.embedding_dim != backbone.embedding_dim:
        raise ValueError(
            f"ModelConfig.embedding_dim={config.embedding_dim} differs from the backbone's "
            f"{backbone.embedding_dim}. Build both from the same config"
        )
    return config
