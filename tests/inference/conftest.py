"""A small run to score with: the tiny demo, prepared, and a finetune model with random weights."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn

from cartformer.config import RunConfig
from cartformer.data.demo import write_demo
from cartformer.model import FinetuneModel
from cartformer.pipeline import RunLayout, build_backbone, model_config_from_meta, run_prepare
from cartformer.training import checkpoint

DAY = 24 * 60 * 60
MAX_HISTORY = 16


def build_scoring_run(root: Path, seed: int = 5, side_features: bool = False) -> Path:
    """Write a run directory whose `scratch` variant has random weights.

    The history window is 16 events, much shorter than the tiny demo's histories, so scoring
    needs several windows per user. The history-match offsets and the bias get random values,
    so every part of the logit varies. `side_features` turns on the categorical, text and
    time features, whose tables get random values too.
    """
    data = root / "demo" / "train.parquet"
    write_demo(data, size="tiny", seed=seed)
    cfg = RunConfig(data_path=str(data), out_dir=str(root))
    cfg.data.max_history = MAX_HISTORY
    cfg.model.max_seq_len = MAX_HISTORY
    cfg.model.embedding_dim = 16
    cfg.model.num_layers = 1
    cfg.model.use_categorical = cfg.model.use_text = cfg.model.use_time = side_features
    cfg.finetune.device = "cpu"
    meta = run_prepare(cfg)
    model_config_from_meta(cfg.model, meta)
    torch.manual_seed(seed)
    model = FinetuneModel(build_backbone(cfg.model, RunLayout(root).prepared), cfg.model)
    with torch.no_grad():
        nn.init.normal_(model.match_count_logit.weight)
        nn.init.normal_(model.match_recency_logit.weight)
        model.bias.fill_(0.3)
        if side_features:
            # The side-feature tables start at zero; random rows make every feature count.
            context = model.backbone.context_encoder
            for name in ("city", "store"):
                nn.init.normal_(context.tables[name].weight)
            for table in context.time.tables.values():
                nn.init.normal_(table.weight)
    stage = RunLayout(root).finetune("scratch")
    stage.mkdir(parents=True)
    checkpoint.save_weights(model, stage / "best.safetensors", cfg.to_dict()["model"])
    cfg.save(root / "config.json")
    return root


@pytest.fixture(scope="package")
def scoring_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scoring_run(tmp_path_factory.mktemp("scoring_run"))


@pytest.fixture(scope="package")
def feature_scoring_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scoring_run(tmp_path_factory.mktemp("feature_scoring_run"), side_features=True)


@pytest.fixture(scope="package")
def demo_events(scoring_run: Path) -> pl.DataFrame:
    return pl.read_parquet(scoring_run / "demo" / "train.parquet")


@pytest.fixture(scope="package")
def recent_requests(demo_events: pl.DataFrame) -> pl.DataFrame:
    """The request rows of the last 60 days without `action_type` and `position_in_request`,
    plus an `index` column that differs from the row number, as in the competition's test
    file."""
    start = demo_events["timestamp"].max() - 60 * DAY
    return (
        demo_events.filter(pl.col("timestamp") > start, pl.col("request_id").is_not_null())
        .drop("action_type", "position_in_request")
        .with_row_index("index")
        .with_columns(pl.col("index").cast(pl.Int64) * 7 + 3)
    )


@pytest.fixture
def requests_file(recent_requests: pl.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "requests.parquet"
    recent_requests.write_parquet(path)
    return path
