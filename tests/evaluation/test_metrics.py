import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import ndcg_score

from cartformer.evaluation import metrics
from cartformer.evaluation.metrics import mean_ndcg_at_k, ndcg_at_k


def _random_groups(
    rng: np.random.Generator, num_groups: int, graded: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = rng.integers(1, 61, size=num_groups)
    total = int(lengths.sum())
    scores = rng.normal(size=total)
    if graded:
        targets = rng.integers(0, 5, size=total)
    else:
        targets = (rng.random(total) < 0.2).astype(np.int64)
    return scores, targets, lengths


def _sklearn_per_request(
    scores: np.ndarray, targets: np.ndarray, lengths: np.ndarray, k: int
) -> list[float | None]:
    """Plain per-request loop over sklearn, the reference for the vectorized metric."""
    expected: list[float | None] = []
    start = 0
    for length in lengths:
        stop = start + int(length)
        if length > 1:
            expected.append(
                ndcg_score(
                    targets[None, start:stop], scores[None, start:stop], k=k, ignore_ties=True
                )
            )
        else:
            expected.append(None)
        start = stop
    return expected


@pytest.mark.parametrize("graded", [False, True])
def test_ndcg_matches_sklearn(graded: bool) -> None:
    rng = np.random.default_rng(7)
    scores, targets, lengths = _random_groups(rng, num_groups=400, graded=graded)

    actual = ndcg_at_k(scores, targets, lengths, k=10)
    expected = _sklearn_per_request(scores, targets, lengths, k=10)

    assert actual.shape == lengths.shape
    for request, value in enumerate(expected):
        if value is not None:
            assert actual[request] == pytest.approx(value, abs=1e-12), f"request {request}"


@pytest.mark.parametrize("k", [1, 3, 60])
def test_ndcg_matches_sklearn_other_k(k: int) -> None:
    rng = np.random.default_rng(11)
    scores, targets, lengths = _random_groups(rng, num_groups=100, graded=False)

    actual = ndcg_at_k(scores, targets, lengths, k=k)
    expected = _sklearn_per_request(scores, targets, lengths, k=k)

    for request, value in enumerate(expected):
        if value is not None:
            assert actual[request] == pytest.approx(value, abs=1e-12), f"request {request}"


def test_ndcg_small_chunks_match_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 8 padded cells force many chunks per bucket and single-row chunks for long
    # requests. The two requests of 300 and 1000 candidates add wide buckets.
    monkeypatch.setattr(metrics, "_PADDED_CHUNK_ELEMENTS", 8)
    rng = np.random.default_rng(13)
    scores, targets, lengths = _random_groups(rng, num_groups=50, graded=True)
    lengths = np.concatenate([lengths, [300, 1000]])
    scores = np.concatenate([scores, rng.normal(size=1300)])
    targets = np.concatenate([targets, rng.integers(0, 5, size=1300)])

    actual = ndcg_at_k(scores, targets, lengths, k=10)
    expected = _sklearn_per_request(scores, targets, lengths, k=10)

    for request, value in enumerate(expected):
        if value is not None:
            assert actual[request] == pytest.approx(value, abs=1e-12), f"request {request}"


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.floats(-1e6, 1e6, allow_nan=False),
                st.integers(0, 3),
            ),
            min_size=2,
            max_size=30,
            unique_by=lambda pair: pair[0],
        ),
        min_size=1,
        max_size=8,
    )
)
def test_ndcg_matches_sklearn_property(groups: list[list[tuple[float, int]]]) -> None:
    scores = np.array([score for group in groups for score, _ in group])
    targets = np.array([target for group in groups for _, target in group])
    lengths = np.array([len(group) for group in groups])

    actual = ndcg_at_k(scores, targets, lengths)
    expected = _sklearn_per_request(scores, targets, lengths, k=10)

    for request, value in enumerate(expected):
        assert actual[request] == pytest.approx(value, abs=1e-12)


def test_ndcg_single_candidate() -> None:
    actual = ndcg_at_k(np.array([0.5, 0.5]), np.array([1, 0]), np.array([1, 1]))

    assert actual[0] == 1.0
    assert actual[1] == 0.0


def test_ndcg_ties_keep_earlier_first() -> None:
    actual = ndcg_at_k(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 1, 0]), np.array([2, 2]))

    assert actual[0] == pytest.approx(1.0 / math.log2(3.0))
    assert actual[1] == 1.0


def test_ndcg_ties_stable_in_long_request() -> None:
    # numpy's default sort is not stable beyond 16 elements; the metric's order still is.
    targets = np.zeros(200)
    targets[0] = 1

    first_positive = ndcg_at_k(np.zeros(200), targets, np.array([200]))
    last_positive = ndcg_at_k(np.zeros(200), targets[::-1].copy(), np.array([200]))

    assert first_positive[0] == 1.0
    assert last_positive[0] == 0.0


def test_ndcg_cuts_at_k() -> None:
    scores = -np.arange(11, dtype=np.float64)
    targets = np.zeros(11)
    targets[10] = 1

    assert ndcg_at_k(scores, targets, np.array([11]), k=10)[0] == 0.0
    assert ndcg_at_k(scores, targets, np.array([11]), k=11)[0] == pytest.approx(
        1.0 / math.log2(12.0)
    )


def test_ndcg_graded_hand_value() -> None:
    # Ranked targets 1, 2, 0 against ideal 2, 1, 0.
    dcg = 1.0 + 2.0 / math.log2(3.0)
    ideal = 2.0 + 1.0 / math.log2(3.0)

    actual = ndcg_at_k(np.array([0.9, 0.5, 0.1]), np.array([1, 2, 0]), np.array([3]))

    assert actual[0] == pytest.approx(dcg / ideal)


def test_ndcg_no_positive_is_zero() -> None:
    actual = ndcg_at_k(np.array([0.3, 0.2, 0.1]), np.array([0, 0, 0]), np.array([3]))

    assert actual[0] == 0.0


def test_ndcg_empty_request_is_zero() -> None:
    actual = ndcg_at_k(np.array([0.2, 0.1]), np.array([0, 1]), np.array([0, 2]))

    assert actual[0] == 0.0
    assert actual[1] == pytest.approx(1.0 / math.log2(3.0))


def test_ndcg_no_requests() -> None:
    actual = ndcg_at_k(np.array([]), np.array([]), np.array([], dtype=np.int64))

    assert actual.shape == (0,)


def test_ndcg_negative_infinity_ranks_last() -> None:
    actual = ndcg_at_k(np.array([-np.inf, 0.0]), np.array([1, 0]), np.array([2]))

    assert actual[0] == pytest.approx(1.0 / math.log2(3.0))


def test_ndcg_accepts_torch() -> None:
    rng = np.random.default_rng(3)
    scores, targets, lengths = _random_groups(rng, num_groups=20, graded=False)

    from_numpy = ndcg_at_k(scores, targets, lengths)
    from_torch = ndcg_at_k(
        torch.from_numpy(scores).requires_grad_(),
        torch.from_numpy(targets),
        torch.from_numpy(lengths),
    )

    np.testing.assert_array_equal(from_torch, from_numpy)


def test_ndcg_accepts_bfloat16() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5], dtype=torch.bfloat16)

    actual = ndcg_at_k(scores, torch.tensor([0, 1, 0]), torch.tensor([3]))

    assert actual[0] == 1.0


def test_ndcg_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="lengths sum to 3"):
        ndcg_at_k(np.zeros(4), np.zeros(4), np.array([1, 2]))


def test_ndcg_rejects_score_target_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        ndcg_at_k(np.zeros(4), np.zeros(3), np.array([4]))


def test_ndcg_rejects_nan_scores() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ndcg_at_k(np.array([0.1, np.nan]), np.array([0, 1]), np.array([2]))


def test_ndcg_rejects_negative_targets() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k(np.array([0.1, 0.2]), np.array([0, -1]), np.array([2]))


def test_ndcg_rejects_negative_lengths() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k(np.array([0.1, 0.2]), np.array([0, 1]), np.array([3, -1]))


def test_ndcg_rejects_two_dimensional() -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        ndcg_at_k(np.zeros((1, 2)), np.zeros((1, 2)), np.array([2]))


def test_ndcg_rejects_zero_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(np.zeros(2), np.zeros(2), np.array([2]), k=0)


def test_mean_ndcg_skips_single_candidate() -> None:
    # Request 0 has one candidate with target 1 (NDCG 1), request 1 ranks its positive second.
    scores = np.array([0.5, 0.9, 0.1])
    targets = np.array([1, 0, 1])
    lengths = np.array([1, 2])

    actual = mean_ndcg_at_k(scores, targets, lengths)

    assert actual == pytest.approx(1.0 / math.log2(3.0))


def test_mean_ndcg_matches_sklearn_average() -> None:
    rng = np.random.default_rng(5)
    scores, targets, lengths = _random_groups(rng, num_groups=200, graded=False)
    per_request = _sklearn_per_request(scores, targets, lengths, 10)
    counted = [value for value in per_request if value is not None]

    actual = mean_ndcg_at_k(scores, targets, lengths)

    assert 0.0 in counted
    assert actual == pytest.approx(float(np.mean(counted)), abs=1e-12)


def test_mean_ndcg_rejects_no_counted_request() -> None:
    with pytest.raises(ValueError, match="no request"):
        mean_ndcg_at_k(np.array([0.1, 0.2]), np.array([1, 0]), np.array([1, 1]))
