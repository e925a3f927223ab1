"""One training stage: AdamW, linear warm-up, per-epoch validation, early stopping, resume.

The loop is shared by pretraining and finetuning. A stage differs only in its model, its data
loaders and its ``validate`` function, which returns the epoch's validation metrics; one of them
(``monitor``) decides the best epoch.

Under torchrun (see ``cartformer.training.distributed``) every process runs this loop on its
part of each global batch, with the model wrapped in ``DistributedDataParallel``. Only rank 0
writes checkpoints, ``metrics.jsonl`` and ``trainer_state.json``.
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
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cartformer.config import TrainConfig
from cartformer.data.dataset import move_to_device
from cartformer.training import checkpoint, distributed

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


def resolve_amp(amp: str, device: torch.device) -> bool:
    """Decide whether training on ``device`` runs under bf16 autocast.

    ``amp`` is ``"auto"`` (on for CUDA devices with bf16 support, off otherwise), ``"bf16"``
    (on, on any device that autocast supports, the CPU included) or ``"off"``.
    """
    if amp == "off":
        return False
    if amp not in ("auto", "bf16"):
        raise ValueError(f"invalid --amp {amp!r}: use auto, bf16 or off")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if amp == "auto":
        return cuda_bf16
    # NOTE: bf16 autocast has run only on the CPU here; the CUDA path is written but never run.
    if device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"--amp bf16: {device} does not support bfloat16; use --amp off")
    return True


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
    The forward passes of training run under bf16 autocast when ``cfg.amp`` turns it on (see
    :func:`resolve_amp`), and ``validate`` runs in float32.

    In a process group of several processes, ``train_loader`` must give every rank the same
    number of steps (``ShardedBatchSampler`` does), and ``validate`` must return the same
    metrics on every rank, so that all ranks stop at the same epoch.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.local_device(resolve_device(cfg.device))
    model.to(device)
    use_amp = resolve_amp(cfg.amp, device)
    is_main = distributed.is_main_process()
    logger.info(
        "%s: training on %s, bf16 autocast %s", stage_name, device, "on" if use_amp else "off"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # LinearLR applies start_factor in the first epoch even with total_iters=0, so no warm-up
    # means a start factor of 1.
    start_factor = cfg.warmup_start_factor if cfg.warmup_epochs > 0 else 1.0
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=start_factor, total_iters=cfg.warmup_epochs
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
    elif is_main:
        metrics_path.unlink(missing_ok=True)
    # The other ranks read metrics.jsonl only after rank 0 has removed a stale one.
    distributed.barrier()

    trained_model = _wrap_for_group(model, device)
    history = read_metrics(metrics_path)
    stopped_early = state["bad_epochs"] >= cfg.patience
    while not state["finished"] and state["epoch"] < cfg.max_epochs and not stopped_early:
        epoch = state["epoch"] + 1
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = _train_epoch(
            trained_model, train_loader, optimizer, cfg, device, stage_name, epoch, use_amp
        )
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
            if is_main:
                checkpoint.save_weights(model, stage_dir / "best.safetensors", model_config)
        else:
            state["bad_epochs"] += 1
        record["best"] = improved
        history.append(record)
        if is_main:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        logger.info("%s epoch %d: %s", stage_name, epoch, _format_metrics(record))

        state["epoch"] = epoch
        stopped_early = state["bad_epochs"] >= cfg.patience
        if is_main:
            _save_last(model, optimizer, scheduler, state, stage_dir, model_config)

    state["finished"] = True
    if is_main:
        _save_last(model, optimizer, scheduler, state, stage_dir, model_config)
    # Every rank loads the best weights that rank 0 wrote.
    distributed.barrier()
    checkpoint.load_weights(model, stage_dir / "best.safetensors")
    return StageResult(
        best_epoch=state["best_epoch"],
        best_metric=state["best_metric"],
        epochs_run=state["epoch"],
        stopped_early=stopped_early,
        history=history,
    )


def _wrap_for_group(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel in a group of several processes.

    The wrapper shares the parameters of ``model``, so the optimizer, checkpoints and validation
    keep using ``model`` itself.
    """
    if distributed.get_world_size() <= 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _train_epoch(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    stage_name: str,
    epoch: int,
    use_amp: bool,
) -> dict[str, float]:
    """Train one epoch; return every ``*loss`` output averaged over the epoch's predictions.

    A batch's losses are means over its ``loss_weight`` predictions (events or pairs), so the
    epoch's mean weighs each batch by ``loss_weight``, summed over all ranks.
    """
    model.train()
    world_size = distributed.get_world_size()
    non_blocking = device.type == "cuda"
    names: list[str] = []
    weighted_sums: list[float] = []
    total_weight = 0.0
    steps = 0
    progress = tqdm(
        loader,
        desc=f"{stage_name} epoch {epoch}",
        leave=False,
        disable=None if distributed.is_main_process() else True,
    )
    for batch in progress:
        batch = move_to_device(batch, device, non_blocking=non_blocking)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            output = model(batch)
        if "loss_weight" not in output:
            raise ValueError(
                f"{stage_name}: the model output has no 'loss_weight' (the number of "
                "predictions behind its mean loss), which training needs to weigh batches"
            )
        if not names:
            names = [name for name in output if name.endswith("loss")]
            weighted_sums = [0.0] * len(names)
        loss = output["loss"].float()
        weight = output["loss_weight"].detach().float()
        # One host sync per step for the finiteness check, the metrics and the progress bar.
        values = torch.stack([output[name].detach().float() for name in names] + [weight])
        *losses, batch_weight = values.tolist()
        if not math.isfinite(losses[names.index("loss")]):
            raise FloatingPointError(
                f"{stage_name} epoch {epoch}: loss is {losses[names.index('loss')]}; lower --lr "
                "or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1:
            loss = loss * _rank_loss_scale(weight, world_size)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        for index, value in enumerate(losses):
            weighted_sums[index] += value * batch_weight
        total_weight += batch_weight
        steps += 1
        progress.set_postfix(loss=f"{losses[names.index('loss')]:.4f}")
    if steps == 0:
        raise ValueError(f"{stage_name}: the training set is empty; check the prepared samples")
    totals = torch.tensor([*weighted_sums, total_weight], dtype=torch.float64, device=device)
    *sums, weight_sum = distributed.all_reduce_sum(totals).tolist()
    if weight_sum == 0:
        logger.warning(
            "%s epoch %d: no batch had a prediction, so no training loss", stage_name, epoch
        )
        return {name: math.nan for name in names}
    return {name: total / weight_sum for name, total in zip(names, sums, strict=True)}


def _rank_loss_scale(weight: torch.Tensor, world_size: int) -> torch.Tensor:
    """Return the factor that makes DDP's gradient that of the whole global batch's mean loss.

    A rank's loss is a mean over its ``weight`` predictions, and DDP averages the gradients of
    the ranks. Scaling each rank's loss by ``weight * world_size / global weight`` turns that
    average into the gradient of the mean over all predictions of the global batch. A global
    batch without predictions gets a scale of 0, and so zero gradients, like a single process.
    This holds for losses that are means of per-prediction terms. The sampled softmax is not one:
    its in-batch negatives come from each rank's part only.
    """
    global_weight = distributed.all_reduce_sum(weight.clone())
    # Weights are non-negative, so a zero global weight means a zero weight here. The clamp
    # turns 0 / 0 into 0, not NaN, without a host sync.
    return weight * world_size / global_weight.clamp(min=torch.finfo(weight.dtype).tiny)


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
