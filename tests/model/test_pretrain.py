import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from cartformer.config import ModelConfig
from cartformer.data.dataset import FlatList, PretrainDataset
from cartformer.model.backbone import Backbone
from cartformer.model.losses import log_expected_counts
from cartformer.model.pretrain import PretrainModel, count_target_products
from cartformer.training import checkpoint

NUM_PRODUCTS = 40
NUM_SOURCES = 6


def make_model(seed: int = 0, target_counts=None, **overrides) -> PretrainModel:
    torch.manual_seed(seed)
    values = {"embedding_dim": 16, "num_products": NUM_PRODUCTS, "num_sources": NUM_SOURCES}
    config = ModelConfig(**{**values, **overrides})
    return PretrainModel(Backbone(config), config, target_counts=target_counts)


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


def adam_losses(model, batch, steps=30):
    """Train ``model`` on one batch with Adam and return the loss of every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_loss_decreases_with_adam():
    model = make_model(dropout=0.0)
    lengths = [8, 6, 10, 5]
    batch = make_batch(lengths, all_targets(lengths))
    losses = adam_losses(model, batch)
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


# --- sampled softmax -----------------------------------------------------------------------------


def sampled_model(**overrides) -> PretrainModel:
    values = {"softmax": "sampled", "num_negatives": 8, "dropout": 0.0}
    return make_model(**{**values, **overrides})


def plain_user_vectors(model: PretrainModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (P, D) user vectors and (P,) positive products of the batch's predictions."""
    history = batch["history"]
    output = model.backbone(history)
    predicted = model._predicted_positions(history)
    fused = torch.cat([output.states[predicted - 1], output.context_embeddings[predicted]], -1)
    users = F.normalize(model.user_context_fusion(fused), dim=-1)
    return users, history["product"][predicted]


def test_sampled_forward_outputs():
    lengths = [5, 3, 7]
    batch = make_batch(lengths, [[0, 1, 2], [0, 2], [4, 5, 6]])
    output = sampled_model()(batch)
    assert output["loss"].shape == ()
    assert output["num_predictions"].item() == 6
    assert output["loss_weight"].item() == 6.0
    assert torch.isfinite(output["loss"]).item()
    assert torch.allclose(output["loss"], output["retrieval_loss"] + 10.0 * output["feedback_loss"])


def test_sampled_gradients_finite():
    counts = torch.arange(NUM_PRODUCTS)
    model = sampled_model(target_counts=counts)
    model(make_batch([6, 4, 8], all_targets([6, 4, 8])))["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name


def test_sampled_full_coverage_cross_entropy():
    """With draws that cover the catalogue and no logQ, the sampled loss is the cross-entropy
    of the catalogue logits at the positive's column, without the duplicated positive."""
    model = sampled_model(num_negatives=5000, logq_correction=False)
    lengths = [6, 5]
    batch = make_batch(lengths, all_targets(lengths))
    output = model(batch)
    with torch.no_grad():
        users, products = plain_user_vectors(model, batch)
        logits = users @ model.embed_catalogue().T * model.temperature
        expected = F.cross_entropy(logits, products - 1)
    assert torch.allclose(output["retrieval_loss"], expected, atol=1e-5)


def test_sampled_full_coverage_log_q():
    counts = torch.zeros(NUM_PRODUCTS, dtype=torch.int64)
    counts[1:5] = torch.tensor([10**6, 10**5, 10**4, 10])
    model = sampled_model(num_negatives=5000, target_counts=counts)
    lengths = [6, 5]
    batch = make_batch(lengths, all_targets(lengths))
    output = model(batch)
    with torch.no_grad():
        users, products = plain_user_vectors(model, batch)
        log_q = log_expected_counts(model.catalogue_indices, counts, products.numel(), 5000)
        logits = users @ model.embed_catalogue().T * model.temperature - log_q
        expected = F.cross_entropy(logits, products - 1)
    assert torch.allclose(output["retrieval_loss"], expected, atol=1e-5)
    assert (log_q.max() - log_q.min()).item() > 0.01  # the correction is not a constant


def test_sampled_eval_reports_full_loss():
    lengths = [5, 6]
    batch = make_batch(lengths, all_targets(lengths))
    with torch.no_grad():
        full = make_model(seed=3).eval()(batch)
        sampled = make_model(seed=3, softmax="sampled", num_negatives=4).eval()(batch)
    assert torch.equal(sampled["retrieval_loss"], full["retrieval_loss"])
    assert torch.equal(sampled["loss"], full["loss"])


def test_sampled_train_differs_from_full():
    lengths = [5, 6]
    batch = make_batch(lengths, all_targets(lengths))
    with torch.no_grad():
        full = make_model(seed=3, dropout=0.0)(batch)
        sampled = sampled_model(seed=3, num_negatives=4)(batch)
    assert not torch.allclose(sampled["retrieval_loss"], full["retrieval_loss"])


def test_sampled_reproducible_with_seed():
    model = sampled_model(num_negatives=5)
    batch = make_batch([8, 7], all_targets([8, 7]))
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(model(batch)["retrieval_loss"])
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(losses[0], losses[2])


def test_sampled_no_predictions_gives_zero_loss():
    model = sampled_model()
    output = model(make_batch([3, 2], [[0], [0]]))
    output["loss"].backward()
    assert output["loss"].item() == 0.0
    assert torch.isfinite(model.tau.grad).all()


def test_sampled_loss_decreases_with_adam():
    model = sampled_model(num_negatives=16)
    lengths = [8, 6, 10, 5]
    batch = make_batch(lengths, all_targets(lengths))
    losses = adam_losses(model, batch)
    assert losses[-1] < 0.5 * losses[0]


def test_sampled_rejects_unknown_positive():
    batch = make_batch([4], [[1, 2, 3]])
    batch["history"]["product"][2] = 0
    with pytest.raises(ValueError, match="reserved unknown"):
        sampled_model()(batch)


def test_rejects_unknown_softmax():
    with pytest.raises(ValueError, match="softmax"):
        make_model(softmax="sample")


def test_rejects_negative_num_negatives():
    with pytest.raises(ValueError, match="num_negatives"):
        make_model(num_negatives=-1)


# --- target counts -------------------------------------------------------------------------------


def test_target_counts_buffer_defaults_to_zeros():
    model = make_model()
    assert model.target_counts.shape == (NUM_PRODUCTS,)
    assert model.target_counts.dtype == torch.int64
    assert not bool(model.target_counts.any())


def test_state_keys_match_across_modes():
    full = make_model().state_dict()
    sampled = make_model(
        softmax="sampled", target_counts=torch.ones(NUM_PRODUCTS, dtype=torch.int64)
    ).state_dict()
    assert list(full) == list(sampled)
    assert "target_counts" in full
    assert full["target_counts"].shape == sampled["target_counts"].shape


def test_target_counts_survive_save_load(tmp_path):
    counts = torch.arange(NUM_PRODUCTS) * 3
    source = make_model(softmax="sampled", target_counts=counts)
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(source, path, {})
    target = make_model(seed=1, softmax="sampled")
    checkpoint.load_weights(target, path)
    assert torch.equal(target.target_counts, counts)
    assert torch.equal(target.tau, source.tau)


def test_target_counts_load_into_full_model(tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(make_model(softmax="sampled"), path, {})
    checkpoint.load_weights(make_model(seed=1), path)


def test_target_counts_rejects_wrong_shape():
    with pytest.raises(ValueError, match="target_counts has shape"):
        make_model(target_counts=torch.zeros(NUM_PRODUCTS - 1, dtype=torch.int64))


def test_target_counts_rejects_floats():
    with pytest.raises(ValueError, match="dtype"):
        make_model(target_counts=torch.zeros(NUM_PRODUCTS))


def test_target_counts_rejects_negative():
    counts = torch.zeros(NUM_PRODUCTS, dtype=torch.int64)
    counts[3] = -1
    with pytest.raises(ValueError, match="negative"):
        make_model(target_counts=counts)


def test_sampled_without_counts_warns_once(caplog):
    model = sampled_model()
    batch = make_batch([4, 5], all_targets([4, 5]))
    with caplog.at_level(logging.WARNING, logger="cartformer.model.pretrain"):
        model(batch)
        model(batch)
    assert caplog.text.count("no effect") == 1


def test_sampled_with_counts_does_not_warn(caplog):
    model = sampled_model(target_counts=torch.ones(NUM_PRODUCTS, dtype=torch.int64))
    with caplog.at_level(logging.WARNING, logger="cartformer.model.pretrain"):
        model(make_batch([4, 5], all_targets([4, 5])))
    assert "no effect" not in caplog.text


def flat(rows: list[list[int]]) -> FlatList:
    lengths = [len(row) for row in rows]
    return FlatList(
        values=np.array([value for row in rows for value in row], dtype=np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )


class ListsOnly:
    def __init__(self, products: list[list[int]], targets: list[list[int]]) -> None:
        self.lists = {"product": flat(products), "target_index": flat(targets)}


def plain_target_counts(products, targets, num_products) -> list[int]:
    """Count the products at target positions after the first, one row at a time."""
    counts = [0] * num_products
    for row_products, row_targets in zip(products, targets, strict=True):
        for position in row_targets:
            if position > 0:
                counts[row_products[position]] += 1
    return counts


def test_count_target_products_skips_first_event():
    products = [[3, 1, 3, 2], [5, 5], [4, 1, 2]]
    targets = [[0, 1, 2, 3], [0, 1], [2]]
    counts = count_target_products(ListsOnly(products, targets), num_products=7)
    assert counts.dtype == torch.int64
    assert counts.tolist() == plain_target_counts(products, targets, 7)
    assert counts.tolist() == [0, 1, 2, 1, 0, 1, 0]


def test_count_target_products_reads_dataset(tmp_path):
    products = [[3, 1, 3, 2, 6], [5, 5, 1]]
    targets = [[0, 1, 2, 3, 4], [2]]
    table = pa.table(
        {
            "user": pa.array([1, 2], pa.int32()),
            "product": pa.array(products, pa.list_(pa.int32())),
            "source": pa.array([[1] * 5, [1] * 3], pa.list_(pa.int32())),
            "action": pa.array([[1] * 5, [3] * 3], pa.list_(pa.int8())),
            "target_index": pa.array(targets, pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, tmp_path / "pretrain_train.parquet")
    dataset = PretrainDataset(tmp_path / "pretrain_train.parquet")
    counts = count_target_products(dataset, num_products=8)
    assert counts.tolist() == plain_target_counts(products, targets, 8)


def test_count_target_products_rejects_out_of_range():
    with pytest.raises(ValueError, match="num_products"):
        count_target_products(ListsOnly([[1, 9]], [[0, 1]]), num_products=5)


def test_side_features_pretrain_loss():
    """With every side feature on, the catalogue softmax encodes products through their texts."""
    torch.manual_seed(0)
    names = torch.tensor([2, 3, 2, 3, 2, 3])
    bags = {"name": (names, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))}
    config = ModelConfig(
        embedding_dim=8,
        num_products=7,
        num_sources=3,
        num_cities=2,
        num_stores=3,
        num_text_tokens=4,
        use_categorical=True,
        use_text=True,
        use_time=True,
    )
    model = PretrainModel(Backbone(config, text_bags=bags), config)

    history = {
        "product": torch.tensor([1, 2, 3, 4, 5, 6, 0]),
        "source": torch.tensor([1, 2, 1, 2, 1, 2, 1]),
        "action": torch.tensor([1, 2, 3, 1, 2, 3, 1]),
        "position": torch.tensor([0, 1, 2, 3, 0, 1, 2]),
        "lengths": torch.tensor([4, 3]),
        "target_index": torch.tensor([1, 2, 3, 1, 2]),
        "target_lengths": torch.tensor([3, 2]),
        "city": torch.tensor([1, 1, 0, 1, 1, 1, 1]),
        "store": torch.tensor([2, 1, 1, 0, 2, 2, 2]),
        "timestamp": torch.tensor([0, 60, 3600, 90_000, 10, 20, 86_400 * 40]),
    }
    output = model({"history": history})
    output["loss"].backward()

    assert model.embed_catalogue().shape == (6, 8)
    assert torch.isfinite(output["loss"])
    assert model.backbone.item_encoder.text.bag_encoder.embedding.weight.grad.abs().sum() > 0
