"""Run configuration: every hyperparameter and path of a run, saved as JSON in the run directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DAY_SECONDS = 24 * 60 * 60


@dataclass
class DataConfig:
    """Settings of the validation split and of the pretrain and finetune samples."""

    valid_days: float = 30.0
    gap_days: float = 2.0
    min_history: int = 5
    max_history: int = 512
    max_requests: int = 512
    min_request_size: int = 10
    lag_min_days: float = 2.0
    lag_max_days: float = 32.0
    excluded_surfaces: tuple[str, ...] = ("ST_Catalog",)
    seed: int = 0
    # Tokenizer of product_name and product_category: a Hugging Face hub name or local
    # directory loaded through transformers, or "" to train WordPiece on the training period's
    # product texts.
    tokenizer: str = ""
    text_vocab_size: int = 8192  # target vocabulary of the trained WordPiece tokenizer


@dataclass
class ModelConfig:
    """Sizes of the backbone and heads. Vocabulary sizes come from the prepared data."""

    embedding_dim: int = 64
    num_heads: int = 2
    num_layers: int = 2
    dropout: float = 0.1
    # Dropout on attention weights. 0 lets SDPA use its fused causal kernel on the CPU, about
    # 1.5x faster per finetune step; None ties it to dropout as torch's encoder layer does.
    attention_dropout: float | None = 0.0
    max_seq_len: int = 512
    num_products: int = 0
    num_sources: int = 0
    num_actions: int = 4
    min_temperature: float = 0.01
    max_temperature: float = 100.0
    feedback_loss_weight: float = 10.0
    history_match: bool = True  # finetune logit offsets for the candidate's count in the history
    softmax: str = "full"  # pretrain retrieval loss: "full" catalogue or "sampled" negatives
    num_negatives: int = 4096  # uniform negatives per step of the sampled softmax
    logq_correction: bool = True  # subtract log sampling probability in the sampled softmax
    # Side features, one switch per ablation group; all off is the id-only model.
    use_categorical: bool = False  # city and store embeddings in the event and request context
    use_text: bool = False  # product name and category token bags in the item encoder
    use_time: bool = False  # hour, weekday, month and gap-to-previous-event embeddings
    cross_layers: int = 2  # DCN cross layers that combine the item's id and text vectors
    utc_offset_hours: float = 3.0  # time zone of hour, weekday and month: Moscow, UTC+3
    num_gap_buckets: int = 64  # log buckets of the gap to the previous event, 0 = none
    num_cities: int = 0  # vocabulary sizes of the side features, from the prepared data
    num_stores: int = 0
    num_text_tokens: int = 0


@dataclass
class TrainConfig:
    """Optimizer, schedule and loop settings of one training stage."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 3
    warmup_start_factor: float = 0.1
    batch_size: int = 16  # users per batch when batch_tokens is 0, and in evaluation
    batch_tokens: int = 4096  # padded history events per training batch; 0: batch_size users
    max_epochs: int = 100
    patience: int = 10
    grad_clip: float = 0.0
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast: "auto" (on for CUDA, off for CPU), "bf16" or "off"


@dataclass
class RunConfig:
    """The full configuration of a run directory."""

    data_path: str = ""
    out_dir: str = ""
    oracle_path: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build a config from a dict, rejecting keys that no field has."""
        return _from_dict(cls, values, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; valid keys are {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = getattr(cls(), name) if name in fields else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
