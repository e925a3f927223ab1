import pytest
import torch

from cartformer.config import TrainConfig
from cartformer.training.loop import read_metrics, train_stage


class ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch):
        loss = ((self.weight * batch["x"] - 1.0) ** 2).mean()
        return {"loss": loss, "loss_weight": torch.tensor(float(batch["x"].numel()))}


def validate(model, loader, device):
    with torch.no_grad():
        return {"loss": float(sum(model(batch)["loss"] for batch in loader))}


def train(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = TrainConfig(lr=0.1, max_epochs=2, device="cpu", **overrides)
    batches = [{"x": torch.randn(4)} for _ in range(3)]
    train_stage(
        ToyModel(),
        batches,
        batches,
        validate,
        cfg,
        tmp_path,
        monitor="loss",
        mode="min",
        model_config={},
    )
    return read_metrics(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize(("warmup_epochs", "first_lr"), [(0, 0.1), (1, 0.01), (3, 0.01)])
def test_first_epoch_learning_rate(tmp_path, warmup_epochs, first_lr):
    history = train(tmp_path, warmup_epochs=warmup_epochs)
    assert history[0]["lr"] == pytest.approx(first_lr)


def test_warmup_reaches_full_rate(tmp_path):
    history = train(tmp_path, warmup_epochs=1)
    assert history[1]["lr"] == pytest.approx(0.1)
