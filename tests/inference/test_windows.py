import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cartformer.inference.windows import assign_windows, latest_positions, plan_batches


def random_events(rng, num_users=6, per_user=30):
    counts = rng.integers(0, per_user, size=num_users)
    user = np.repeat(np.arange(num_users), counts)
    time = np.concatenate([np.sort(rng.integers(0, 100, size=c)) for c in counts])
    return user.astype(np.int64), time.astype(np.int64)


def test_latest_positions_match_scan():
    rng = np.random.default_rng(0)
    event_user, event_time = random_events(rng)
    user = rng.integers(-1, 7, size=200)
    cutoff = rng.integers(-5, 110, size=200)
    found = latest_positions(event_user, event_time, user, cutoff)
    for q in range(user.size):  # plain reference: scan every event
        qualifying = np.flatnonzero((event_user == user[q]) & (event_time <= cutoff[q]))
        expected = qualifying[-1] if qualifying.size else -1
        assert found[q] == expected, q


def test_latest_positions_without_events():
    found = latest_positions(
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.array([0, 1]), np.array([5, 5])
    )
    assert found.tolist() == [-1, -1]


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 200)), min_size=1, max_size=40),
    max_length=st.integers(1, 40),
    step_share=st.floats(0.0, 1.0),
)
def test_windows_hold_states_with_context(requests, max_length, step_share):
    step = max(1, round(step_share * max_length))
    user_start = np.array([user * 1000 for user, _ in requests])
    state = user_start + np.array([local for _, local in requests])
    windows = assign_windows(state, user_start, max_length, step)

    window_start = windows.start[windows.request_window]
    window_length = windows.length[windows.request_window]
    assert (windows.length >= 1).all()
    assert (windows.length <= max_length).all()
    assert (windows.request_state >= 0).all()
    assert (windows.request_state < window_length).all()
    assert (window_start + windows.request_state == state).all()
    assert (window_start >= user_start).all()
    context = windows.request_state + 1
    min_context = np.minimum(state - user_start + 1, max_length - step + 1)
    assert (context >= min_context).all()


def test_step_one_gives_exact_windows():
    user_start = np.array([0, 0, 0, 100, 100])
    state = np.array([3, 20, 40, 100, 130])
    windows = assign_windows(state, user_start, max_length=8, step=1)
    start = windows.start[windows.request_window]
    assert start.tolist() == [0, 13, 33, 100, 123]
    assert windows.request_state.tolist() == [3, 7, 7, 0, 7]


def test_latest_states_share_one_window():
    user_start = np.array([0, 0, 0])
    state = np.array([50, 45, 49])
    windows = assign_windows(state, user_start, max_length=16, step=8)
    assert windows.start.tolist() == [35]
    assert windows.length.tolist() == [16]


def test_invalid_step_rejected():
    with pytest.raises(ValueError, match="step"):
        assign_windows(np.array([1]), np.array([0]), max_length=4, step=5)


def test_batches_cover_windows_within_budget():
    lengths = np.array([16, 16, 9, 8, 8, 3, 1])
    batches = plan_batches(lengths, max_tokens=24)
    covered = [i for first, last in batches for i in range(first, last)]
    assert covered == list(range(lengths.size))
    for first, last in batches:
        assert (last - first) * lengths[first] <= 24 or last - first == 1


def test_oversized_window_gets_own_batch():
    assert plan_batches(np.array([50, 10]), max_tokens=20) == [(0, 1), (1, 2)]
