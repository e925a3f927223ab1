"""The stages of a run: prepare, pretrain, finetune, evaluate.

Every stage reads and writes inside one run directory::

    RUN/config.json                 the full configuration
    RUN/prepared/                   mappings, events, requests, samples, meta.json
    RUN/checkpoints/pretrain/       best/last weights, optimizer, metrics.jsonl
    RUN/checkpoints/finetune-*/     one directory per finetune variant
    RUN/evaluation/                 per-request NDCG@10 of every model and baseline
    RUN/report.md, RUN/figures/     the report and its learning curves

A stage reuses what earlier stages left in the directory, so ``finetune`` after ``pretrain``
needs no options besides ``--out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from cartformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from cartformer.data.dataset import (
    FinetuneDataset,
    LengthBucketBatchSampler,
    PretrainDataset,
    TokenBudgetBatchSampler,
    collate,
    move_to_device,
)
from cartformer.data.demo import oracle_path_for
from cartformer.data.prepare import SIDE_FEATURE_GROUPS, prepare
from cartformer.data.side_features import load_product_text
from cartformer.evaluation.baselines import compute_baseline_scores, load_validation_groups
from cartformer.evaluation.metrics import ndcg_at_k
from cartformer.evaluation.oracle import oracle_scores
from cartformer.evaluation.report import (
    MethodResult,
    plot_learning_curves,
    render_report,
)
from cartformer.model import Backbone, FinetuneModel, PretrainModel
from cartformer.model.layers import side_features
from cartformer.model.pretrain import count_target_products
from cartformer.training import checkpoint, distributed
from cartformer.training.loop import StageResult, read_metrics, resolve_device, train_stage

logger = logging.getLogger(__name__)

FINETUNE_VARIANTS = ("scratch", "pretrained-backbone", "pretrained-backbone-heads")
"""Finetune initializations: random weights, the pretrain backbone, the backbone plus the
pretrain fusion and projector heads."""

CONFIG_FILE = "config.json"


class RunLayout:
    """Paths inside a run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.config = self.root / CONFIG_FILE
        self.prepared = self.root / "prepared"
        self.meta = self.prepared / "meta.json"
        self.checkpoints = self.root / "checkpoints"
        self.pretrain = self.checkpoints / "pretrain"
        self.evaluation = self.root / "evaluation"
        self.figures = self.root / "figures"
        self.report = self.root / "report.md"

    def finetune(self, variant: str) -> Path:
        return self.checkpoints / f"finetune-{variant}"


def load_meta(layout: RunLayout) -> dict[str, Any]:
    if not layout.meta.is_file():
        raise FileNotFoundError(
            f"{layout.meta} not found; run `cartformer prepare --data FILE --out {layout.root}` first"
        )
    return json.loads(layout.meta.read_text())


def model_config_from_meta(cfg: ModelConfig, meta: dict[str, Any]) -> ModelConfig:
    """Fill the vocabulary sizes of ``cfg`` from the prepared data's meta.json.

    A side feature that the prepared data lacks (the input had no such column, or the data was
    prepared before side features existed) is switched off with one logged line.
    """
    vocab = meta["vocab_sizes"]
    cfg.num_products = int(vocab["product"])
    cfg.num_sources = int(vocab["source"])
    features = meta.get("features", {})
    feature_vocab = features.get("vocab_sizes", {})
    categorical = features.get("categorical", [])
    cfg.num_cities = int(feature_vocab.get("city", 0)) if "city" in categorical else 0
    cfg.num_stores = int(feature_vocab.get("store", 0)) if "store" in categorical else 0
    cfg.num_text_tokens = int(feature_vocab.get("text_token", 0)) if features.get("text") else 0
    if cfg.use_categorical and max(cfg.num_cities, cfg.num_stores) < 2:
        logger.warning(
            "the prepared data has no city or store values, so the categorical features are "
            "off for this run (the input needs city_name or store_id)"
        )
        cfg.use_categorical = False
    if cfg.use_text and cfg.num_text_tokens == 0:
        logger.warning(
            "the prepared data has no product texts, so the text features are off for this run "
            "(the input needs product_name or product_category)"
        )
        cfg.use_text = False
    return cfg


SIDE_FEATURE_SWITCHES = ("use_categorical", "use_text", "use_time")
SIDE_FEATURE_FIELDS = (
    *SIDE_FEATURE_SWITCHES,
    "cross_layers",
    "utc_offset_hours",
    "num_gap_buckets",
    "num_cities",
    "num_stores",
    "num_text_tokens",
)
"""ModelConfig fields of the side features. An id-only model ignores them, so they stay out
of its stage fingerprint, which keeps the fingerprints of runs made before they existed."""


def uses_side_features(cfg: ModelConfig) -> bool:
    return any(getattr(cfg, name) for name in SIDE_FEATURE_SWITCHES)


def prepared_groups(cfg: ModelConfig) -> tuple[str, ...]:
    """Return the side-feature groups the prepare stage must build for a model of ``cfg``."""
    groups = {"categorical": cfg.use_categorical, "text": cfg.use_text}
    return tuple(group for group in SIDE_FEATURE_GROUPS if groups[group])


# Data settings that only the text features read; an id-only stage ignores them.
_TEXT_DATA_FIELDS = ("tokenizer", "text_vocab_size")


def fingerprint_meta_text(layout: RunLayout, cfg: ModelConfig) -> str:
    """Return the meta.json text that the stage fingerprint of a ``cfg`` model hashes.

    A model with side features hashes the whole text. An id-only model hashes it without the
    side features and the text settings, in the format of the file, so building side
    features for another model, or a meta.json written before they existed, keeps its stages.
    """
    text = layout.meta.read_text()
    if uses_side_features(cfg):
        return text
    meta = json.loads(text)
    meta.pop("features", None)
    for key in _TEXT_DATA_FIELDS:
        meta.get("config", {}).pop(key, None)
    return json.dumps(meta, indent=2, ensure_ascii=False) + "\n"


def build_backbone(model_cfg: ModelConfig, prepared_dir: str | Path | None = None) -> Backbone:
    """Build a backbone; with ``use_text`` its product token bags come from ``prepared_dir``."""
    text_bags = None
    if model_cfg.use_text:
        if prepared_dir is None:
            raise ValueError("a model with text features needs the prepared directory's texts")
        text_bags = load_product_text(prepared_dir)
    return Backbone(model_cfg, text_bags=text_bags)


# --- prepare -------------------------------------------------------------------------------------


def run_prepare(
    cfg: RunConfig, force: bool = False, side_features: Collection[str] | None = None
) -> dict[str, Any]:
    """Validate and prepare ``cfg.data_path`` into RUN/prepared.

    ``side_features`` lists the groups of `SIDE_FEATURE_GROUPS` to build, by default those
    that ``cfg.model`` switches on. An earlier result is reused when it was made from the same
    file (path, size and modification time) with the same data config and has those groups.
    """
    layout = RunLayout(cfg.out_dir)
    if not cfg.data_path:
        raise ValueError("no input file: pass --data PATH to a Lavka-schema parquet file")
    data_path = Path(cfg.data_path)
    if not data_path.is_file():
        raise FileNotFoundError(f"input file not found: {data_path}; check --data")
    try:
        pl.read_parquet_schema(data_path)
    except (pl.exceptions.PolarsError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"cannot read {data_path} as parquet ({first_line}); pass a Lavka-schema parquet file"
        ) from error
    fingerprint = _file_fingerprint(data_path)
    data_config = json.loads(json.dumps(cfg.to_dict()["data"]))
    groups = set(prepared_groups(cfg.model) if side_features is None else side_features)
    if layout.meta.is_file() and not force:
        meta = json.loads(layout.meta.read_text())
        # Settings added since the directory was prepared count with their defaults.
        defaults = json.loads(json.dumps(dataclasses.asdict(DataConfig())))
        stored_config = {**defaults, **meta.get("config", {})}
        same_input = meta.get("input_file") == fingerprint and stored_config == data_config
        prepared = set(meta.get("features", {}).get("prepared", []))
        if same_input and groups <= prepared:
            logger.info("prepare: reusing %s", layout.prepared)
            _check_samples_exist(meta)
            return meta
        if same_input:
            # Keep the groups built before, so that switching features back does not prepare
            # the data once more.
            groups |= prepared
            logger.info("prepare: building the side features %s, preparing again", sorted(groups))
        else:
            logger.info("prepare: the input file or the data config changed, preparing again")
    meta = prepare(data_path, layout.prepared, cfg.data, side_features=groups)
    meta["input_file"] = fingerprint
    checkpoint.write_json(layout.meta, meta)
    _check_samples_exist(meta)
    return meta


def _check_samples_exist(meta: dict[str, Any]) -> None:
    """Stop before training when a sample set came out empty, naming the split that caused it."""
    counts = meta.get("counts", {})
    split = meta.get("split", {})
    empty = [
        name
        for name in (
            "pretrain_train_users",
            "pretrain_valid_users",
            "finetune_train_requests",
            "finetune_valid_requests",
        )
        if counts.get(name, 1) == 0
    ]
    if empty:
        raise ValueError(
            f"the prepared data has no {', '.join(empty)} (training ends "
            f"{split.get('train_end_iso', '?')}, validation {split.get('valid_start_iso', '?')} "
            f"to {split.get('valid_end_iso', '?')}); check that the file spans more than "
            "--valid-days + --gap-days, that no stray late timestamp moves the split, and that "
            "requests exist outside ST_Catalog; see prepared/meta.json for every dropped count"
        )


def _file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# --- data loaders --------------------------------------------------------------------------------


def make_loader(
    dataset: PretrainDataset | FinetuneDataset,
    cfg: TrainConfig,
    shuffle: bool,
    *,
    shard: bool = False,
) -> DataLoader:
    """Build a data loader. A training loader batches users of similar history length in random
    order, within a budget of ``cfg.batch_tokens`` padded events (or ``cfg.batch_size`` users
    when it is 0). An evaluation loader keeps the file order because the baselines use the same order.

    With ``shard`` in a process group of N processes, a training loader gives this rank its part
    of each global batch. The global batches have N times the budget, so they are the batches of
    one process with that budget. An evaluation loader gives this rank every N-th sample.
    Without a group, ``shard`` changes nothing.
    """
    rank, world_size = (distributed.get_rank(), distributed.get_world_size()) if shard else (0, 1)
    common = {
        "collate_fn": collate,
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
        "pin_memory": resolve_device(cfg.device).type == "cuda",
    }
    lengths = dataset.history_lengths
    if shuffle:
        if cfg.batch_tokens > 0:
            sampler: Sampler[list[int]] = TokenBudgetBatchSampler(
                lengths, cfg.batch_tokens * world_size, seed=cfg.seed
            )
        else:
            sampler = LengthBucketBatchSampler(lengths, cfg.batch_size * world_size, seed=cfg.seed)
        if world_size > 1:
            sampler = distributed.ShardedBatchSampler(sampler, lengths, rank, world_size)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    if world_size > 1:
        indices = distributed.shard_indices(len(dataset), rank, world_size).tolist()
        batches = BatchSampler(indices, cfg.batch_size, drop_last=False)
        return DataLoader(dataset, batch_sampler=batches, **common)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, **common)


# --- pretrain ------------------------------------------------------------------------------------


@torch.inference_mode()
def validate_pretrain(
    model: torch.nn.Module, loader: Any, device: torch.device
) -> dict[str, float]:
    """Mean pretrain losses over all predicted events of ``loader``.

    In a process group, the sums are added up over the ranks' loaders, so every rank returns the
    means over all their events. Every rank must call this.
    """
    model.eval()
    names = ("loss", "retrieval_loss", "feedback_loss")
    # (len(names) + 1,) float64: the loss sums weighted by predictions, then the prediction count.
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    for batch in loader:
        output = model(move_to_device(batch, device, non_blocking=device.type == "cuda"))
        weight = output["loss_weight"].double()
        sums += torch.stack([output[name].double() * weight for name in names] + [weight])
    *totals, count = distributed.all_reduce_sum(sums).tolist()
    if count == 0:
        raise ValueError("pretrain validation has no predicted events; check the prepared data")
    return {name: total / count for name, total in zip(names, totals, strict=True)}


def build_pretrain_model(
    model_cfg: ModelConfig,
    train_set: PretrainDataset | None = None,
    prepared_dir: str | Path | None = None,
) -> PretrainModel:
    """Build a pretrain model.

    ``train_set`` supplies the product counts among the training targets that the sampled
    softmax's logQ correction needs. A model about to load a checkpoint gets them from the
    checkpoint instead. ``prepared_dir`` supplies the product texts of a model with text
    features.
    """
    target_counts = None
    if train_set is not None and model_cfg.softmax == "sampled":
        target_counts = count_target_products(train_set, model_cfg.num_products)
    return PretrainModel(build_backbone(model_cfg, prepared_dir), model_cfg, target_counts)


def run_pretrain(cfg: RunConfig, resume: bool = False) -> StageResult | None:
    """Pretrain on next-positive and feedback prediction; keep the epoch with the lowest loss."""
    layout = RunLayout(cfg.out_dir)
    meta = load_meta(layout)
    model_config_from_meta(cfg.model, meta)
    fingerprint = stage_fingerprint(cfg, layout, cfg.pretrain)
    if _stage_finished(layout.pretrain, fingerprint) and not resume:
        logger.info("pretrain: reusing %s", layout.pretrain)
        return None
    torch.manual_seed(cfg.pretrain.seed)
    features = side_features(cfg.model)
    train_set = PretrainDataset(layout.prepared / "pretrain_train.parquet", features)
    model = build_pretrain_model(cfg.model, train_set, layout.prepared)
    train = make_loader(train_set, cfg.pretrain, True, shard=True)
    valid = make_loader(
        PretrainDataset(layout.prepared / "pretrain_valid.parquet", features),
        cfg.pretrain,
        False,
        shard=True,
    )
    return train_stage(
        model,
        train,
        valid,
        validate_pretrain,
        cfg.pretrain,
        layout.pretrain,
        monitor="loss",
        mode="min",
        model_config=cfg.to_dict()["model"],
        resume=resume,
        stage_name="pretrain",
        inputs_fingerprint=fingerprint,
    )


# --- finetune ------------------------------------------------------------------------------------


def predict_finetune(
    model: torch.nn.Module, loader: Any, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Score every candidate of ``loader`` in order.

    Returns:
        logits (C,), targets (C,), request lengths (R,) and the mean loss over the ordered pairs
        of all batches (0 when there is no pair).
    """
    logits, targets, lengths, loss_sum, num_pairs = _score_finetune(model, loader, device)
    if lengths.size == 0:
        raise ValueError("finetune validation is empty; check the prepared data")
    return logits, targets, lengths, loss_sum / max(num_pairs, 1.0)


@torch.inference_mode()
def _score_finetune(
    model: torch.nn.Module, loader: Any, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Return logits (C,), targets (C,), request lengths (R,), the pair loss sum and the number
    of ordered pairs of ``loader``. An empty loader gives empty arrays."""
    model.eval()
    logits, targets, lengths = [], [], []
    # (2,) float64: the loss summed over ordered pairs, then the number of pairs.
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        batch = move_to_device(batch, device, non_blocking=device.type == "cuda")
        output = model(batch)
        logits.append(output["logits"].float().cpu().numpy())
        targets.append(batch["candidates"]["target"].cpu().numpy())
        lengths.append(batch["requests"]["lengths"].cpu().numpy())
        weight = output["loss_weight"].double()
        sums += torch.stack([output["loss"].double() * weight, weight])
    loss_sum, num_pairs = sums.tolist()
    if not lengths:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.float32), empty, empty, loss_sum, num_pairs
    return (
        np.concatenate(logits),
        np.concatenate(targets),
        np.concatenate(lengths),
        loss_sum,
        num_pairs,
    )


def validate_finetune(
    model: torch.nn.Module, loader: Any, device: torch.device
) -> dict[str, float]:
    """Validation loss (mean over ordered pairs) and NDCG@10 averaged over requests with more
    than one product.

    In a process group, the per-request NDCG@10 and the loss are summed over the ranks' loaders,
    so every rank returns the metrics of all requests. Every rank must call this.
    """
    logits, targets, lengths, loss_sum, num_pairs = _score_finetune(model, loader, device)
    scored = ndcg_at_k(logits, targets, lengths, k=10)[lengths > 1] if lengths.size else lengths
    totals = torch.tensor(
        [float(scored.sum()), scored.size, loss_sum, num_pairs], dtype=torch.float64, device=device
    )
    ndcg_sum, num_scored, loss_sum, num_pairs = distributed.all_reduce_sum(totals).tolist()
    if num_scored == 0:
        raise ValueError(
            "finetune validation has no request with more than one product; check the prepared data"
        )
    return {"loss": loss_sum / max(num_pairs, 1.0), "ndcg10": ndcg_sum / num_scored}


def mean_ndcg(scores: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> float:
    per_request = ndcg_at_k(scores, targets, lengths, k=10)
    return float(per_request[lengths > 1].mean())


def build_finetune_model(cfg: RunConfig, variant: str) -> FinetuneModel:
    """Create a finetune model initialized as ``variant`` specifies."""
    if variant not in FINETUNE_VARIANTS:
        raise ValueError(f"unknown finetune variant {variant!r}; choose from {FINETUNE_VARIANTS}")
    layout = RunLayout(cfg.out_dir)
    if variant == "scratch":
        return FinetuneModel(build_backbone(cfg.model, layout.prepared), cfg.model)
    best = layout.pretrain / "best.safetensors"
    if not best.is_file():
        raise FileNotFoundError(
            f"{best} not found; variant {variant} needs `cartformer pretrain --out {layout.root}` first"
        )
    pretrain_config = stored_model_config(best)
    pretrain_config.history_match = cfg.model.history_match
    pretrained = build_pretrain_model(pretrain_config, prepared_dir=layout.prepared)
    checkpoint.load_weights(pretrained, best)
    init = "backbone" if variant == "pretrained-backbone" else "backbone+heads"
    return FinetuneModel.from_pretrain(pretrained, init=init)


def run_finetune(
    cfg: RunConfig, variants: tuple[str, ...] = FINETUNE_VARIANTS, resume: bool = False
) -> dict[str, StageResult | None]:
    """Finetune each variant with the pairwise loss; keep the epoch with the best NDCG@10."""
    layout = RunLayout(cfg.out_dir)
    meta = load_meta(layout)
    model_config_from_meta(cfg.model, meta)
    features = side_features(cfg.model)
    train_set = FinetuneDataset(layout.prepared / "finetune_train.parquet", features)
    valid_set = FinetuneDataset(layout.prepared / "finetune_valid.parquet", features)
    results: dict[str, StageResult | None] = {}
    for variant in variants:
        stage_dir = layout.finetune(variant)
        upstream = () if variant == "scratch" else (_pretrain_fingerprint(layout),)
        fingerprint = stage_fingerprint(cfg, layout, cfg.finetune, variant, *upstream)
        if _stage_finished(stage_dir, fingerprint) and not resume:
            logger.info("finetune %s: reusing %s", variant, stage_dir)
            results[variant] = None
            continue
        torch.manual_seed(cfg.finetune.seed)
        model = build_finetune_model(cfg, variant)
        results[variant] = train_stage(
            model,
            make_loader(train_set, cfg.finetune, True, shard=True),
            make_loader(valid_set, cfg.finetune, False, shard=True),
            validate_finetune,
            cfg.finetune,
            stage_dir,
            monitor="ndcg10",
            mode="max",
            model_config=cfg.to_dict()["model"],
            resume=resume,
            stage_name=f"finetune {variant}",
            inputs_fingerprint=fingerprint,
        )
    return results


def _pretrain_fingerprint(layout: RunLayout) -> str:
    state_path = layout.pretrain / "trainer_state.json"
    if not state_path.is_file():
        return ""
    return str(json.loads(state_path.read_text()).get("inputs_fingerprint", ""))


def load_finetuned(cfg: RunConfig, variant: str) -> FinetuneModel:
    """Load the best checkpoint of a finetune variant."""
    layout = RunLayout(cfg.out_dir)
    path = layout.finetune(variant) / "best.safetensors"
    model_config = stored_model_config(path)
    model = FinetuneModel(build_backbone(model_config, layout.prepared), model_config)
    checkpoint.load_weights(model, path)
    return model


def stored_model_config(path: Path) -> ModelConfig:
    """Return the model config saved in a checkpoint, so a model is rebuilt as it was trained even
    when the run's config.json changed since."""
    stored = checkpoint.read_config(path)
    if not stored:
        raise ValueError(f"{path} has no model config in its metadata; train the stage again")
    defaults = ModelConfig()
    known = {k: v for k, v in stored.items() if hasattr(defaults, k)}
    return ModelConfig(**known)


def finished_variants(cfg: RunConfig) -> list[str]:
    layout = RunLayout(cfg.out_dir)
    return [v for v in FINETUNE_VARIANTS if (layout.finetune(v) / "best.safetensors").is_file()]


def _stage_finished(stage_dir: Path, fingerprint: str) -> bool:
    """Check whether the stage finished on the same prepared data and settings. A stage trained
    on other inputs is logged and trained again."""
    state_path = stage_dir / "trainer_state.json"
    if not state_path.is_file():
        return False
    state = json.loads(state_path.read_text())
    if not state.get("finished"):
        return False
    if state.get("inputs_fingerprint") != fingerprint:
        logger.info("%s was trained on other data or settings; training it again", stage_dir)
        return False
    return True


def stage_fingerprint(
    cfg: RunConfig, layout: RunLayout, train_cfg: TrainConfig, *extra: str
) -> str:
    """Hash of what a stage's result depends on: the prepared data, the model config, the
    optimization settings (not the epoch limits) and ``extra`` upstream fingerprints."""
    optimization = {
        key: value
        for key, value in dataclasses.asdict(train_cfg).items()
        if key not in ("max_epochs", "patience", "num_workers", "device")
    }
    model = dataclasses.asdict(cfg.model)
    if not uses_side_features(cfg.model):
        model = {key: value for key, value in model.items() if key not in SIDE_FEATURE_FIELDS}
    payload = json.dumps(
        [fingerprint_meta_text(layout, cfg.model), model, optimization, *extra],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def device_for(cfg: RunConfig) -> torch.device:
    return resolve_device(cfg.finetune.device)


# --- evaluate ------------------------------------------------------------------------------------


@distributed.main_process_only(default=list)
def run_evaluate(cfg: RunConfig) -> list[MethodResult]:
    """Score the validation requests with every finetuned variant, the baselines and the oracle,
    then write RUN/evaluation/ and RUN/report.md.

    In a process group only rank 0 evaluates; the other ranks wait for it and return [].
    """
    layout = RunLayout(cfg.out_dir)
    meta = load_meta(layout)
    model_config_from_meta(cfg.model, meta)
    targets, lengths, request_ids, users = load_validation_groups(layout.prepared)
    keep = lengths > 1
    dropped = int((~keep).sum())
    if dropped:
        logger.info(
            "evaluate: %d validation requests with a single product are not scored", dropped
        )

    results: list[MethodResult] = []
    device = device_for(cfg)
    # Variants read the same file; each set of side features is loaded once.
    valid_sets: dict[tuple[str, ...], FinetuneDataset] = {}
    for variant in finished_variants(cfg):
        model = load_finetuned(cfg, variant).to(device)
        features = side_features(model.config)
        if features not in valid_sets:
            valid_sets[features] = FinetuneDataset(
                layout.prepared / "finetune_valid.parquet", features
            )
        valid_set = valid_sets[features]
        logits, model_targets, model_lengths, _ = predict_finetune(
            model, make_loader(valid_set, cfg.finetune, shuffle=False), device
        )
        if not (np.array_equal(model_lengths, lengths) and np.array_equal(model_targets, targets)):
            raise RuntimeError("model and baseline validation groups differ; prepare the run again")
        per_request = ndcg_at_k(logits, targets, lengths, k=10)[keep]
        results.append(MethodResult(f"finetune: {variant}", "model", per_request))

    for name, scores in compute_baseline_scores(layout.prepared, seed=cfg.data.seed).items():
        results.append(
            MethodResult(name, "baseline", ndcg_at_k(scores, targets, lengths, k=10)[keep])
        )

    if cfg.oracle_path and not Path(cfg.oracle_path).is_file():
        raise FileNotFoundError(
            f"oracle file not found: {cfg.oracle_path}; fix --oracle or drop it"
        )
    oracle_path = cfg.oracle_path or _default_oracle_path(cfg.data_path)
    if oracle_path:
        scores = oracle_scores(layout.prepared, oracle_path)
        if scores is not None:
            results.append(
                MethodResult("oracle", "oracle", ndcg_at_k(scores, targets, lengths, k=10)[keep])
            )

    layout.evaluation.mkdir(parents=True, exist_ok=True)
    table = {"request_id": request_ids[keep], "user": users[keep]}
    table.update({r.name: r.per_request for r in results})
    pl.DataFrame(table).write_parquet(layout.evaluation / "per_request_ndcg10.parquet")
    summary = {r.name: {"kind": r.kind, "ndcg10": r.mean} for r in results}
    checkpoint.write_json(
        layout.evaluation / "summary.json", {"requests": int(keep.sum()), "methods": summary}
    )

    pretrain_history = read_metrics(layout.pretrain / "metrics.jsonl")
    finetune_histories = {
        v: read_metrics(layout.finetune(v) / "metrics.jsonl") for v in finished_variants(cfg)
    }
    figures = plot_learning_curves(pretrain_history, finetune_histories, layout.figures)
    text = render_report(
        results, meta, pretrain_history, finetune_histories, figures, layout.root, cfg.to_dict()
    )
    layout.report.write_text(text)
    logger.info("evaluate: wrote %s", layout.report)
    return results


def _default_oracle_path(data_path: str) -> str:
    if not data_path:
        return ""
    candidate = oracle_path_for(data_path)
    return str(candidate) if candidate.is_file() else ""
