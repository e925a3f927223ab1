import json

import pytest

from cartformer.cli import main
from cartformer.config import RunConfig
from cartformer.data.demo import write_demo
from cartformer.ranking.catboost_stage import (
    TRANSFORMER_FEATURE,
    WITH_TRANSFORMER,
    WITHOUT_TRANSFORMER,
    StageSettings,
    run_catboost_stage,
)
from cartformer.ranking.features import FEATURE_NAMES

pytest.importorskip("catboost")


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("catboost_stage")
    data = root / "train.parquet"
    write_demo(data, size="tiny", seed=2)
    config = RunConfig()
    config.model.embedding_dim = 16
    config.model.num_layers = 1
    config.data.max_history = config.model.max_seq_len = 64
    config.finetune.max_epochs = 1
    settings = StageSettings(iterations=20, device="cpu", thread_count=1)
    summary = run_catboost_stage(data, root / "out", settings, config)
    return root, summary


@pytest.mark.slow
def test_report_has_both_rankers(stage):
    root, summary = stage
    methods = summary["methods"]
    for name in (WITH_TRANSFORMER, WITHOUT_TRANSFORMER, "transformer score alone"):
        assert 0.0 <= methods[name]["ndcg10"] <= 1.0
    report = (root / "out" / "catboost" / "report.md").read_text()
    assert f"| {WITH_TRANSFORMER} |" in report
    assert f"| {WITHOUT_TRANSFORMER} |" in report
    stored = json.loads((root / "out" / "catboost" / "summary.json").read_text())
    assert stored["methods"] == methods


@pytest.mark.slow
def test_importance_rank_of_transformer_score(stage):
    _, summary = stage
    importance = summary["feature_importance"]
    names = [entry["feature"] for entry in importance["ranking"]]
    assert sorted(names) == sorted([*FEATURE_NAMES, TRANSFORMER_FEATURE])
    assert names[importance["transformer_score_rank"] - 1] == TRANSFORMER_FEATURE


@pytest.mark.slow
def test_transformer_trained_on_period_a_only(stage):
    root, summary = stage
    seen = summary["transformer"]["latest_event_seen"]
    assert seen <= summary["periods"]["a_end"]
    meta = json.loads((root / "out" / "transformer" / "prepared" / "meta.json").read_text())
    assert meta["split"]["valid_end"] <= summary["periods"]["a_end"]


@pytest.mark.slow
def test_evaluation_groups_are_period_c(stage):
    _, summary = stage
    groups = summary["groups"]
    assert groups["evaluation_requests"] == summary["counts"]["requests_C"]
    assert (
        groups["train_requests"] + groups["early_stopping_requests"]
        == (summary["counts"]["requests_B"])
    )


def test_cli_rejects_zero_epochs(tmp_path, capsys):
    code = main(
        [
            "catboost",
            "--data",
            str(tmp_path / "x.parquet"),
            "--out",
            str(tmp_path),
            "--patience",
            "0",
        ]
    )
    assert code == 2
    assert "--patience must be at least 1" in capsys.readouterr().err
