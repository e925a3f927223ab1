"""The competition's submission file from a scores file.

The submission is a CSV with the columns `index,request_id`. Requests follow the order in which
they first appear in the scores, and within a request the rows go by descending score, ties by
ascending `index`. Before writing, the index values are checked against the requests file:
every index must appear exactly once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from cartformer.inference.inputs import INDEX_COLUMN, scan_parquet_file
from cartformer.inference.score import read_score_metadata

logger = logging.getLogger(__name__)

SUBMISSION_COLUMNS: tuple[str, ...] = (INDEX_COLUMN, "request_id")
_MAX_EXAMPLES = 3


class IncompleteSubmissionError(ValueError):
    """The submission's index values differ from the requests file's."""


def order_submission(scores: pl.DataFrame) -> pl.DataFrame:
    """Order scored rows for the submission.

    Args:
        scores: (N,) rows with `request_id`, `index` and `score`.

    Returns:
        (N,) rows with `index` (Int64) and `request_id` (UInt64): requests in order of first
        appearance, rows of a request by descending score, ties by ascending index.
    """
    return (
        scores.with_row_index("__row")
        .with_columns(pl.col("__row").min().over("request_id").alias("__first"))
        .sort(["__first", "score", INDEX_COLUMN], descending=[False, True, False])
        .select(pl.col(INDEX_COLUMN).cast(pl.Int64), pl.col("request_id").cast(pl.UInt64))
    )


def check_complete(submitted: np.ndarray, expected: np.ndarray) -> None:
    """Raise `IncompleteSubmissionError` unless `submitted` contains each `expected` index once.

    Args:
        submitted: (N,) int64 index values of the submission.
        expected: (M,) int64 index values of the requests file, each once.
    """
    values, counts = np.unique(submitted, return_counts=True)
    repeated = values[counts > 1]
    missing = np.setdiff1d(expected, values)
    extra = np.setdiff1d(values, expected)
    if repeated.size or missing.size or extra.size:
        raise IncompleteSubmissionError(
            f"the submission does not list every index of the requests file exactly once: "
            f"{missing.size} missing (e.g. {missing[:_MAX_EXAMPLES].tolist()}), "
            f"{repeated.size} repeated (e.g. {repeated[:_MAX_EXAMPLES].tolist()}) and "
            f"{extra.size} not in the requests file (e.g. {extra[:_MAX_EXAMPLES].tolist()}); "
            "score the same requests file again and pass it with --requests"
        )


def write_submission(
    scores_path: str | Path, output_path: str | Path, requests_path: str | Path | None = None
) -> Path:
    """Write the submission CSV of a scores file written by `cartformer score`.

    `requests_path=None` takes the requests file recorded in the scores file's metadata.
    Raises ValueError with one line on a scores file without `index`, `request_id` or `score`,
    on null or NaN scores, and `IncompleteSubmissionError` when the index values do not match
    the requests file's.
    """
    scores_path = Path(scores_path)
    lazy = scan_parquet_file(scores_path, "scores file")
    names = lazy.collect_schema().names()
    for column in ("request_id", INDEX_COLUMN, "score"):
        if column not in names:
            fix = (
                "score a requests file that has an integer index column, as the competition's "
                "test file has"
                if column == INDEX_COLUMN
                else "pass a file that `cartformer score` wrote"
            )
            raise ValueError(f"scores file {scores_path} has no column {column!r}; {fix}")
    scores = lazy.select("request_id", INDEX_COLUMN, "score").collect()
    bad_scores = scores["score"].null_count() + int(scores["score"].is_nan().sum())
    if bad_scores:
        raise ValueError(
            f"scores file {scores_path} has {bad_scores} null or NaN scores; score the requests "
            "file again"
        )

    if requests_path is None:
        recorded = read_score_metadata(scores_path).get("requests_file")
        if not recorded:
            raise ValueError(
                f"scores file {scores_path} does not record its requests file; pass --requests"
            )
        requests_path = recorded
    requests = scan_parquet_file(requests_path, "requests file")
    if INDEX_COLUMN not in requests.collect_schema().names():
        raise ValueError(
            f"requests file {requests_path} has no column 'index', so the submission cannot be "
            "checked; pass the requests file that was scored"
        )
    expected = requests.select(pl.col(INDEX_COLUMN).cast(pl.Int64)).collect().to_series()
    if expected.null_count() or expected.n_unique() != expected.len():
        raise ValueError(
            f"requests file {requests_path} has null or repeated 'index' values; every row "
            "needs its own index"
        )

    submission = order_submission(scores)
    check_complete(submission[INDEX_COLUMN].to_numpy(), expected.to_numpy())
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    submission.write_csv(output_path)
    logger.info(
        "wrote %d rows of %d requests to %s",
        submission.height,
        submission["request_id"].n_unique(),
        output_path,
    )
    return output_path
