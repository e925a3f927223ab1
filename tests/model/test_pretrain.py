import pytest
import torch

from cartformer.config import ModelConfig
from cartformer.model.backbone import Backbone
from cartformer.model.pretrain import PretrainModel

NUM_PRODUCTS = 40
NUM_SOURCES = 6


def make_model(seed: int = 0, **overrides) -> PretrainModel:
    torch.manual_seed(seed)
    values = {"embedding_dim": 16, "num_products": NUM_PRODUCTS, "num_sources": NUM_SOURCES}
    config = ModelConfig(**{**values, **overrides})
    return PretrainModel(Backbone(config), config)


def make_batch(lengths: list[int], target_index: list[list[int]], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = sum(lengths)
    history = {
        "product": torch.randint(1, NUM_PRODUCTS, (size,), generator=generator),
        "source": torch.randint(0, NUM_SOURCES, (size,), generator=generator),
        "action": torch.randint(1, 4, (size,), generator=generator),
        "position": torch.cat([torch.arange(length) for length in lengths]),
        "lengths": torch.tensor(lengths),
        "target_index": torch.tensor([i for targets in target_index for i in targets]),
        "target_lengths": torch.tensor([len(targets) for targets in target_index]),
    }
    return {"history": history}


def all_targets(lengths: list[int]) -> list[list[int]]:
    return [list(range(length)) for length in lengths]


def test_outputs_and_prediction_count():
    lengths = [5, 3, 7]
    batch = make_batch(lengths, [[0, 1, 2], [0, 2], [4, 5, 6]])
    output = make_model()(batch)
    assert output["loss"].shape == ()
    assert output["num_predictions"].item() == 2 + 1 + 3
    assert torch.isfinite(output["loss"]).item()


def test_loss_combines_parts_with_weight():
    batch = make_batch([6, 4], all_targets([6, 4]))
    output = make_model(feedback_loss_weight=10.0)(batch)
    expected = output["retrieval_loss"] + 10.0 * output["feedback_loss"]
    assert torch.allclose(output["loss"], expected)


def test_matches_plain_reference():
    """Recompute the losses per prediction with explicit indices and the spec's formulas."""
    model = make_model().eval()
    lengths = [4, 5]
    batch = make_batch(lengths, [[0, 2, 3], [1, 4]])
    with torch.no_grad():
        output = model(batch)
        backbone_output = model.backbone(batch["history"])
        catalogue = torch.nn.functional.normalize(
            model.candidate_projector(model.backbone.encode_items(torch.arange(1, NUM_PRODUCTS))),
            dim=-1,
        )
        history = batch["history"]
        retrieval, feedback = [], []
        for current in [2, 3, 4 + 1, 4 + 4]:
            state = backbone_output.states[current - 1]
            context = backbone_output.context_embeddings[current]
            item = backbone_output.item_embeddings[current]
            user = torch.nn.functional.normalize(
                model.user_context_fusion(torch.cat([state, context])), dim=-1
            )
            positive = torch.nn.functional.normalize(model.candidate_projector(item), dim=-1)
            logits = torch.cat([(user * positive).sum().view(1), catalogue @ user])
            logits = logits * model.temperature
            retrieval.append(-torch.log_softmax(logits, dim=0)[0])
            class_logits = model.classifier(torch.cat([state, context, item]))
            feedback.append(-torch.log_softmax(class_logits, dim=0)[history["action"][current] - 1])
    assert output["num_predictions"].item() == 4
    assert torch.allclose(output["retrieval_loss"], torch.stack(retrieval).mean(), atol=1e-5)
    assert torch.allclose(output["feedback_loss"], torch.stack(feedback).mean(), atol=1e-5)


def test_catalogue_excludes_unknown_index():
    model = make_model()
    assert model.catalogue_indices.tolist() == list(range(1, NUM_PRODUCTS))
    assert model.embed_catalogue().shape == (NUM_PRODUCTS - 1, 16)


def test_temperature_is_clipped():
    model = make_model()
    with torch.no_grad():
        model.tau.fill_(10.0)
    assert model.temperature.item() == pytest.approx(100.0)
    with torch.no_grad():
        model.tau.fill_(-10.0)
    assert model.temperature.item() == pytest.approx(0.01)


def test_no_predictions_gives_zero_loss():
    model = make_model()
    output = model(make_batch([3, 2], [[0], [0]]))
    output["loss"].backward()
    assert output["num_predictions"].item() == 0
    assert output["loss"].item() == 0.0
    assert torch.isfinite(model.tau.grad).all()


def test_gradients_finite_for_all_parameters():
    model = make_model()
    model(make_batch([6, 4, 8], all_targets([6, 4, 8])))["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name


def test_loss_decreases_with_adam():
    model = make_model(dropout=0.0)
    lengths = [8, 6, 10, 5]
    batch = make_batch(lengths, all_targets(lengths))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_rejects_view_action():
    batch = make_batch([4], [[1, 2, 3]])
    batch["history"]["action"][2] = 0
    with pytest.raises(ValueError, match="history.action"):
        make_model()(batch)


def test_rejects_target_outside_history():
    batch = make_batch([4, 3], [[1, 3], [3]])
    with pytest.raises(ValueError, match="target_index"):
        make_model()(batch)
