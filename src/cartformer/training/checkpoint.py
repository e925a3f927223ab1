"""Checkpoints in safetensors with JSON metadata; nothing is ever pickled.

A stage directory holds:

- ``best.safetensors``: the weights of the best epoch so far, with the model config in the metadata;
- ``last.safetensors``: the weights after the latest finished epoch, for ``--resume``;
- ``last_optimizer.safetensors``: the optimizer tensors of that epoch;
- ``trainer_state.json``: epoch counter, best metric, early-stopping counter, scheduler and
  optimizer hyperparameters, and whether the stage finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_METADATA_KEY = "cartformer_config"


def save_weights(module: torch.nn.Module, path: str | Path, config: dict[str, Any]) -> None:
    """Write a module's state dict to ``path`` with ``config`` as JSON metadata, atomically."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in _state(module).items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(config, ensure_ascii=False)}
    _atomic_save(tensors, Path(path), metadata)


def load_weights(module: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights saved by :func:`save_weights` into ``module``; return the stored config."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; was it written by another model config?"
        )
    return json.loads(metadata.get(CONFIG_METADATA_KEY, "{}"))


def read_config(path: str | Path) -> dict[str, Any]:
    """Return the config stored in a checkpoint's metadata without loading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return json.loads(metadata.get(CONFIG_METADATA_KEY, "{}"))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; run the stage that writes it first")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def save_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> dict[str, Any]:
    """Write the optimizer's tensors to safetensors; return its non-tensor state for JSON."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    _atomic_save(tensors, Path(path), {})
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}


def load_optimizer(
    optimizer: torch.optim.Optimizer, path: str | Path, json_state: dict[str, Any]
) -> None:
    """Restore an optimizer written by :func:`save_optimizer`."""
    tensors, _ = read_safetensors(Path(path))
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    for param_id, values in json_state.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": json_state["param_groups"]})


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file so a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
