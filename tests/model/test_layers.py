import numpy as np
import pytest
import torch

from cartformer.config import ModelConfig
from cartformer.model.layers import (
    TIME_GAP,
    ContextEncoder,
    EmbeddingSumEncoder,
    FeedbackEncoder,
    ItemEncoder,
    ResidualBlock,
    SideContextEncoder,
    TextItemEncoder,
    categorical_fields,
    residual_mlp,
    side_features,
)

CONFIG = ModelConfig(embedding_dim=16, num_products=30, num_sources=5)


def test_residual_block_shape():
    block = ResidualBlock(32)
    assert block(torch.randn(8, 32)).shape == (8, 32)


def test_residual_block_formula():
    torch.manual_seed(0)
    block = ResidualBlock(4, dropout=0.0)
    x = torch.randn(3, 4)
    expected = torch.nn.functional.layer_norm(
        x + torch.relu(block.linear(x)), (4,), block.norm.weight, block.norm.bias
    )
    assert torch.allclose(block(x), expected)


def test_residual_block_dropout_in_train_only():
    torch.manual_seed(0)
    block = ResidualBlock(64, dropout=0.5)
    x = torch.randn(16, 64)
    block.train()
    assert not torch.allclose(block(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))


def test_residual_mlp_output_width():
    head = residual_mlp(12, num_blocks=3, out_dim=5)
    assert len(head) == 4
    assert head(torch.randn(2, 12)).shape == (2, 5)


def test_encoders_shapes():
    features = {
        "product": torch.randint(0, 30, (7,)),
        "source": torch.randint(0, 5, (7,)),
        "action": torch.randint(0, 4, (7,)),
    }
    for encoder in (ItemEncoder(CONFIG), ContextEncoder(CONFIG), FeedbackEncoder(CONFIG)):
        assert encoder(features).shape == (7, 16)


def test_item_encoder_vocab_size():
    assert ItemEncoder(CONFIG).tables["product"].num_embeddings == 30


def test_sum_encoder_adds_tables():
    encoder = EmbeddingSumEncoder({"source": 5, "city": 3}, dim=4)
    features = {"source": torch.tensor([1, 4]), "city": torch.tensor([2, 0])}
    expected = encoder.tables["source"](features["source"]) + encoder.tables["city"](
        features["city"]
    )
    assert torch.equal(encoder(features), expected)


def test_sum_encoder_missing_feature():
    encoder = EmbeddingSumEncoder({"source": 5, "city": 3}, dim=4)
    with pytest.raises(KeyError, match="city"):
        encoder({"source": torch.tensor([1])})


def test_encoder_rejects_unset_vocab():
    with pytest.raises(ValueError, match="num_products"):
        ItemEncoder(ModelConfig(num_sources=5))


# --- side-feature encoders -----------------------------------------------------------------------


def text_bags() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bags of 6 products: 0 empty, 1 and 4 the same name, 2 and 5 the same name."""
    return {
        "name": (np.array([1, 2, 3, 4, 1, 2, 3, 4]), np.array([0, 0, 2, 4, 4, 6, 8])),
        "category": (np.array([5, 5, 6, 5, 5, 6]), np.array([0, 0, 1, 2, 3, 4, 6])),
    }


def side_config(**overrides) -> ModelConfig:
    values = {
        "embedding_dim": 8,
        "num_products": 6,
        "num_sources": 4,
        "num_cities": 3,
        "num_stores": 5,
        "num_text_tokens": 7,
        **overrides,
    }
    return ModelConfig(**values)


def test_side_features_names():
    config = side_config(use_categorical=True, use_time=True)
    assert side_features(config) == ("city", "store", "timestamp")


def test_side_features_off_by_default():
    assert side_features(side_config()) == ()


def test_side_features_skip_empty_city():
    config = side_config(use_categorical=True, num_cities=1)
    assert categorical_fields(config) == {"store": 5}


def test_text_item_encoder_shape():
    encoder = TextItemEncoder(side_config(use_text=True), text_bags())
    assert encoder({"product": torch.tensor([[1, 2], [3, 0]])}).shape == (2, 2, 8)


def test_text_item_encoder_twins_equal_at_init():
    encoder = TextItemEncoder(side_config(use_text=True), text_bags())
    vectors = encoder({"product": torch.tensor([1, 4, 2])})
    assert torch.equal(vectors[0], vectors[1])
    assert not torch.allclose(vectors[0], vectors[2])


def test_text_item_encoder_product_count_checked():
    with pytest.raises(ValueError, match="cover 6 product indices"):
        TextItemEncoder(side_config(use_text=True, num_products=9), text_bags())


def test_side_context_sums_fields():
    torch.manual_seed(0)
    encoder = SideContextEncoder(side_config(use_categorical=True, use_time=True))
    timestamp = torch.tensor([1_700_000_000, 1_700_050_000])
    features = {
        "source": torch.tensor([1, 2]),
        "city": torch.tensor([0, 2]),
        "store": torch.tensor([4, 0]),
        "timestamp": timestamp,
        TIME_GAP: torch.tensor([0, 7]),
    }
    tables = encoder.tables
    expected = (
        tables["source"](features["source"])
        + tables["city"](features["city"])
        + tables["store"](features["store"])
        + encoder.time.embed(timestamp, features[TIME_GAP])
    )
    assert torch.allclose(encoder(features), expected)


def test_side_context_missing_time_gap():
    encoder = SideContextEncoder(side_config(use_time=True))
    with pytest.raises(KeyError, match="time_gap"):
        encoder({"source": torch.tensor([1]), "timestamp": torch.tensor([0])})


def test_side_context_needs_categorical_values():
    with pytest.raises(ValueError, match="num_cities and num_stores are below 2"):
        SideContextEncoder(side_config(use_categorical=True, num_cities=0, num_stores=1))


def test_side_context_starts_as_surface():
    encoder = SideContextEncoder(side_config(use_categorical=True, use_time=True))
    features = {
        "source": torch.tensor([1, 3]),
        "city": torch.tensor([2, 1]),
        "store": torch.tensor([4, 3]),
        "timestamp": torch.tensor([1_700_000_000, 1_700_050_000]),
        TIME_GAP: torch.tensor([0, 9]),
    }
    assert torch.equal(encoder(features), encoder.tables["source"](features["source"]))


def test_text_item_encoder_repeats_match_direct():
    torch.manual_seed(0)
    encoder = TextItemEncoder(side_config(use_text=True), text_bags())
    with torch.no_grad():
        encoder.tables["product"].weight.normal_()
    product = torch.tensor([3, 1, 3, 5, 1, 0])
    direct = encoder.cross([encoder.tables["product"](product), *encoder.text(product).values()])
    assert torch.allclose(encoder({"product": product}), direct, atol=1e-6)
