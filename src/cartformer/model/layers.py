"""Building blocks of the heads and the feature encoders of the backbone.

Encoders share one contract: `encoder(features)` takes a mapping from feature name to an (N,)
int64 tensor and returns (N, D) embeddings. The backbone passes `batch["history"]` to all three
encoders, the finetune head passes `batch["requests"]` to the context encoder, and
`Backbone.encode_items` passes `{"product": indices}` to the item encoder.

Extension point: a new encoder only needs that contract, and `Backbone` accepts replacements
through its `item_encoder`, `context_encoder` and `feedback_encoder` arguments.

- A new categorical input (city, store, hour of day) becomes one more entry of `vocab_sizes` of
  an `EmbeddingSumEncoder`, provided the dataset adds that column to every feature dict the
  encoder receives (for the context encoder: both `history` and `requests`).
- Inputs that depend only on the product (text bag of words, category) belong inside the item
  encoder as buffers indexed by the product index, so `encode_items` can still embed the whole
  catalogue from product indices alone.
- A DCN cross layer or an MLP that combines the inputs replaces the sum in a custom encoder.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cartformer.config import ModelConfig


class ResidualBlock(nn.Module):
    """Residual MLP block: y = LayerNorm(x + Dropout(ReLU(x W + b))), shape (..., dim) -> same."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(torch.relu(self.linear(x))))


def residual_mlp(dim: int, num_blocks: int = 3, out_dim: int | None = None) -> nn.Sequential:
    """Stack `num_blocks` ResidualBlocks on `dim`, then a Linear `dim -> out_dim` if given."""
    layers: list[nn.Module] = [ResidualBlock(dim) for _ in range(num_blocks)]
    if out_dim is not None:
        layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class EmbeddingSumEncoder(nn.Module):
    """Sum of one learned embedding table per named categorical feature.

    Args:
        vocab_sizes: feature name -> number of indices, index 0 (unknown value) included.
        dim: embedding size D.

    `forward(features)` reads `features[name]` of shape (N,) for every table and returns the
    (N, D) sum. Index 0 has an ordinary learned row, because it is the embedding of values that
    the mapping has not seen, not padding.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], dim: int) -> None:
        super().__init__()
        if not vocab_sizes:
            raise ValueError("vocab_sizes is empty, but an encoder needs at least one feature")
        for name, size in vocab_sizes.items():
            if size < 1:
                raise ValueError(
                    f"vocabulary size of feature {name!r} is {size}. Set it from the prepared "
                    "meta.json, where index 0 (the unknown value) counts as one"
                )
        self.dim = dim
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(size, dim) for name, size in vocab_sizes.items()}
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.tables.keys())

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        total: Tensor | None = None
        for name, table in self.tables.items():
            if name not in features:
                raise KeyError(
                    f"feature {name!r} is missing from the batch, which has {sorted(features)}. "
                    "Add it to the dataset sample or remove it from the encoder"
                )
            embedded = table(features[name])
            total = embedded if total is None else total + embedded
        assert total is not None
        return total


class ItemEncoder(EmbeddingSumEncoder):
    """Product encoder mapping features["product"] (N,) to (N, D), one row per product index."""

    def __init__(self, config: ModelConfig) -> None:
        _check_vocab("num_products", config.num_products)
        super().__init__({"product": config.num_products}, config.embedding_dim)


class ContextEncoder(EmbeddingSumEncoder):
    """Surface encoder mapping features["source"] (N,) to (N, D), one row per surface index."""

    def __init__(self, config: ModelConfig) -> None:
        _check_vocab("num_sources", config.num_sources)
        super().__init__({"source": config.num_sources}, config.embedding_dim)


class FeedbackEncoder(EmbeddingSumEncoder):
    """Action encoder mapping features["action"] (N,) to (N, D), one row per action code."""

    def __init__(self, config: ModelConfig) -> None:
        _check_vocab("num_actions", config.num_actions)
        super().__init__({"action": config.num_actions}, config.embedding_dim)


def _check_vocab(field_name: str, size: int) -> None:
    if size < 2:
        raise ValueError(
            f"ModelConfig.{field_name} is {size}. Set it from the vocabulary sizes in the prepared "
            "meta.json, which include the reserved index 0"
        )
