"""End-to-end runs of the CLI on the tiny demo: every stage, reuse, resume and the report."""

import json

import polars as pl
import pytest

from cartformer.cli import main
from cartformer.data.demo import write_demo

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
