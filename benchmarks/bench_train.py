"""Training throughput: cartformer's batches and model against a straightforward padded one.

For pretrain and finetune at the default model size, each mode below trains from the same
initial weights on the same prepared samples for a fixed wall-time budget. It reports events/s
(real history events), users/s, predicted events/s (pretrain) or candidates/s (finetune), the
padding share of the attention, and the peak RSS of this process so far.

Modes:
    padded: a plain implementation, `cartformer.model.reference`: batches of 16 users in
        random order, every feature padded to (B, L); the feed-forward runs on padding, and in
        pretraining every head scores every padded position against the catalogue before
        masking.
    ours-users: cartformer's model (unpadded projections and feed-forward, fused causal
        attention, heads on predicted events only) on batches of 16 users of similar length.
    ours-tokens: cartformer's model on its default training batches, at most 4,096 padded
        events each (`TokenBudgetBatchSampler`).
    ours-tokens-wN: ours-tokens with N DataLoader worker processes.

Model FLOPs per event are counted on one batch of each mode with
`torch.utils.flop_counter.FlopCounterMode` (matmuls forward and backward), plus the causal
attention, which the counter does not see on the CPU: 4 * D * (t + 1) forward FLOPs for the
query at position t per layer, doubled for the backward. The fraction of the machine's
matmul peak divides achieved model FLOP/s by the FLOP/s of a 2048^3 float32 matmul.

Usage:
    cartformer prepare --data full.parquet --out RUN
    python benchmarks/bench_train.py RUN --seconds 60 --json train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from cartformer.config import ModelConfig
from cartformer.data.dataset import (
    FinetuneDataset,
    LengthBucketBatchSampler,
    PretrainDataset,
    TokenBudgetBatchSampler,
    collate,
)
from cartformer.model import Backbone, FinetuneModel, PretrainModel
from cartformer.model.losses import calibrated_pairwise_logistic
from cartformer.model.reference import padded_finetune_scores, padded_pretrain_losses
from cartformer.pipeline import RunLayout, load_meta, model_config_from_meta

USERS_PER_BATCH = 16
TOKENS_PER_BATCH = 4096
WARMUP_STEPS = 2

LossFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]


def matmul_flops(size: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of the fastest of `repeat` float32 (size x size) @ (size x size) products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention_flops(lengths: torch.Tensor, config: ModelConfig, padded: bool) -> float:
    """Forward + backward FLOPs of causal attention over a batch of sequences (B,) long.

    Fused causal kernels skip keys after the query; a masked padded kernel computes all L keys
    of all L queries of every sequence.
    """
    dim, layers = config.embedding_dim, config.num_layers
    if padded:
        keys = len(lengths) * int(lengths.max()) ** 2
    else:
        lengths = lengths.double()
        keys = float((lengths * (lengths + 1) / 2).sum())
    return 3 * 4 * dim * keys * layers


def pretrain_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(batch)["loss"]


def padded_pretrain_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return padded_pretrain_losses(model, batch)["loss"]


def finetune_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(batch)["loss"]


def padded_finetune_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    logits = padded_finetune_scores(model, batch)
    return calibrated_pairwise_logistic(
        logits, batch["candidates"]["target"], batch["requests"]["lengths"]
    )


def batch_counts(batch: dict[str, Any]) -> dict[str, float]:
    lengths = batch["history"]["lengths"]
    counts = {
        "events": float(lengths.sum()),
        "users": float(lengths.numel()),
        "padded_events": float(lengths.numel() * lengths.max()),
    }
    if "candidates" in batch:
        counts["items"] = float(batch["candidates"]["product"].numel())
    else:
        counts["items"] = float(batch["history"]["target_lengths"].sum())
    return counts


def count_flops(
    model: torch.nn.Module, loss_fn: LossFn, batch: dict[str, Any], padded: bool
) -> float:
    """Forward + backward FLOPs of one training step on `batch`."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    config = model.backbone.config
    return counter.get_total_flops() + attention_flops(batch["history"]["lengths"], config, padded)


def run_mode(
    model: torch.nn.Module,
    loss_fn: LossFn,
    loader: Iterable[dict[str, Any]],
    seconds: float,
    padded: bool,
) -> dict[str, float]:
    """Train for `seconds` after WARMUP_STEPS steps and return throughput figures."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    totals = {"events": 0.0, "users": 0.0, "padded_events": 0.0, "items": 0.0}
    steps, elapsed, flops, flop_events = 0, 0.0, 0.0, 0.0
    iterator = iter(loader)
    step = 0
    while True:
        fetch_started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        fetch_seconds = time.perf_counter() - fetch_started
        if step == WARMUP_STEPS:
            # One extra pass over a real batch, outside the timed steps, to count its FLOPs.
            flops = count_flops(model, loss_fn, batch, padded)
            flop_events = batch_counts(batch)["events"]
        started = time.perf_counter()
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds = time.perf_counter() - started
        step += 1
        if step <= WARMUP_STEPS + 1:
            continue
        elapsed += step_seconds + fetch_seconds
        steps += 1
        for name, value in batch_counts(batch).items():
            totals[name] += value
        if elapsed >= seconds:
            break
    return {
        "steps": steps,
        "seconds": elapsed,
        "events_per_s": totals["events"] / elapsed,
        "users_per_s": totals["users"] / elapsed,
        "items_per_s": totals["items"] / elapsed,
        "padding_share": 1 - totals["events"] / totals["padded_events"],
        "events_per_step": totals["events"] / steps,
        "flops_per_event": flops / flop_events,
        "peak_rss_mib": peak_rss_mib(),
    }


def make_loader(dataset: Any, mode: str, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    if mode == "padded":
        return DataLoader(
            dataset,
            batch_size=USERS_PER_BATCH,
            shuffle=True,
            collate_fn=collate,
            generator=generator,
        )
    if mode == "ours-users":
        sampler: Any = LengthBucketBatchSampler(dataset.history_lengths, USERS_PER_BATCH, seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    workers = int(mode.split("-w")[1]) if "-w" in mode else 0
    sampler = TokenBudgetBatchSampler(dataset.history_lengths, TOKENS_PER_BATCH, seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def bench_stage(
    stage: str, prepared: Path, config: ModelConfig, modes: list[str], seconds: float
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    if stage == "pretrain":
        dataset: Any = PretrainDataset(prepared / "pretrain_train.parquet")
        model: torch.nn.Module = PretrainModel(Backbone(config), config)
        losses = {"padded": padded_pretrain_loss, "ours": pretrain_loss}
    else:
        dataset = FinetuneDataset(prepared / "finetune_train.parquet")
        model = FinetuneModel(Backbone(config), config)
        losses = {"padded": padded_finetune_loss, "ours": finetune_loss}
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    rows = []
    for mode in modes:
        model.load_state_dict(initial)
        loss_fn = losses["padded" if mode == "padded" else "ours"]
        loader = make_loader(dataset, mode, seed=0)
        result = run_mode(model, loss_fn, loader, seconds, padded=mode == "padded")
        result.update(stage=stage, mode=mode, load=os.getloadavg()[0])
        print(json.dumps(result), flush=True)
        rows.append(result)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory with prepared/ (cartformer prepare)")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed seconds per mode")
    parser.add_argument("--stages", nargs="+", default=["pretrain", "finetune"])
    parser.add_argument(
        "--modes", nargs="+", default=["padded", "ours-users", "ours-tokens", "ours-tokens-w1"]
    )
    parser.add_argument("--json", type=Path, help="write all results to this file")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    layout = RunLayout(args.run)
    config = ModelConfig()
    model_config_from_meta(config, load_meta(layout))
    peak = matmul_flops()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s, torch threads {torch.get_num_threads()}")
    rows = []
    for stage in args.stages:
        rows.extend(bench_stage(stage, layout.prepared, config, args.modes, args.seconds))
    for row in rows:
        achieved = row["flops_per_event"] * row["events_per_s"]
        row["model_flops_per_s"] = achieved
        row["peak_fraction"] = achieved / peak
    for stage in args.stages:
        stage_rows = [row for row in rows if row["stage"] == stage]
        baseline = next((r for r in stage_rows if r["mode"] == "padded"), None)
        print(f"\n{stage}")
        header = (
            "| mode | events/s | users/s | items/s | padding | GFLOP/event |"
            " share of matmul peak | vs padded |"
        )
        print(header)
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in stage_rows:
            ratio = row["events_per_s"] / baseline["events_per_s"] if baseline else np.nan
            print(
                f"| {row['mode']} | {row['events_per_s']:,.0f} | {row['users_per_s']:.2f} | "
                f"{row['items_per_s']:,.0f} | {row['padding_share']:.0%} | "
                f"{row['flops_per_event'] / 1e9:.4f} | {row['peak_fraction']:.1%} | "
                f"{ratio:.2f}x |"
            )
    if args.json:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
        payload = {"matmul_flops": peak, "machine": machine, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
