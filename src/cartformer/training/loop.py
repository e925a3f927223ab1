"""One training stage: AdamW, linear warm-up, per-epoch validation, early stopping, resume.

The loop is shared by pretraining and finetuning. A stage differs only in its model, its data
loaders and its ``validate`` function, which returns the epoch's validation metrics; one of them
(``monitor``) decides the best epoch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cartformer.config import TrainConfig
from cartformer.data.dataset import move_to_device
from cartformer.training import checkpoint

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
ValidateFn = Callable[[torch.nn.Module, Iterable[Batch], torch.device], dict[str, float]]


@dataclass
class StageResult:
    """Outcome of a training stage."""

    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    """Map ``auto`` to CUDA when it is available and to the CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {name!r}: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


def train_stage(
    model: torch.nn.Module,
    train_loader: Iterable[Batch],
    valid_loader: Iterable[Batch],
    validate: ValidateFn,
    cfg: TrainConfig,
    stage_dir: str | Path,
    *,
    monitor: str,
    mode: str,
    model_config: dict[str, Any],
    resume: bool = False,
    stage_name: str = "train",
    inputs_fingerprint: str = "",
) -> StageResult:
    """Train ``model`` until ``max_epochs`` or ``patience`` epochs without improvement.

    Every epoch appends one JSON line to ``stage_dir/metrics.jsonl``, saves ``last.*`` for resume
    and, when ``monitor`` improves (``mode`` is ``"min"`` or ``"max"``), ``best.safetensors``.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model.to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=cfg.warmup_start_factor, total_iters=cfg.warmup_epochs
    )

    state_path = stage_dir / "trainer_state.json"
    metrics_path = stage_dir / "metrics.jsonl"
    state: dict[str, Any] = {
        "epoch": 0,
        "best_epoch": 0,
        "best_metric": None,
        "bad_epochs": 0,
        "finished": False,
        "inputs_fingerprint": inputs_fingerprint,
    }
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        checkpoint.load_weights(model, stage_dir / "last.safetensors")
        checkpoint.load_optimizer(
            optimizer, stage_dir / "last_optimizer.safetensors", state["optimizer"]
        )
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state)
        # A sampler that reshuffles per epoch continues from the resumed epoch's order.
        sampler = getattr(train_loader, "batch_sampler", None)
        if hasattr(sampler, "epoch"):
            sampler.epoch = state["epoch"]
        # A finished stage continues when --epochs or --patience now allow more epochs.
        state["finished"] = False
        state["inputs_fingerprint"] = inputs_fingerprint
        logger.info("%s: resuming after epoch %d", stage_name, state["epoch"])
    else:
        metrics_path.unlink(missing_ok=True)

    history = read_metrics(metrics_path)
    stopped_early = state["bad_epochs"] >= cfg.patience
    while not state["finished"] and state["epoch"] < cfg.max_epochs and not stopped_early:
        epoch = state["epoch"] + 1
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = _train_epoch(model, train_loader, optimizer, cfg, device, stage_name, epoch)
        scheduler.step()
        valid_metrics = validate(model, valid_loader, device)

        record = {"epoch": epoch, "lr": lr, **_prefixed("train", train_metrics)}
        record.update(_prefixed("valid", valid_metrics))
        record["seconds"] = round(time.perf_counter() - started, 3)
        value = valid_metrics[monitor]
        improved = state["best_metric"] is None or (
            value < state["best_metric"] if mode == "min" else value > state["best_metric"]
        )
        if improved:
            state.update(best_metric=value, best_epoch=epoch, bad_epochs=0)
            checkpoint.save_weights(model, stage_dir / "best.safetensors", model_config)
        else:
            state["bad_epochs"] += 1
        record["best"] = improved
        history.append(record)
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("%s epoch %d: %s", stage_name, epoch, _format_metrics(record))

        state["epoch"] = epoch
        stopped_early = state["bad_epochs"] >= cfg.patience
        _save_last(model, optimizer, scheduler, state, stage_dir, model_config)

    state["finished"] = True
    _save_last(model, optimizer, scheduler, state, stage_dir, model_config)
    checkpoint.load_weights(model, stage_dir / "best.safetensors")
    return StageResult(
        best_epoch=state["best_epoch"],
        best_metric=state["best_metric"],
        epochs_run=state["epoch"],
        stopped_early=stopped_early,
        history=history,
    )


def _train_epoch(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    stage_name: str,
    epoch: int,
) -> dict[str, float]:
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    progress = tqdm(loader, desc=f"{stage_name} epoch {epoch}", leave=False, disable=None)
    for batch in progress:
        batch = move_to_device(batch, device)
        output = model(batch)
        loss = output["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage_name} epoch {epoch}: loss is {loss.item()}; lower --lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        for name, value in output.items():
            if name.endswith("loss"):
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        steps += 1
        progress.set_postfix(loss=f"{loss.item():.4f}")
    if steps == 0:
        raise ValueError(f"{stage_name}: the training set is empty; check the prepared samples")
    return {name: total / steps for name, total in totals.items()}


def _save_last(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    stage_dir: Path,
    model_config: dict[str, Any],
) -> None:
    checkpoint.save_weights(model, stage_dir / "last.safetensors", model_config)
    state["optimizer"] = checkpoint.save_optimizer(
        optimizer, stage_dir / "last_optimizer.safetensors"
    )
    state["scheduler"] = scheduler.state_dict()
    state["torch_rng"] = torch.get_rng_state().tolist()
    checkpoint.write_json(stage_dir / "trainer_state.json", state)


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch_rng" in state:
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Return the per-epoch records of a ``metrics.jsonl`` file, or [] when it is missing."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def _format_metrics(record: dict[str, Any]) -> str:
    parts = []
    for name, value in record.items():
        if name == "epoch" or isinstance(value, bool):
            continue
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{name}={value:.4g}")
    return " ".join(parts)
