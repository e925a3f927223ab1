"""The side-feature ablation: the same run with each feature group switched on in turn.

`cartformer ablation --data FILE --out DIR` prepares the data once into DIR/prepared and then
trains one run per arm in DIR/arms/<arm>/, whose `prepared` is a symbolic link to the shared
directory. Every arm pretrains, finetunes the chosen variants and is evaluated on the same
validation requests. DIR/ablation.md and DIR/ablation.json hold the table.

Arms: `id-only`, `categorical` (city and store), `text` (product name and category), `time`
(hour, weekday, month and gap) and `all`. An arm whose features the input lacks is skipped
with one logged line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cartformer import pipeline
from cartformer.config import RunConfig
from cartformer.data.prepare import SIDE_FEATURE_GROUPS
from cartformer.evaluation.report import (
    AblationArm,
    ablation_conclusion,
    ablation_rows,
    render_ablation,
)
from cartformer.training import distributed
from cartformer.training.loop import read_metrics

logger = logging.getLogger(__name__)

ABLATION_ARMS: dict[str, tuple[str, ...]] = {
    "id-only": (),
    "categorical": ("categorical",),
    "text": ("text",),
    "time": ("time",),
    "all": ("categorical", "text", "time"),
}
"""Arm name -> the side-feature groups it switches on."""
FEATURE_SWITCHES = {"categorical": "use_categorical", "text": "use_text", "time": "use_time"}
DEFAULT_VARIANTS = ("pretrained-backbone",)
ARMS_DIR = "arms"
REPORT_FILE = "ablation.md"
SUMMARY_FILE = "ablation.json"


def arm_config(cfg: RunConfig, arm: str) -> RunConfig:
    """Return a copy of `cfg` for one arm: its own run directory and feature switches."""
    if arm not in ABLATION_ARMS:
        raise ValueError(f"unknown ablation arm {arm!r}; choose from {list(ABLATION_ARMS)}")
    arm_cfg = copy.deepcopy(cfg)
    arm_cfg.out_dir = str(Path(cfg.out_dir) / ARMS_DIR / arm)
    for group, switch in FEATURE_SWITCHES.items():
        setattr(arm_cfg.model, switch, group in ABLATION_ARMS[arm])
    return arm_cfg


def available_groups(meta: dict[str, Any]) -> set[str]:
    """Return the feature groups that the prepared data supports."""
    features = meta.get("features", {})
    groups = {"time"}
    if features.get("categorical"):
        groups.add("categorical")
    if features.get("text"):
        groups.add("text")
    return groups


def run_ablation(
    cfg: RunConfig,
    arms: Sequence[str] = tuple(ABLATION_ARMS),
    variants: Sequence[str] = DEFAULT_VARIANTS,
    resume: bool = False,
) -> list[AblationArm]:
    """Prepare once, train and evaluate every arm, and write DIR/ablation.md and .json.

    `cfg.out_dir` is DIR. Arms reuse finished stages like `cartformer run` does, so a stopped
    ablation continues where it stopped. Returns the evaluated arms in the order of `arms`.
    """
    unknown = [arm for arm in arms if arm not in ABLATION_ARMS]
    if unknown:
        raise ValueError(f"unknown ablation arms {unknown}; choose from {list(ABLATION_ARMS)}")
    root = Path(cfg.out_dir)
    if distributed.is_main_process():
        pipeline.run_prepare(cfg, side_features=SIDE_FEATURE_GROUPS)
    distributed.barrier()
    meta = pipeline.load_meta(pipeline.RunLayout(root))
    supported = available_groups(meta)

    evaluated: list[AblationArm] = []
    for arm in arms:
        missing = [group for group in ABLATION_ARMS[arm] if group not in supported]
        if missing:
            logger.warning("ablation: skipping arm %s, the input has no %s features", arm, missing)
            continue
        arm_cfg = arm_config(cfg, arm)
        if distributed.is_main_process():
            _link_prepared(root, Path(arm_cfg.out_dir))
            arm_cfg.save(Path(arm_cfg.out_dir) / pipeline.CONFIG_FILE)
        distributed.barrier()
        logger.info("ablation: arm %s in %s", arm, arm_cfg.out_dir)
        pipeline.run_pretrain(arm_cfg, resume=resume)
        pipeline.run_finetune(arm_cfg, tuple(variants), resume=resume)
        if distributed.is_main_process():
            arm_cfg.save(Path(arm_cfg.out_dir) / pipeline.CONFIG_FILE)
        pipeline.run_evaluate(arm_cfg)
        distributed.barrier()
        if distributed.is_main_process():
            evaluated.extend(collect_arm(arm_cfg, arm, variants))

    if distributed.is_main_process() and evaluated:
        write_ablation(root, evaluated, meta, cfg, variants)
    return evaluated


def collect_arm(cfg: RunConfig, arm: str, variants: Sequence[str]) -> list[AblationArm]:
    """Read one arm's evaluation, parameter count and epoch times; one entry per variant."""
    layout = pipeline.RunLayout(cfg.out_dir)
    table = pl.read_parquet(layout.evaluation / "per_request_ndcg10.parquet")
    pretrain_history = read_metrics(layout.pretrain / "metrics.jsonl")
    pretrain_loss = (
        min(record["valid_loss"] for record in pretrain_history) if pretrain_history else None
    )
    results = []
    for variant in variants:
        column = f"finetune: {variant}"
        if column not in table.columns:
            raise ValueError(f"arm {arm} has no evaluation of variant {variant}; rerun it")
        model = pipeline.load_finetuned(cfg, variant)
        finetune_history = read_metrics(layout.finetune(variant) / "metrics.jsonl")
        results.append(
            AblationArm(
                name=arm if len(variants) == 1 else f"{arm} ({variant})",
                features=ABLATION_ARMS[arm],
                variant=variant,
                per_request=table[column].to_numpy(),
                pretrain_valid_loss=pretrain_loss,
                parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                pretrain_epoch_seconds=_mean_seconds(pretrain_history),
                finetune_epoch_seconds=_mean_seconds(finetune_history),
            )
        )
    return results


def write_ablation(
    root: Path,
    arms: list[AblationArm],
    meta: dict[str, Any],
    cfg: RunConfig,
    variants: Sequence[str],
) -> Path:
    """Write DIR/ablation.md and DIR/ablation.json and return the Markdown path."""
    layout = pipeline.RunLayout(root)
    timings_path = layout.prepared / "features" / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    preparation = {
        **meta.get("features", {}),
        "timings": timings,
        "data_path": meta.get("data_path", cfg.data_path),
    }
    settings = {
        "variants": list(variants),
        "pretrain": dataclasses.asdict(cfg.pretrain),
        "finetune": dataclasses.asdict(cfg.finetune),
        "model": {
            key: value
            for key, value in dataclasses.asdict(cfg.model).items()
            if key not in FEATURE_SWITCHES.values()
        },
    }

    text = render_ablation(arms, preparation, settings)
    path = root / REPORT_FILE
    path.write_text(text)
    summary = {
        "arms": _json_safe(ablation_rows(arms)),
        "conclusion": ablation_conclusion(arms),
        "preparation": preparation,
        "settings": settings,
    }
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    logger.info("ablation: wrote %s", path)
    return path


def _link_prepared(root: Path, arm_dir: Path) -> None:
    """Point `arm_dir/prepared` at the shared `root/prepared` with a relative symbolic link."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    link = arm_dir / "prepared"
    if link.is_symlink() or link.exists():
        if link.resolve() != (root / "prepared").resolve():
            raise FileExistsError(
                f"{link} exists and is not a link to {root / 'prepared'}; remove it and rerun"
            )
        return
    link.symlink_to(os.path.relpath(root / "prepared", arm_dir), target_is_directory=True)


def _mean_seconds(history: list[dict[str, Any]]) -> float | None:
    seconds = [record["seconds"] for record in history if "seconds" in record]
    return float(np.mean(seconds)) if seconds else None


def _json_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace NaN by None so that the summary is valid JSON."""
    return [
        {
            key: (None if isinstance(value, float) and np.isnan(value) else value)
            for key, value in row.items()
        }
        for row in rows
    ]
