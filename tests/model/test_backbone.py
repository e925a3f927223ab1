import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cartformer.config import ModelConfig
from cartformer.model.backbone import Backbone, CausalEncoderLayer, padded_slots
from cartformer.model.features import FIRST_EVENT_BUCKET, log_time_buckets
from cartformer.model.finetune import FinetuneModel
from cartformer.model.layers import TIME_GAP
from cartformer.model.ops import lengths_to_mask
from cartformer.model.pretrain import PretrainModel
from cartformer.pipeline import stored_model_config
from cartformer.training import checkpoint

NUM_PRODUCTS = 25_000
NUM_SOURCES = 10


def make_config(**overrides) -> ModelConfig:
    values = {"num_products": NUM_PRODUCTS, "num_sources": NUM_SOURCES, **overrides}
    return ModelConfig(**values)


def random_history(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = sum(lengths)
    return {
        "product": torch.randint(0, NUM_PRODUCTS, (size,), generator=generator),
        "source": torch.randint(0, NUM_SOURCES, (size,), generator=generator),
        "action": torch.randint(1, 4, (size,), generator=generator),
        "position": torch.cat([torch.arange(length) for length in lengths]),
        "lengths": torch.tensor(lengths),
    }


def slice_history(history: dict[str, torch.Tensor], start: int, length: int):
    sliced = {
        key: value[start : start + length] for key, value in history.items() if key != "lengths"
    }
    sliced["lengths"] = torch.tensor([length])
    return sliced


def test_backbone_spec_sample_shapes():
    history = {
        "source": torch.tensor([1, 1, 7, 1, 1]),
        "action": torch.tensor([2, 2, 2, 1, 2]),
        "product": torch.tensor([19210, 8368, 5165, 5326, 12476]),
        "position": torch.tensor([0, 1, 2, 3, 4]),
        "target_index": torch.tensor([0, 1, 2]),
        "target_lengths": torch.tensor([3]),
        "lengths": torch.tensor([5]),
    }
    output = Backbone(make_config())(history)
    assert output.states.shape == (5, 64)
    assert output.item_embeddings.shape == (5, 64)
    assert output.context_embeddings.shape == (5, 64)


def test_eval_matches_train_without_dropout():
    torch.manual_seed(0)
    backbone = Backbone(make_config(dropout=0.0))
    history = random_history([3, 9, 1, 6])
    backbone.train()
    train_states = backbone(history).states
    backbone.eval()
    with torch.no_grad():
        eval_states = backbone(history).states
    assert torch.allclose(train_states, eval_states, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_layer_matches_torch_encoder_layer(training):
    torch.manual_seed(0)
    dim, heads, lengths = 16, 2, torch.tensor([5, 2, 7])
    ours = CausalEncoderLayer(dim, heads, dropout=0.0, attention_dropout=0.0).train(training)
    reference = nn.TransformerEncoderLayer(
        dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True
    ).train(training)
    with torch.no_grad():
        ours.in_proj.weight.copy_(reference.self_attn.in_proj_weight)
        ours.in_proj.bias.copy_(reference.self_attn.in_proj_bias)
        ours.out_proj.load_state_dict(reference.self_attn.out_proj.state_dict())
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ours, name).load_state_dict(getattr(reference, name).state_dict())
    x = torch.randn(3, 7, dim)
    valid = lengths_to_mask(lengths, 7)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    expected = reference(x, src_mask=~causal, src_key_padding_mask=~valid)
    actual = ours(x[valid], padded_slots(lengths, 7), 3, 7)
    assert torch.allclose(actual, expected[valid], atol=1e-5)


def test_padded_slots_example():
    slots = padded_slots(torch.tensor([2, 3]), 3)
    assert slots.tolist() == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequence_independent_of_batch(mode):
    torch.manual_seed(0)
    backbone = Backbone(make_config(dropout=0.0)).train(mode == "train")
    lengths = [4, 11, 1, 7]
    history = random_history(lengths)
    with torch.no_grad():
        batch_states = backbone(history).states
        start = 0
        for length in lengths:
            alone = backbone(slice_history(history, start, length)).states
            assert torch.allclose(alone, batch_states[start : start + length], atol=1e-5)
            start += length


def test_states_are_causal():
    torch.manual_seed(0)
    backbone = Backbone(make_config(dropout=0.0)).eval()
    history = random_history([6])
    changed = {key: value.clone() for key, value in history.items()}
    changed["product"][4:] = (changed["product"][4:] + 1) % NUM_PRODUCTS
    with torch.no_grad():
        original = backbone(history).states
        altered = backbone(changed).states
    assert torch.allclose(original[:4], altered[:4], atol=1e-6)
    assert not torch.allclose(original[4:], altered[4:], atol=1e-6)


def test_encode_items_uses_item_encoder():
    backbone = Backbone(make_config())
    products = torch.tensor([0, 5, 24_999])
    embeddings = backbone.encode_items(products)
    assert embeddings.shape == (3, 64)
    assert torch.equal(embeddings, backbone.item_encoder.tables["product"].weight[products])


def test_backbone_gradients_finite():
    backbone = Backbone(make_config(num_products=50))
    history = random_history([5, 2])
    history["product"] %= 50
    backbone(history).states.sum().backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name


def test_rejects_empty_sequence():
    history = random_history([3, 0])
    with pytest.raises(ValueError, match="contains 0"):
        Backbone(make_config())(history)


def test_rejects_sequence_over_max_len():
    history = random_history([9])
    with pytest.raises(ValueError, match="max_seq_len"):
        Backbone(make_config(max_seq_len=8))(history)


def test_rejects_mismatched_lengths():
    history = random_history([3, 2])
    history["lengths"] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="sums to 6"):
        Backbone(make_config())(history)


# --- side features and id-only compatibility ------------------------------------------------------

FIXTURES = Path(__file__).parent / "data"


def _fixture_batch() -> dict[str, dict[str, torch.Tensor]]:
    expected = json.loads((FIXTURES / "id_only_expected.json").read_text())
    return {
        part: {name: torch.tensor(values) for name, values in tensors.items()}
        for part, tensors in expected["batch"].items()
    }


def test_id_only_checkpoint_outputs_unchanged():
    """The checkpoints come from the model code before side features existed, and their config
    lacks the new fields. The current code must load them and give the same outputs."""
    expected = json.loads((FIXTURES / "id_only_expected.json").read_text())
    batch = _fixture_batch()
    pretrain_path = FIXTURES / "id_only_pretrain.safetensors"
    finetune_path = FIXTURES / "id_only_finetune.safetensors"
    pretrain_config = stored_model_config(pretrain_path)
    pretrain = PretrainModel(Backbone(pretrain_config), pretrain_config)
    checkpoint.load_weights(pretrain, pretrain_path)
    finetune_config = stored_model_config(finetune_path)
    finetune = FinetuneModel(Backbone(finetune_config), finetune_config)
    checkpoint.load_weights(finetune, finetune_path)
    pretrain.eval()
    finetune.eval()
    with torch.no_grad():
        loss = pretrain({"history": batch["history"]})["loss"].item()
        logits = finetune(batch)["logits"]
    assert loss == pytest.approx(expected["pretrain_loss"], rel=1e-6)
    assert torch.allclose(logits, torch.tensor(expected["finetune_logits"]), atol=1e-6)


def test_id_only_ignores_side_tensors():
    torch.manual_seed(0)
    backbone = Backbone(make_config(num_cities=4, num_stores=6, dropout=0.0)).eval()
    history = random_history([3, 5])
    with_side = {
        **history,
        "city": torch.randint(0, 4, (8,)),
        "store": torch.randint(0, 6, (8,)),
        "timestamp": torch.arange(8) * 3600,
    }
    assert torch.equal(backbone(history).states, backbone(with_side).states)


def test_id_only_parameter_names():
    names = set(Backbone(make_config(num_cities=4, num_stores=6)).state_dict())
    assert "item_encoder.tables.product.weight" in names
    assert "context_encoder.tables.source.weight" in names
    assert not any("city" in name or "store" in name or "time" in name for name in names)


def test_history_time_gap_buckets():
    """Event t's gap feature is the time since event t-1 of the same sequence."""
    torch.manual_seed(0)
    backbone = Backbone(make_config(use_time=True, dropout=0.0)).eval()
    history = random_history([2, 3])
    history["timestamp"] = torch.tensor([100, 200, 50, 50, 5000])
    captured = {}
    backbone.context_encoder.register_forward_pre_hook(
        lambda module, args: captured.update(args[0])
    )
    backbone(history)
    expected = torch.tensor(
        [
            FIRST_EVENT_BUCKET,
            int(log_time_buckets(torch.tensor([100]))[0]),
            FIRST_EVENT_BUCKET,
            int(log_time_buckets(torch.tensor([0]))[0]),
            int(log_time_buckets(torch.tensor([4950]))[0]),
        ]
    )
    assert torch.equal(captured[TIME_GAP], expected)


def test_request_context_gap_to_state():
    torch.manual_seed(0)
    backbone = Backbone(make_config(use_time=True, dropout=0.0)).eval()
    history = {"timestamp": torch.tensor([100, 200, 300])}
    requests = {
        "source": torch.tensor([1, 2]),
        "timestamp": torch.tensor([1000, 90_000]),
    }
    captured = {}
    backbone.context_encoder.register_forward_pre_hook(
        lambda module, args: captured.update(args[0])
    )
    backbone.encode_request_context(history, requests, torch.tensor([2, 0]))
    expected = log_time_buckets(torch.tensor([700, 89_900]))
    assert torch.equal(captured[TIME_GAP], expected)


def test_text_features_need_bags():
    with pytest.raises(ValueError, match="no text_bags were given"):
        Backbone(make_config(use_text=True, num_text_tokens=10))
