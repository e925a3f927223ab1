"""End-to-end runs of the CLI on the tiny demo: every stage, reuse, resume and the report."""

import json
import logging

import polars as pl
import pytest

from cartformer.cli import main
from cartformer.config import RunConfig
from cartformer.data.demo import write_demo
from cartformer.pipeline import (
    SIDE_FEATURE_FIELDS,
    RunLayout,
    load_meta,
    model_config_from_meta,
    stage_fingerprint,
)

FAST = ["--embedding-dim", "16", "--max-history", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "train.parquet"
    write_demo(path, size="tiny", seed=3)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_file):
    out = tmp_path_factory.mktemp("run")
    code = main(
        [
            "run",
            "--data",
            str(demo_file),
            "--out",
            str(out),
            "--pretrain-epochs",
            "2",
            "--finetune-epochs",
            "2",
            *FAST,
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_run_writes_report(finished_run):
    report = (finished_run / "report.md").read_text()
    assert "| finetune: scratch | model |" in report
    assert "| user_history_count | baseline |" in report
    assert "| oracle | oracle |" in report
    assert "## Conclusion" in report
    assert (finished_run / "figures" / "pretrain_loss.png").is_file()
    assert (finished_run / "figures" / "finetune_ndcg.png").is_file()


@pytest.mark.slow
def test_run_directory_contents(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["model"]["embedding_dim"] == 16
    assert config["model"]["num_products"] > 1
    for name in ("user", "product", "source"):
        assert (finished_run / "prepared" / "mappings" / f"{name}.parquet").is_file()
    for stage in ("pretrain", "finetune-scratch", "finetune-pretrained-backbone-heads"):
        lines = (finished_run / "checkpoints" / stage / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
        assert (finished_run / "checkpoints" / stage / "best.safetensors").is_file()


@pytest.mark.slow
def test_per_request_table_shares_groups(finished_run):
    table = pl.read_parquet(finished_run / "evaluation" / "per_request_ndcg10.parquet")
    summary = json.loads((finished_run / "evaluation" / "summary.json").read_text())
    assert table.height == summary["requests"]
    for name, entry in summary["methods"].items():
        assert table[name].null_count() == 0
        assert abs(table[name].mean() - entry["ndcg10"]) < 1e-9


@pytest.mark.slow
def test_stage_reuses_finished_work(finished_run, caplog):
    caplog.set_level("INFO")
    assert main(["finetune", "--out", str(finished_run)]) == 0
    assert "finetune scratch: reusing" in caplog.text
    lines = (finished_run / "checkpoints" / "finetune-scratch" / "metrics.jsonl").read_text()
    assert len(lines.splitlines()) == 2


@pytest.mark.slow
def test_resume_continues_epochs(tmp_path, demo_file):
    out = tmp_path / "run"
    base = ["--out", str(out), "--embedding-dim", "16", "--device", "cpu"]
    prepare = ["prepare", "--data", str(demo_file), "--out", str(out), "--max-history", "64"]
    assert main(prepare) == 0
    assert main(["pretrain", "--epochs", "1", *base]) == 0
    stage = out / "checkpoints" / "pretrain"
    state = json.loads((stage / "trainer_state.json").read_text())
    state["finished"] = False
    (stage / "trainer_state.json").write_text(json.dumps(state))
    assert main(["pretrain", "--epochs", "2", "--resume", *base]) == 0
    epochs = [
        json.loads(line)["epoch"] for line in (stage / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]


@pytest.mark.slow
def test_prepare_rejects_bad_file(tmp_path, demo_file, capsys):
    frame = pl.read_parquet(demo_file).drop("timestamp")
    bad = tmp_path / "bad.parquet"
    frame.write_parquet(bad)
    code = main(["prepare", "--data", str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "timestamp" in err
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_stage_retrains_after_data_change(tmp_path, demo_file, caplog):
    out = tmp_path / "run"
    common = ["--out", str(out), "--embedding-dim", "16", "--device", "cpu", "--epochs", "1"]
    assert main(["prepare", "--data", str(demo_file), "--out", str(out)]) == 0
    assert main(["finetune", "--variants", "scratch", *common]) == 0
    assert main(["prepare", "--data", str(demo_file), "--out", str(out), "--valid-days", "20"]) == 0
    caplog.clear()
    caplog.set_level("INFO")
    assert main(["finetune", "--variants", "scratch", *common]) == 0
    assert "training it again" in caplog.text
    assert "reusing" not in caplog.text


@pytest.mark.slow
def test_prepare_rejects_too_short_span(tmp_path, demo_file, capsys):
    frame = pl.read_parquet(demo_file)
    last = frame["timestamp"].max()
    short = tmp_path / "short.parquet"
    frame.filter(pl.col("timestamp") > last - 20 * 86_400).write_parquet(short)
    code = main(["run", "--data", str(short), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "pretrain_train_users" in err
    assert len(err.splitlines()) == 1


# --- side features -------------------------------------------------------------------------------

FEATURES = ["--categorical-features", "--text-features", "--time-features"]


@pytest.mark.slow
def test_missing_optional_columns_run_id_only(tmp_path, demo_file, caplog):
    frame = pl.read_parquet(demo_file).drop(
        "city_name", "store_id", "product_name", "product_category"
    )
    ids_only = tmp_path / "ids_only.parquet"
    frame.write_parquet(ids_only)
    out = tmp_path / "run"
    caplog.set_level("WARNING")
    args = ["run", "--data", str(ids_only), "--out", str(out), "--variants", "scratch"]
    code = main([*args, "--pretrain-epochs", "1", "--finetune-epochs", "1", *FAST, *FEATURES])
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("has no column(s)" in w and "store_id" in w for w in warnings)
    assert any("categorical features are off" in w for w in warnings)
    assert any("text features are off" in w for w in warnings)
    assert all(len(w.splitlines()) == 1 for w in warnings)
    config = json.loads((out / "config.json").read_text())["model"]
    assert not config["use_categorical"]
    assert not config["use_text"]
    assert config["use_time"]


@pytest.mark.slow
def test_feature_run_scores_and_reuses(tmp_path, demo_file, caplog):
    out = tmp_path / "run"
    args = ["run", "--data", str(demo_file), "--out", str(out), "--variants", "scratch"]
    epochs = ["--pretrain-epochs", "1", "--finetune-epochs", "1"]
    assert main([*args, *epochs, *FAST, *FEATURES]) == 0
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert "finetune: scratch" in summary["methods"]
    caplog.clear()
    caplog.set_level("INFO")
    assert main(["finetune", "--out", str(out), "--variants", "scratch"]) == 0
    assert "finetune scratch: reusing" in caplog.text


def strip_side_feature_keys(out):
    """Make a run look like one written before side features existed."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for key in SIDE_FEATURE_FIELDS:
        config["model"].pop(key, None)
    for key in ("tokenizer", "text_vocab_size"):
        config["data"].pop(key, None)
    config_path.write_text(json.dumps(config, indent=2))
    meta_path = out / "prepared" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("features", None)
    for key in ("tokenizer", "text_vocab_size"):
        meta["config"].pop(key, None)
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def id_only_fingerprint(out):
    cfg = RunConfig.load(out / "config.json")
    cfg.out_dir = str(out)
    for switch in ("use_categorical", "use_text", "use_time"):
        setattr(cfg.model, switch, False)
    layout = RunLayout(out)
    model_config_from_meta(cfg.model, load_meta(layout))
    return stage_fingerprint(cfg, layout, cfg.finetune, "scratch")


@pytest.mark.slow
def test_old_id_only_run_reused(tmp_path, demo_file, caplog):
    """A run prepared and trained before side features existed keeps its stages, also after
    its data gets side features for another model."""
    out = tmp_path / "run"
    args = ["run", "--data", str(demo_file), "--out", str(out), "--variants", "scratch"]
    epochs = ["--pretrain-epochs", "1", "--finetune-epochs", "1"]
    assert main(["prepare", "--data", str(demo_file), "--out", str(out), *FAST[2:4]]) == 0
    strip_side_feature_keys(out)
    assert main([*args, *epochs, *FAST]) == 0
    strip_side_feature_keys(out)

    caplog.clear()
    caplog.set_level("INFO")
    assert main(["run", "--out", str(out), "--variants", "scratch"]) == 0
    assert "prepare: reusing" in caplog.text
    assert "finetune scratch: reusing" in caplog.text

    before = id_only_fingerprint(out)
    caplog.clear()
    assert main(["run", "--out", str(out), "--variants", "scratch", *FEATURES]) == 0
    assert "building the side features" in caplog.text
    assert id_only_fingerprint(out) == before

    caplog.clear()
    off = ["--no-text-features", "--no-categorical-features", "--no-time-features"]
    assert main(["run", "--out", str(out), "--variants", "scratch", *off]) == 0
    assert "prepare: reusing" in caplog.text


@pytest.mark.slow
def test_ablation_writes_table(tmp_path, demo_file):
    out = tmp_path / "ablation"
    args = ["ablation", "--data", str(demo_file), "--out", str(out), "--arms", "id-only", "all"]
    epochs = ["--pretrain-epochs", "1", "--finetune-epochs", "1"]
    assert main([*args, *epochs, *FAST]) == 0
    report = (out / "ablation.md").read_text()
    assert "| id-only | none | pretrained-backbone |" in report
    assert "| all | categorical, text, time | pretrained-backbone |" in report
    summary = json.loads((out / "ablation.json").read_text())
    arms = {row["arm"]: row for row in summary["arms"]}
    assert arms["all"]["requests"] == arms["id-only"]["requests"]
    assert arms["all"]["parameters"] > arms["id-only"]["parameters"]
    assert arms["id-only"]["pretrain_valid_loss"] is not None
    assert (out / "arms" / "all" / "prepared").is_symlink()
    assert summary["preparation"]["timings"]["tokenize"] >= 0
