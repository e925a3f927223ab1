import json
import subprocess
import sys

import polars as pl
import pytest

from cartformer.config import RunConfig
from cartformer.data.demo import write_demo
from cartformer.pipeline import run_prepare
from cartformer.ranking.catboost_stage import StageSettings, run_catboost_stage
from cartformer.ranking.periods import LeakError, Periods, check_transformer_periods

DAY = 24 * 60 * 60
A_END = 1_700_000_000


def fake_run(tmp_path, valid_end=A_END, event_time=A_END - DAY, request_time=A_END - DAY):
    """Write the three prepared files the guard reads, with the given latest timestamps."""
    prepared = tmp_path / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "meta.json").write_text(json.dumps({"split": {"valid_end": valid_end}}))
    pl.DataFrame({"timestamp": [A_END - 9 * DAY, event_time]}).write_parquet(
        prepared / "events.parquet"
    )
    pl.DataFrame({"timestamp": [request_time]}).write_parquet(prepared / "requests.parquet")
    return tmp_path


def test_run_inside_period_a_passes(tmp_path):
    assert check_transformer_periods(fake_run(tmp_path), A_END) == A_END


@pytest.mark.parametrize(
    ("latest", "source"),
    [
        ({"valid_end": A_END + 1}, "meta.json"),
        ({"event_time": A_END + 5 * DAY}, "events.parquet"),
        ({"request_time": A_END + 40 * DAY}, "requests.parquet"),
    ],
)
def test_event_after_period_a_fires(tmp_path, latest, source):
    with pytest.raises(LeakError, match=source) as error:
        check_transformer_periods(fake_run(tmp_path, **latest), A_END)
    assert len(str(error.value).splitlines()) == 1


def test_periods_follow_each_other():
    periods = Periods.from_max_timestamp(A_END, 30)
    assert periods.c_end == A_END
    assert periods.b_end == A_END - 30 * DAY
    assert periods.a_end == A_END - 60 * DAY


def test_stage_stops_on_run_trained_on_whole_file(tmp_path):
    data = tmp_path / "train.parquet"
    write_demo(data, size="tiny", seed=1)
    run = tmp_path / "whole_file_run"
    run_prepare(RunConfig(data_path=str(data), out_dir=str(run)))
    settings = StageSettings(transformer_run=str(run))
    with pytest.raises(LeakError, match="saw events up to"):
        run_catboost_stage(data, tmp_path / "stage", settings)
    assert not (tmp_path / "stage" / "catboost" / "summary.json").exists()


def test_core_modules_do_not_import_catboost():
    code = (
        "import sys, cartformer.cli, cartformer.ranking.catboost_stage, "
        "cartformer.inference.score; cartformer.cli.build_parser(); "
        "assert 'catboost' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
