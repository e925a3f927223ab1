import polars as pl
import pytest

from cartformer.data.encoding import IdMapping
from cartformer.data.schema import InvalidDataError
from cartformer.inference.inputs import read_event_log, read_requests


def requests_frame(**overrides):
    frame = pl.DataFrame(
        {
            "user_id": pl.Series([1, 1, 2], dtype=pl.UInt64),
            "request_id": pl.Series([10, 10, 20], dtype=pl.UInt64),
            "product_id": pl.Series([5, 6, 5], dtype=pl.UInt64),
            "timestamp": [1_700_000_000, 1_700_000_000, 1_700_000_100],
            "source_type": ["ST_Main", "ST_Main", None],
            "index": [0, 1, 2],
        }
    )
    return frame.with_columns(**overrides) if overrides else frame


def write(frame, tmp_path):
    path = tmp_path / "requests.parquet"
    frame.write_parquet(path)
    return path


def test_reads_test_file_schema(tmp_path):
    frame = read_requests(write(requests_frame(), tmp_path))
    assert frame.columns == [
        "user_id",
        "request_id",
        "product_id",
        "timestamp",
        "source_type",
        "index",
    ]
    assert frame["index"].dtype == pl.Int64
    assert frame.height == 3


def test_missing_column_named(tmp_path):
    with pytest.raises(InvalidDataError, match=r"\['user_id'\].*add them"):
        read_requests(write(requests_frame().drop("user_id"), tmp_path))


def test_null_user_id_named(tmp_path):
    frame = requests_frame(user_id=pl.Series([1, None, 2], dtype=pl.UInt64))
    with pytest.raises(InvalidDataError, match="'user_id' has 1 null"):
        read_requests(write(frame, tmp_path))


def test_null_request_id_named(tmp_path):
    frame = requests_frame(request_id=pl.Series([10, None, 20], dtype=pl.UInt64))
    with pytest.raises(InvalidDataError, match="'request_id' has 1 null"):
        read_requests(write(frame, tmp_path))


def test_millisecond_timestamps_rejected(tmp_path):
    frame = requests_frame(timestamp=pl.col("timestamp") * 1000)
    with pytest.raises(InvalidDataError, match="divide milliseconds by 1000"):
        read_requests(write(frame, tmp_path))


def test_float_index_rejected(tmp_path):
    frame = requests_frame(index=pl.col("index").cast(pl.Float64))
    with pytest.raises(InvalidDataError, match="'index' has dtype"):
        read_requests(write(frame, tmp_path))


def test_null_index_rejected(tmp_path):
    frame = requests_frame(index=pl.Series([0, None, 2]))
    with pytest.raises(InvalidDataError, match="'index' has 1 null"):
        read_requests(write(frame, tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="requests file not found"):
        read_requests(tmp_path / "absent.parquet")


def test_not_parquet(tmp_path):
    path = tmp_path / "requests.parquet"
    path.write_text("index,request_id\n")
    with pytest.raises(ValueError, match="cannot read requests file"):
        read_requests(path)


def test_event_log_missing_column(tmp_path):
    path = write(requests_frame(), tmp_path)
    products = IdMapping.fit("product", pl.Series([5, 6], dtype=pl.UInt64))
    sources = IdMapping.fit("source", pl.Series(["ST_Main"]))
    with pytest.raises(InvalidDataError, match="event log .*'action_type'"):
        read_event_log(path, pl.Series([1], dtype=pl.UInt64), 2**40, 0, products, sources)
