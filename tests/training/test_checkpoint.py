import pickle

import pytest
import torch

from cartformer.training import checkpoint


def make_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_weights_round_trip(tmp_path):
    source = make_module()
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(source, path, {"embedding_dim": 4})
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    config = checkpoint.load_weights(target, path)
    assert config == {"embedding_dim": 4}
    for (name, a), (_, b) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_file_is_not_pickle(tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(make_module(), path, {})
    with open(path, "rb") as handle, pytest.raises(pickle.UnpicklingError):
        pickle.load(handle)


def test_read_config_without_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(make_module(), path, {"num_layers": 2})
    assert checkpoint.read_config(path) == {"num_layers": 2}


def test_load_rejects_other_architecture(tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(make_module(), path, {})
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="does not match"):
        checkpoint.load_weights(other, path)


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage"):
        checkpoint.load_weights(make_module(), tmp_path / "absent.safetensors")


def test_optimizer_round_trip(tmp_path):
    module = make_module()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        module(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    json_state = checkpoint.save_optimizer(optimizer, tmp_path / "opt.safetensors")
    restored = torch.optim.AdamW(module.parameters(), lr=0.5)
    checkpoint.load_optimizer(restored, tmp_path / "opt.safetensors", json_state)
    original = optimizer.state_dict()
    loaded = restored.state_dict()
    assert loaded["param_groups"][0]["lr"] == 0.01
    for param_id, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(loaded["state"][param_id][name]), torch.as_tensor(value)
            )
