import pytest
import torch

from cartformer.config import ModelConfig
from cartformer.model.backbone import Backbone
from cartformer.model.finetune import FinetuneModel
from cartformer.model.losses import calibrated_pairwise_logistic
from cartformer.model.pretrain import PretrainModel

NUM_PRODUCTS = 25_000
NUM_SOURCES = 10


def make_config(**overrides) -> ModelConfig:
    values = {"num_products": NUM_PRODUCTS, "num_sources": NUM_SOURCES, **overrides}
    return ModelConfig(**values)


def spec_sample() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "history": {
            "source": torch.tensor([8, 8, 8, 8, 8]),
            "action": torch.tensor([1, 1, 2, 2, 1]),
            "product": torch.tensor([3551, 17044, 10396, 10396, 10396]),
            "position": torch.tensor([0, 1, 2, 3, 4]),
            "target_index": torch.zeros(0, dtype=torch.int64),
            "target_lengths": torch.tensor([0]),
            "lengths": torch.tensor([5]),
        },
        "requests": {
            "source": torch.tensor([8]),
            "state_index": torch.tensor([1]),
            "lengths": torch.tensor([15]),
            "num_requests": torch.tensor([1]),
        },
        "candidates": {
            "product": torch.tensor(
                [18391, 6750, 21647, 5339, 3171, 6150, 3454, 20012, 19954, 10690, 24020, 5551]
                + [5699, 17388, 10396]
            ),
            "target": torch.tensor([0] * 14 + [1]),
        },
    }


def two_user_batch() -> dict[str, dict[str, torch.Tensor]]:
    """User 0: 4 events and 2 requests; user 1: 3 events and 1 request."""
    generator = torch.Generator().manual_seed(0)
    return {
        "history": {
            "product": torch.randint(1, NUM_PRODUCTS, (7,), generator=generator),
            "source": torch.randint(0, NUM_SOURCES, (7,), generator=generator),
            "action": torch.randint(1, 4, (7,), generator=generator),
            "position": torch.tensor([0, 1, 2, 3, 0, 1, 2]),
            "target_index": torch.zeros(0, dtype=torch.int64),
            "target_lengths": torch.tensor([0, 0]),
            "lengths": torch.tensor([4, 3]),
        },
        "requests": {
            "source": torch.tensor([1, 2, 3]),
            "state_index": torch.tensor([1, 3, 2]),
            "lengths": torch.tensor([3, 2, 4]),
            "num_requests": torch.tensor([2, 1]),
        },
        "candidates": {
            "product": torch.randint(1, NUM_PRODUCTS, (9,), generator=generator),
            "target": torch.tensor([1, 0, 0, 0, 1, 0, 1, 1, 0]),
        },
    }


def test_spec_sample_shapes():
    torch.manual_seed(0)
    output = FinetuneModel(Backbone(make_config()))(spec_sample())
    assert output["logits"].shape == (15,)
    assert output["loss"].shape == ()


def test_logits_match_plain_reference():
    torch.manual_seed(0)
    model = FinetuneModel(Backbone(make_config())).eval()
    with torch.no_grad():
        model.scale.fill_(0.3)
        model.bias.fill_(-0.2)
    batch = two_user_batch()
    with torch.no_grad():
        logits = model(batch)["logits"]
        states = model.backbone(batch["history"]).states
        expected = []
        request_states = [states[1], states[3], states[4 + 2]]
        request_candidates = [range(0, 3), range(3, 5), range(5, 9)]
        for request, state in enumerate(request_states):
            context = model.backbone.context_encoder({"source": batch["requests"]["source"]})
            user = model.user_context_fusion(torch.cat([state, context[request]]))
            user = torch.nn.functional.normalize(user, dim=-1)
            for candidate in request_candidates[request]:
                product = batch["candidates"]["product"][candidate : candidate + 1]
                item = model.candidate_projector(model.backbone.encode_items(product))[0]
                item = torch.nn.functional.normalize(item, dim=-1)
                expected.append((user * item).sum() / torch.exp(torch.tensor(0.3)) - 0.2)
    assert torch.allclose(logits, torch.stack(expected), atol=1e-5)


def test_loss_is_cpl_of_logits():
    model = FinetuneModel(Backbone(make_config()))
    batch = two_user_batch()
    output = model(batch)
    expected = calibrated_pairwise_logistic(
        output["logits"], batch["candidates"]["target"], batch["requests"]["lengths"]
    )
    assert torch.equal(output["loss"], expected)


def test_score_without_targets():
    model = FinetuneModel(Backbone(make_config())).eval()
    batch = two_user_batch()
    del batch["candidates"]["target"]
    with torch.no_grad():
        assert model.score(batch).shape == (9,)


def test_gradients_finite_for_all_parameters():
    model = FinetuneModel(Backbone(make_config(num_products=30_000)))
    model(two_user_batch())["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name


def test_from_pretrain_backbone_only():
    torch.manual_seed(0)
    pretrain = PretrainModel(Backbone(make_config()))
    model = FinetuneModel.from_pretrain(pretrain, init="backbone")
    pretrained_state = pretrain.backbone.state_dict()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, pretrained_state[name]), name
    fusion_weight = model.user_context_fusion[0].linear.weight
    assert not torch.equal(fusion_weight, pretrain.user_context_fusion[0].linear.weight)


def test_from_pretrain_with_heads():
    torch.manual_seed(0)
    pretrain = PretrainModel(Backbone(make_config()))
    model = FinetuneModel.from_pretrain(pretrain, init="backbone+heads")
    for head in ("user_context_fusion", "candidate_projector"):
        pretrained_state = getattr(pretrain, head).state_dict()
        for name, value in getattr(model, head).state_dict().items():
            assert torch.equal(value, pretrained_state[name]), f"{head}.{name}"


def test_from_pretrain_copies_parameters():
    pretrain = PretrainModel(Backbone(make_config()))
    model = FinetuneModel.from_pretrain(pretrain, init="backbone+heads")
    with torch.no_grad():
        model.backbone.position_embeddings.weight.add_(1.0)
    assert not torch.equal(
        model.backbone.position_embeddings.weight, pretrain.backbone.position_embeddings.weight
    )


def test_from_pretrain_rejects_unknown_init():
    pretrain = PretrainModel(Backbone(make_config()))
    with pytest.raises(ValueError, match="init"):
        FinetuneModel.from_pretrain(pretrain, init="heads")


def test_rejects_state_outside_history():
    batch = two_user_batch()
    batch["requests"]["state_index"][2] = 3
    with pytest.raises(ValueError, match="state_index"):
        FinetuneModel(Backbone(make_config()))(batch)


def test_rejects_candidate_count_mismatch():
    batch = two_user_batch()
    batch["requests"]["lengths"] = torch.tensor([3, 2, 3])
    with pytest.raises(ValueError, match="candidates.product"):
        FinetuneModel(Backbone(make_config()))(batch)


def history_match_offsets(state_index: int) -> torch.Tensor:
    """Logit change from the history-match offsets on the spec sample at a given state."""
    torch.manual_seed(0)
    model = FinetuneModel(Backbone(make_config())).eval()
    with torch.no_grad():
        model.match_count_logit.weight.copy_(torch.arange(9.0)[:, None])
        model.match_recency_logit.weight.copy_(100 * torch.arange(11.0)[:, None])
    batch = spec_sample()
    batch["requests"]["state_index"] = torch.tensor([state_index])
    with torch.no_grad():
        with_offsets = model.score(batch)
        model.config.history_match = False
        plain = model.score(batch)
    return with_offsets - plain


def test_history_match_ignores_events_after_state():
    offsets = history_match_offsets(state_index=1)
    assert torch.allclose(offsets, torch.zeros(15))


def test_history_match_counts_up_to_state():
    offsets = history_match_offsets(state_index=4)
    # Product 10396 occurs 3 times up to position 4 (count bucket 2) and last at position 4,
    # 0 events ago (recency bucket 1).
    assert torch.isclose(offsets[14], torch.tensor(2.0 + 100.0))
    assert torch.allclose(offsets[:14], torch.zeros(14))


def test_plain_method_has_no_match_parameters():
    model = FinetuneModel(Backbone(make_config(history_match=False)))
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.startswith("match_") for name in names)


# --- side features -------------------------------------------------------------------------------

GOOD, BAD, CATEGORY = 2, 3, 4
SIDE_PRODUCTS = 11  # 0 unknown, 1-8 trained (odd ones carted), 9 and 10 held out


def side_bags() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Product p > 0 has the name token GOOD when p is odd and BAD when even; all share one
    category token. Product 0 has empty bags."""
    names = torch.tensor([GOOD if p % 2 else BAD for p in range(1, SIDE_PRODUCTS)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(SIDE_PRODUCTS)])
    return {
        "name": (names, offsets),
        "category": (torch.full((SIDE_PRODUCTS - 1,), CATEGORY), offsets.clone()),
    }


def side_model(**switches) -> FinetuneModel:
    config = ModelConfig(
        embedding_dim=8,
        num_heads=2,
        num_layers=1,
        dropout=0.0,
        num_products=SIDE_PRODUCTS,
        num_sources=3,
        num_cities=3,
        num_stores=4,
        num_text_tokens=5,
        history_match=False,
        **switches,
    )
    return FinetuneModel(Backbone(config, text_bags=side_bags()), config)


def side_batch(candidates: list[int], targets: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """One user with 3 events and one request over `candidates`."""
    return {
        "history": {
            "product": torch.tensor([1, 2, 3]),
            "source": torch.tensor([1, 1, 2]),
            "action": torch.tensor([1, 2, 3]),
            "position": torch.tensor([0, 1, 2]),
            "lengths": torch.tensor([3]),
            "city": torch.tensor([1, 1, 2]),
            "store": torch.tensor([1, 3, 2]),
            "timestamp": torch.tensor([1_700_000_000, 1_700_003_600, 1_700_090_000]),
        },
        "requests": {
            "source": torch.tensor([2]),
            "state_index": torch.tensor([2]),
            "lengths": torch.tensor([len(candidates)]),
            "num_requests": torch.tensor([1]),
            "city": torch.tensor([2]),
            "store": torch.tensor([2]),
            "timestamp": torch.tensor([1_700_500_000]),
        },
        "candidates": {"product": torch.tensor(candidates), "target": torch.tensor(targets)},
    }


def randomize_side_tables(model: FinetuneModel) -> None:
    """Give the side-feature tables, which start at zero, the values of a trained model."""
    encoder = model.backbone.context_encoder
    tables = [encoder.tables[name] for name in ("city", "store") if name in encoder.tables]
    tables += list(encoder.time.tables.values()) if encoder.time is not None else []
    with torch.no_grad():
        for table in tables:
            table.weight.normal_()


def test_held_out_product_placed_by_text():
    """After training on products 1-8 only, where the carted ones have the GOOD token, the
    held-out product 9 (GOOD) outranks the held-out product 10 (BAD)."""
    torch.manual_seed(0)
    model = side_model(use_text=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    batch = side_batch([1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 1, 0, 1, 0, 1, 0])
    for _ in range(60):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        held_out = model.score(side_batch([9, 10], [0, 0]))
    assert held_out[0] > held_out[1]


def test_unseen_values_through_model():
    """City, store and product index 0 (unseen by the mappings) give finite logits and loss."""
    torch.manual_seed(0)
    model = side_model(use_categorical=True, use_text=True, use_time=True)
    batch = side_batch([0, 9, 4], [1, 0, 0])
    batch["history"]["city"] = torch.zeros(3, dtype=torch.int64)
    batch["history"]["store"] = torch.zeros(3, dtype=torch.int64)
    batch["requests"]["city"] = torch.zeros(1, dtype=torch.int64)
    batch["requests"]["store"] = torch.zeros(1, dtype=torch.int64)
    output = model(batch)
    assert torch.isfinite(output["logits"]).all()
    assert torch.isfinite(output["loss"])


def test_side_feature_gradients():
    torch.manual_seed(0)
    model = side_model(use_categorical=True, use_text=True, use_time=True)
    model(side_batch([1, 2, 9], [1, 0, 0]))["loss"].backward()
    backbone = model.backbone
    text_table = backbone.item_encoder.text.bag_encoder.embedding.weight
    assert text_table.grad[GOOD].abs().sum() > 0
    assert backbone.context_encoder.tables["store"].weight.grad[2].abs().sum() > 0
    assert backbone.context_encoder.time.tables["hour"].weight.grad.abs().sum() > 0
    assert backbone.item_encoder.cross.projection.weight.grad.abs().sum() > 0


def test_request_side_features_change_logits():
    torch.manual_seed(0)
    model = side_model(use_categorical=True, use_time=True).eval()
    randomize_side_tables(model)
    batch = side_batch([1, 2, 3], [1, 0, 0])
    moved = side_batch([1, 2, 3], [1, 0, 0])
    moved["requests"]["store"] = torch.tensor([3])
    later = side_batch([1, 2, 3], [1, 0, 0])
    later["requests"]["timestamp"] = torch.tensor([1_700_520_000])
    with torch.no_grad():
        logits = model.score(batch)
        assert not torch.allclose(logits, model.score(moved))
        assert not torch.allclose(logits, model.score(later))
