import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cartformer.config import ModelConfig
from cartformer.model.backbone import Backbone
from cartformer.model.finetune import FinetuneModel
from cartformer.model.pretrain import PretrainModel
from cartformer.model.reference import (
    padded_finetune_scores,
    padded_pretrain_losses,
    padded_states,
)

NUM_PRODUCTS = 60
NUM_SOURCES = 5


def random_batch(lengths: list[int], seed: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    size = sum(lengths)
    lengths_tensor = torch.tensor(lengths)
    is_target = torch.rand(size, generator=generator) < 0.7
    owners = torch.repeat_interleave(torch.arange(len(lengths)), lengths_tensor)
    starts = torch.cumsum(lengths_tensor, 0) - lengths_tensor
    local = torch.arange(size) - starts[owners]
    return {
        "history": {
            "product": torch.randint(1, NUM_PRODUCTS, (size,), generator=generator),
            "source": torch.randint(0, NUM_SOURCES, (size,), generator=generator),
            "action": torch.randint(1, 4, (size,), generator=generator),
            "position": local,
            "lengths": lengths_tensor,
            "target_index": local[is_target],
            "target_lengths": torch.bincount(owners[is_target], minlength=len(lengths)),
        }
    }


def make_model(seed: int) -> PretrainModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        embedding_dim=16,
        num_heads=2,
        num_layers=2,
        dropout=0.0,
        max_seq_len=40,
        num_products=NUM_PRODUCTS,
        num_sources=NUM_SOURCES,
    )
    return PretrainModel(Backbone(config), config).eval()


lengths_strategy = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None)
@given(lengths=lengths_strategy, seed=st.integers(0, 1000))
def test_states_match_padded_model(lengths, seed):
    model = make_model(seed)
    history = random_batch(lengths, seed)["history"]
    with torch.no_grad():
        ours = model.backbone(history).states
        padded, valid = padded_states(model.backbone, history)
    assert torch.allclose(ours, padded[valid], atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(lengths=lengths_strategy, seed=st.integers(0, 1000))
def test_pretrain_losses_match_padded_model(lengths, seed):
    model = make_model(seed)
    batch = random_batch(lengths, seed)
    with torch.no_grad():
        ours = model(batch)
        padded = padded_pretrain_losses(model, batch)
    for name in ("loss", "retrieval_loss", "feedback_loss"):
        assert torch.allclose(ours[name], padded[name], atol=1e-5), name


def test_gradients_match_padded_model():
    model = make_model(0)
    batch = random_batch([7, 30, 1, 12], 0)
    model(batch)["loss"].backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    padded_pretrain_losses(model, batch)["loss"].backward()
    for name, parameter in model.named_parameters():
        if name in ours:
            assert torch.allclose(ours[name], parameter.grad, atol=1e-5), name


def test_finetune_scores_match_padded_model():
    torch.manual_seed(0)
    pretrain = make_model(0)
    model = FinetuneModel.from_pretrain(pretrain).eval()
    batch = random_batch([7, 30, 3], 1)
    batch["requests"] = {
        "source": torch.tensor([1, 2, 3, 1]),
        "state_index": torch.tensor([6, 0, 29, 2]),
        "lengths": torch.tensor([3, 2, 4, 2]),
        "num_requests": torch.tensor([1, 2, 1]),
    }
    batch["candidates"] = {"product": torch.randint(1, NUM_PRODUCTS, (11,))}
    with torch.no_grad():
        ours = model.score(batch)
        padded = padded_finetune_scores(model, batch)
    assert torch.allclose(ours, padded, atol=1e-5)
