import pytest
import torch

from cartformer.config import ModelConfig
from cartformer.model.layers import (
    ContextEncoder,
    EmbeddingSumEncoder,
    FeedbackEncoder,
    ItemEncoder,
    ResidualBlock,
    residual_mlp,
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
