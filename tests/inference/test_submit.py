import numpy as np
import polars as pl
import pytest

from cartformer.inference.submit import (
    IncompleteSubmissionError,
    check_complete,
    order_submission,
    write_submission,
)


def scores_frame():
    return pl.DataFrame(
        {
            "request_id": pl.Series([7, 7, 3, 7, 3], dtype=pl.UInt64),
            "product_id": pl.Series([1, 2, 1, 3, 4], dtype=pl.UInt64),
            "index": [10, 11, 12, 13, 14],
            "score": [0.1, 0.9, -1.0, 0.1, 2.0],
        }
    )


def test_order_by_request_then_score():
    submission = order_submission(scores_frame())
    assert submission.columns == ["index", "request_id"]
    assert submission["index"].to_list() == [11, 10, 13, 14, 12]
    assert submission["request_id"].to_list() == [7, 7, 7, 3, 3]


def test_complete_indices_pass():
    check_complete(np.array([3, 1, 2]), np.array([1, 2, 3]))


@pytest.mark.parametrize(
    ("submitted", "problem"),
    [([1, 2], "1 missing"), ([1, 2, 3, 3], "1 repeated"), ([1, 2, 3, 9], "1 not in the requests")],
)
def test_incomplete_indices_rejected(submitted, problem):
    with pytest.raises(IncompleteSubmissionError, match=problem) as error:
        check_complete(np.array(submitted), np.array([1, 2, 3]))
    assert len(str(error.value).splitlines()) == 1


def write_pair(tmp_path, scores, requests):
    scores_path = tmp_path / "scores.parquet"
    requests_path = tmp_path / "requests.parquet"
    scores.write_parquet(scores_path)
    requests.write_parquet(requests_path)
    return scores_path, requests_path


def test_writes_csv(tmp_path):
    scores = scores_frame()
    scores_path, requests_path = write_pair(tmp_path, scores, scores.drop("score"))
    path = write_submission(scores_path, tmp_path / "submission.csv", requests_path)
    written = pl.read_csv(path)
    assert written.columns == ["index", "request_id"]
    assert written["index"].to_list() == [11, 10, 13, 14, 12]


def test_row_missing_from_scores(tmp_path):
    scores = scores_frame()
    scores_path, requests_path = write_pair(tmp_path, scores.head(4), scores.drop("score"))
    with pytest.raises(IncompleteSubmissionError, match=r"1 missing \(e.g. \[14\]\)"):
        write_submission(scores_path, tmp_path / "submission.csv", requests_path)
    assert not (tmp_path / "submission.csv").exists()


def test_scores_without_index(tmp_path):
    scores = scores_frame()
    scores_path, requests_path = write_pair(tmp_path, scores.drop("index"), scores)
    with pytest.raises(ValueError, match="no column 'index'; score a requests file"):
        write_submission(scores_path, tmp_path / "submission.csv", requests_path)


def test_nan_score_rejected(tmp_path):
    scores = scores_frame().with_columns(pl.Series("score", [0.1, float("nan"), 0, 0, 0]))
    scores_path, requests_path = write_pair(tmp_path, scores, scores)
    with pytest.raises(ValueError, match="1 null or NaN"):
        write_submission(scores_path, tmp_path / "submission.csv", requests_path)


def test_requests_file_needed(tmp_path):
    scores = scores_frame()
    scores_path, _ = write_pair(tmp_path, scores, scores)
    with pytest.raises(ValueError, match="pass --requests"):
        write_submission(scores_path, tmp_path / "submission.csv")
