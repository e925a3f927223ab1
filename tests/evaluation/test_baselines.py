import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cartformer.evaluation.baselines import (
    compute_baseline_scores,
    load_validation_groups,
    user_history_scores,
)
from cartformer.evaluation.metrics import ndcg_at_k

TRAIN_END = 1000

# Encoded positive events (user, product, action, timestamp) with actions 1 = cart, 2 = click and
# 3 = purchase.
# Up to TRAIN_END: user 1 bought product 7 three times and clicked products 2 and 8 once each.
# User 2 put product 3 twice and products 5 and 1 once into the cart.
# After TRAIN_END: carts that would change the expected scores if they counted.
EVENTS = [
    (1, 7, 3, 100),
    (1, 7, 3, 200),
    (1, 7, 3, 300),
    (1, 2, 2, 400),
    (1, 8, 2, 500),
    (1, 7, 1, 1500),
    (1, 2, 1, 1600),
    (1, 2, 1, 1700),
    (1, 2, 1, 1800),
    (2, 3, 1, 50),
    (2, 3, 1, 60),
    (2, 5, 1, 70),
    (2, 1, 1, 80),
    (2, 4, 1, 2000),
    (2, 4, 1, 2001),
    (2, 4, 1, 2002),
    (2, 4, 1, 2003),
    (2, 4, 1, 2004),
]

# One row per user, user 2 first to check that file order is kept.
VALID_ROWS = [
    {
        "user": 2,
        "request_id": [2001],
        "request_size": [2],
        "candidate_product": [3, 4],
        "candidate_target": [0, 1],
    },
    {
        "user": 1,
        "request_id": [1001, 1002],
        "request_size": [4, 4],
        "candidate_product": [2, 4, 7, 8, 1, 3, 5, 8],
        "candidate_target": [0, 0, 1, 0, 1, 0, 0, 0],
    },
]

# Cart counts up to TRAIN_END: product 1 -> 1, product 3 -> 2, product 5 -> 1, others 0.
EXPECTED_POPULARITY = [2, 0, 0, 0, 0, 0, 1, 2, 1, 0]
# Popularity values {0, 1, 2} give tie-break fractions 0, 1/3 and 2/3.
EXPECTED_USER_HISTORY = [2 + 2 / 3, 0, 1, 0, 3, 1, 1 / 3, 2 / 3, 1 / 3, 1]


def write_prepared(
    directory: Path,
    events: list[tuple[int, int, int, int]] = EVENTS,
    valid_rows: list[dict] = VALID_ROWS,
    meta: dict | None = None,
) -> Path:
    """Write the prepared files that the baselines read, following docs/architecture.md."""
    directory.mkdir(parents=True, exist_ok=True)
    user, product, action, timestamp = (list(column) for column in zip(*events, strict=True))
    pl.DataFrame(
        {
            "user": pl.Series(user, dtype=pl.Int32),
            "product": pl.Series(product, dtype=pl.Int32),
            "source": pl.Series([1] * len(events), dtype=pl.Int32),
            "action": pl.Series(action, dtype=pl.Int8),
            "timestamp": pl.Series(timestamp, dtype=pl.Int64),
        }
    ).sort("user", "timestamp").write_parquet(directory / "events.parquet")
    pl.DataFrame(
        valid_rows,
        schema={
            "user": pl.Int32,
            "request_id": pl.List(pl.UInt64),
            "request_size": pl.List(pl.Int32),
            "candidate_product": pl.List(pl.Int32),
            "candidate_target": pl.List(pl.Int8),
        },
    ).write_parquet(directory / "finetune_valid.parquet")
    meta = {"split": {"train_end": TRAIN_END, "valid_end": 3000}} if meta is None else meta
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared")


def test_groups_follow_file_order(prepared: Path) -> None:
    groups = load_validation_groups(prepared)

    assert groups.targets.tolist() == [0, 1, 0, 0, 1, 0, 1, 0, 0, 0]
    assert groups.lengths.tolist() == [2, 4, 4]
    assert groups.request_id.tolist() == [2001, 1001, 1002]
    assert groups.user.tolist() == [2, 1, 1]


def test_groups_dtypes(prepared: Path) -> None:
    targets, lengths, request_id, user = load_validation_groups(prepared)

    assert targets.dtype == np.int8
    assert lengths.dtype == np.int64
    assert request_id.dtype == np.uint64
    assert user.dtype == np.int64


def test_groups_keep_large_request_ids(tmp_path: Path) -> None:
    rows = [dict(VALID_ROWS[0], request_id=[2**64 - 1])]
    prepared = write_prepared(tmp_path, valid_rows=rows)

    assert load_validation_groups(prepared).request_id.tolist() == [2**64 - 1]


def test_popularity_counts_carts_up_to_train_end(prepared: Path) -> None:
    scores = compute_baseline_scores(prepared)

    assert scores["popularity"].tolist() == EXPECTED_POPULARITY


def test_popularity_ignores_purchases_and_clicks(prepared: Path) -> None:
    # Product 7 has three purchases and product 2 a click up to TRAIN_END, but no cart.
    scores = compute_baseline_scores(prepared)["popularity"]

    assert scores[4] == 0.0
    assert scores[2] == 0.0


def test_user_history_values(prepared: Path) -> None:
    scores = compute_baseline_scores(prepared)["user_history_count"]

    np.testing.assert_allclose(scores, EXPECTED_USER_HISTORY, rtol=0, atol=1e-12)


def test_user_history_ranks_bought_product_first(prepared: Path) -> None:
    scores = compute_baseline_scores(prepared)["user_history_count"]
    request_1001 = scores[2:6]

    assert int(np.argmax(request_1001)) == 2


def test_user_history_ignores_events_after_train_end(prepared: Path) -> None:
    # Product 4 has five carts by user 2 after TRAIN_END, product 2 three carts by user 1.
    scores = compute_baseline_scores(prepared)["user_history_count"]

    assert scores[1] == 0.0
    assert scores[2] == 1.0


def test_user_history_one_count_beats_popularity(prepared: Path) -> None:
    # In request 1002 user 1 clicked product 8 once, and product 3 is the most popular.
    scores = compute_baseline_scores(prepared)["user_history_count"]

    assert scores[9] > scores[7]
    assert scores[7] > scores[6]


def test_user_history_tie_break_below_one() -> None:
    popularity = np.array([0, 5, 1000, 7])
    scores = user_history_scores(
        event_user=np.array([1]),
        event_product=np.array([1]),
        candidate_user=np.array([1, 1, 1, 2]),
        candidate_product=np.array([1, 2, 3, 2]),
        popularity=popularity,
    )

    assert scores[0] > scores[1]
    assert scores[1] > scores[2]
    assert scores[1] < 1.0
    assert scores[3] == scores[1]


def test_user_history_without_events() -> None:
    scores = user_history_scores(
        event_user=np.array([], dtype=np.int64),
        event_product=np.array([], dtype=np.int64),
        candidate_user=np.array([1, 1]),
        candidate_product=np.array([1, 2]),
        popularity=np.array([0, 0, 3]),
    )

    assert scores.tolist() == [0.0, 0.5]


def test_random_is_seeded(prepared: Path) -> None:
    first = compute_baseline_scores(prepared, seed=1)["random"]
    again = compute_baseline_scores(prepared, seed=1)["random"]
    other = compute_baseline_scores(prepared, seed=2)["random"]

    assert first.shape == (10,)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.min() >= 0.0
    assert first.max() < 1.0


def test_baselines_rank_with_ndcg(prepared: Path) -> None:
    scores = compute_baseline_scores(prepared)
    groups = load_validation_groups(prepared)

    ndcg = ndcg_at_k(scores["user_history_count"], groups.targets, groups.lengths)

    # Request 2001: the cart (product 4) ranks second. Request 1001: product 7 ranks first.
    # Request 1002: the cart (product 1) ties with product 5 at 1/3 and comes earlier, so it ranks
    # third after products 8 and 3.
    assert ndcg[0] == pytest.approx(1 / np.log2(3))
    assert ndcg[1] == 1.0
    assert ndcg[2] == pytest.approx(1 / np.log2(4))


def test_baselines_log_used_events(prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cartformer.evaluation.baselines"):
        compute_baseline_scores(prepared)

    assert "9 of 18 positive events" in caplog.text


def test_rejects_missing_train_end(tmp_path: Path) -> None:
    prepared = write_prepared(tmp_path, meta={"valid_end": 3000})

    with pytest.raises(ValueError, match="train_end"):
        compute_baseline_scores(prepared)


def test_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="finetune_valid.parquet"):
        load_validation_groups(tmp_path)


def test_rejects_missing_column(prepared: Path) -> None:
    path = prepared / "finetune_valid.parquet"
    pl.read_parquet(path).drop("request_size").write_parquet(path)

    with pytest.raises(ValueError, match="request_size"):
        load_validation_groups(prepared)


def test_rejects_request_size_mismatch(tmp_path: Path) -> None:
    rows = [dict(VALID_ROWS[0], request_size=[3])]
    prepared = write_prepared(tmp_path, valid_rows=rows)

    with pytest.raises(ValueError, match="sums to 3 in row 0"):
        load_validation_groups(prepared)


def test_rejects_parallel_list_mismatch(tmp_path: Path) -> None:
    rows = [dict(VALID_ROWS[0], candidate_target=[0])]
    prepared = write_prepared(tmp_path, valid_rows=rows)

    with pytest.raises(ValueError, match="'candidate_product' and 'candidate_target'"):
        load_validation_groups(prepared)


def test_rejects_non_binary_target(tmp_path: Path) -> None:
    rows = [dict(VALID_ROWS[0], candidate_target=[0, 2])]
    prepared = write_prepared(tmp_path, valid_rows=rows)

    with pytest.raises(ValueError, match="candidate_target"):
        load_validation_groups(prepared)


def test_rejects_view_events(tmp_path: Path) -> None:
    prepared = write_prepared(tmp_path, events=[*EVENTS, (1, 3, 0, 10)])

    with pytest.raises(ValueError, match=r"codes \[0\]"):
        compute_baseline_scores(prepared)
