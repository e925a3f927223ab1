import polars as pl

from cartformer.cli import main


def test_score_then_submit(scoring_run, requests_file, recent_requests, tmp_path, caplog):
    caplog.set_level("INFO")
    scores = tmp_path / "scores.parquet"
    submission = tmp_path / "submission.csv"
    code = main(
        [
            "score",
            "--run",
            str(scoring_run),
            "--requests",
            str(requests_file),
            "--output",
            str(scores),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert main(["submit", "--scores", str(scores), "--output", str(submission)]) == 0
    written = pl.read_csv(submission)
    assert written.columns == ["index", "request_id"]
    assert sorted(written["index"].to_list()) == sorted(recent_requests["index"].to_list())
    assert f"scores to {scores}" in (scoring_run / "cartformer.log").read_text()


def test_score_missing_column_one_line(scoring_run, recent_requests, tmp_path, capsys):
    path = tmp_path / "requests.parquet"
    recent_requests.drop("product_id").write_parquet(path)
    code = main(
        ["score", "--run", str(scoring_run), "--requests", str(path), "--output", "x.parquet"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "'product_id'" in err


def test_submit_incomplete_one_line(scoring_run, requests_file, tmp_path, capsys):
    scores = tmp_path / "scores.parquet"
    args = ["--run", str(scoring_run), "--requests", str(requests_file)]
    assert main(["score", *args, "--output", str(scores), "--device", "cpu"]) == 0
    pl.read_parquet(scores).head(10).write_parquet(scores)
    capsys.readouterr()
    code = main(
        [
            "submit",
            "--scores",
            str(scores),
            "--requests",
            str(requests_file),
            "--output",
            str(tmp_path / "submission.csv"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "missing" in err


def test_batch_default_shared():
    from cartformer.inference import commands, score

    assert commands.DEFAULT_BATCH_TOKENS == score.DEFAULT_BATCH_TOKENS
