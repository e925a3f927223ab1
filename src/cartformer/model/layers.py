"""Building blocks of the heads and the feature encoders of the backbone.

Encoders share one contract: `encoder(features)` takes a mapping from feature name to an (N,)
int64 tensor and returns (N, D) embeddings. The backbone passes `batch["history"]` to all three
encoders, the finetune head passes `batch["requests"]` to the context encoder, and
`Backbone.encode_items` passes `{"product": indices}` to the item encoder.

Extension point: a new encoder only needs that contract, and `Backbone` accepts replacements
through its `item_encoder`, `context_encoder` and `feedback_encoder` arguments.

Side features (`ModelConfig.use_categorical`, `use_text`, `use_time`) swap in two encoders:

- `TextItemEncoder` combines the product's id embedding with its name and category token bags
  through a DCN feature cross. The bags are buffers indexed by the product index, so
  `encode_items` still embeds the whole catalogue from product indices alone.
- `SideContextEncoder` adds city and store embeddings (`city`, `store` (N,)) and the time
  embeddings of `cartformer.model.features.TimeEncoder` (`timestamp` (N,) unix seconds and
  `time_gap` (N,) gap buckets, which the backbone computes) to the surface embedding. The
  dataset adds those columns to both `history` and `requests`.

With every switch off the backbone builds the id-only encoders below, with the same parameters
as before side features existed, so id-only checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from cartformer.config import ModelConfig
from cartformer.model.features import FeatureCross, ProductTextEncoder, TimeEncoder

TIME_GAP = "time_gap"
"""Feature name of the (N,) int64 gap buckets that `SideContextEncoder` reads."""


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


def categorical_fields(config: ModelConfig) -> dict[str, int]:
    """Return the context fields of `use_categorical` with their vocabulary sizes: city and
    store, each only when the prepared data has at least one value of it (size >= 2)."""
    if not config.use_categorical:
        return {}
    sizes = {"city": config.num_cities, "store": config.num_stores}
    return {name: size for name, size in sizes.items() if size >= 2}


def side_features(config: ModelConfig) -> tuple[str, ...]:
    """Return the per-event batch tensors beyond the id-only contract that a model built from
    `config` reads: "city", "store" and "timestamp", as `cartformer.data.dataset` names them."""
    names = list(categorical_fields(config))
    if config.use_time:
        names.append("timestamp")
    return tuple(names)


class TextItemEncoder(nn.Module):
    """Product encoder over the id embedding and the product's text vectors.

    The vectors of the id and of each text field (e.g. name and category, both through one
    shared token table) go through a `FeatureCross` with `config.cross_layers` DCN layers,
    which maps them to one (D,) item vector. The id table starts at zero, so a product that
    gets no gradient during training is placed by its text alone.

    Args:
        config: `num_products`, `num_text_tokens`, `embedding_dim` and `cross_layers`.
        text_bags: text field -> ((T,) token ids, (num_products + 1,) offsets), one bag per
            product index, as `cartformer.data.side_features.load_product_text` returns them.

    `forward(features)` maps features["product"] of any shape (...) to (..., D).
    """

    def __init__(
        self,
        config: ModelConfig,
        text_bags: Mapping[str, tuple[np.ndarray | Tensor, np.ndarray | Tensor]],
    ) -> None:
        super().__init__()
        _check_vocab("num_products", config.num_products)
        _check_vocab("num_text_tokens", config.num_text_tokens)
        dim = config.embedding_dim
        self.tables = nn.ModuleDict({"product": nn.Embedding(config.num_products, dim)})
        nn.init.zeros_(self.tables["product"].weight)
        self.text = ProductTextEncoder(text_bags, config.num_text_tokens, dim)
        if self.text.num_products != config.num_products:
            raise ValueError(
                f"the product texts cover {self.text.num_products} product indices but "
                f"ModelConfig.num_products is {config.num_products}; prepare the run again"
            )
        self.cross = FeatureCross(1 + len(self.text.fields), dim, config.cross_layers)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        product = features["product"]
        # Histories and request candidates repeat products, so each distinct product goes
        # through the token bags and the cross once.
        distinct, inverse = torch.unique(product.reshape(-1), return_inverse=True)
        fields = [self.tables["product"](distinct), *self.text(distinct).values()]
        return self.cross(fields)[inverse].reshape(*product.shape, -1)


class SideContextEncoder(EmbeddingSumEncoder):
    """Context encoder: sum of surface, city, store and time embeddings.

    `forward(features)` reads `source` (N,), the `categorical_fields` of the config (`city`,
    `store` (N,)) and, with `use_time`, `timestamp` (N,) unix seconds and `time_gap` (N,) gap
    buckets, and returns (N, D). Hour, weekday and month are local to
    `config.utc_offset_hours`.

    The city, store and time tables start at zero, so the context starts as the surface
    embedding alone and each feature's share is learned. With the default N(0, 1) rows, six
    added tables made the context about 2.6 times as large as any other part of a token.
    """

    def __init__(self, config: ModelConfig) -> None:
        _check_vocab("num_sources", config.num_sources)
        fields = categorical_fields(config)
        if config.use_categorical and not fields:
            raise ValueError(
                "ModelConfig.use_categorical is on, but num_cities and num_stores are below 2. "
                "Set them from the prepared meta.json or turn the categorical features off"
            )
        super().__init__({"source": config.num_sources, **fields}, config.embedding_dim)
        self.time = (
            TimeEncoder(
                config.embedding_dim,
                utc_offset_hours=config.utc_offset_hours,
                num_gap_buckets=config.num_gap_buckets,
            )
            if config.use_time
            else None
        )
        side_tables = [self.tables[name] for name in fields]
        if self.time is not None:
            side_tables += list(self.time.tables.values())
        for table in side_tables:
            nn.init.zeros_(table.weight)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        total = super().forward(features)
        if self.time is None:
            return total
        missing = [name for name in ("timestamp", TIME_GAP) if name not in features]
        if missing:
            raise KeyError(
                f"time features {missing} are missing from the batch, which has "
                f"{sorted(features)}. Build the dataset with the model's side_features"
            )
        return total + self.time.embed(features["timestamp"], features[TIME_GAP])


def _check_vocab(field_name: str, size: int) -> None:
    if size < 2:
        raise ValueError(
            f"ModelConfig.{field_name} is {size}. Set it from the vocabulary sizes in the prepared "
            "meta.json, which include the reserved index 0"
        )
