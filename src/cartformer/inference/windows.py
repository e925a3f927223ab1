"""Scoring states and the history windows that the transformer reads to compute them.

Every function here works on whole arrays at once. Histories are the positive events of all
users concatenated in one (E,) array sorted by (user, time), and a user's events form one
contiguous run of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def latest_positions(
    event_user: np.ndarray, event_time: np.ndarray, user: np.ndarray, cutoff: np.ndarray
) -> np.ndarray:
    """Find, per query, the latest event of the query's user with time <= cutoff.

    Args:
        event_user: (E,) int64 dense user codes of the events, sorted ascending.
        event_time: (E,) int64 event times, ascending within each user.
        user: (Q,) int64 user code of each query, or -1 for a user without events.
        cutoff: (Q,) int64 latest allowed event time of each query.

    Returns:
        (Q,) int64 global position in the event arrays, or -1 where no event qualifies.
    """
    found = np.full(user.shape, -1, dtype=np.int64)
    if event_user.size == 0 or user.size == 0:
        return found
    known = user >= 0
    event_keys, query_keys = _pack_user_time(event_user, event_time, user[known], cutoff[known])
    latest = np.searchsorted(event_keys, query_keys, side="right") - 1
    same_user = latest >= 0
    same_user &= event_user[np.clip(latest, 0, None)] == user[known]
    found[known] = np.where(same_user, latest, -1)
    return found


def _pack_user_time(
    event_user: np.ndarray, event_time: np.ndarray, user: np.ndarray, cutoff: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pack (user, time) pairs into int64 keys that sort like the pairs.

    The key is user * span + (time - start). When that could overflow, times are first
    replaced by their ranks among all event times and cutoffs, which keeps their order.
    """
    times = np.concatenate([event_time, cutoff])
    start = int(times.min())
    span = int(times.max()) - start + 1
    max_user = int(event_user.max()) if event_user.size else 0
    if user.size:
        max_user = max(max_user, int(user.max()))
    if (max_user + 1) * span < 2**62:
        return event_user * span + (event_time - start), user * span + (cutoff - start)
    ranks = np.unique(times)
    span = ranks.size
    if (max_user + 1) * span >= 2**62:
        raise ValueError(f"{max_user + 1} users x {span} distinct times overflow the int64 key")
    return (
        event_user * span + np.searchsorted(ranks, event_time),
        user * span + np.searchsorted(ranks, cutoff),
    )


@dataclass(frozen=True)
class HistoryWindows:
    """History slices fed to the transformer and the scoring state of every request.

    A window is a contiguous slice of one user's events. Request r is scored from the state at
    `request_state[r]` inside window `request_window[r]`.
    """

    start: np.ndarray
    """(W,) int64 global position of each window's first event."""
    length: np.ndarray
    """(W,) int64 number of events in each window, 1..max_length."""
    request_window: np.ndarray
    """(R,) int64 window of each request."""
    request_state: np.ndarray
    """(R,) int64 position of the request's state inside its window."""


def assign_windows(
    state: np.ndarray, user_start: np.ndarray, max_length: int, step: int
) -> HistoryWindows:
    """Cut each user's history into the fewest windows that hold every request's state.

    Every user gets a window of the `max_length` events ending at the user's latest state. A
    request whose state lies `d` events before that latest state goes to window
    `j = d // step`, which ends `j * step` events before it. The state therefore has at
    least `max_length - step + 1` events of context, or all of its user's earlier events when
    there are fewer. `step = 1` gives every distinct state its own full window, which matches
    feeding each request the last `max_length` events up to its state exactly. Requests at the
    end of the histories, as in a test file after the event log, share one window per user.

    Args:
        state: (R,) int64 global position of each request's state event.
        user_start: (R,) int64 global position of the first event of the request's user.
        max_length: maximum window length, at least 1.
        step: distance between consecutive window ends of one user, 1..max_length.

    Returns:
        HistoryWindows with W <= R windows, ordered by user and then by window end, latest
        first.
    """
    if max_length < 1 or not 1 <= step <= max_length:
        raise ValueError(
            f"max_length={max_length} and step={step} must satisfy 1 <= step <= max_length"
        )
    state = state.astype(np.int64, copy=False)
    user_start = user_start.astype(np.int64, copy=False)
    if state.size and (state < user_start).any():
        raise ValueError("a state lies before its user's first event; check the event positions")
    local_state = state - user_start
    users, request_user = np.unique(user_start, return_inverse=True)
    latest = np.full(users.shape, -1, dtype=np.int64)
    np.maximum.at(latest, request_user, local_state)

    window_number = (latest[request_user] - local_state) // step
    numbers = int(window_number.max(initial=0)) + 1
    window_keys, request_window = np.unique(
        request_user * numbers + window_number, return_inverse=True
    )
    window_user = window_keys // numbers
    window_end = latest[window_user] - (window_keys % numbers) * step
    window_first = np.maximum(window_end - max_length + 1, 0)
    return HistoryWindows(
        start=users[window_user] + window_first,
        length=window_end - window_first + 1,
        request_window=request_window.astype(np.int64),
        request_state=local_state - window_first[request_window],
    )


def plan_batches(lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Cut windows sorted by descending length into batches of at most `max_tokens` padded events.

    A batch [a, b) pads to its first, longest window, so it contains
    `max_tokens // lengths[a]` windows, at least one. The loop runs once per batch.

    Args:
        lengths: (W,) window lengths, sorted descending.
        max_tokens: padded events per batch, at least 1.

    Returns:
        (a, b) index ranges covering 0..W in order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    batches: list[tuple[int, int]] = []
    start = 0
    total = int(lengths.shape[0])
    while start < total:
        size = max(max_tokens // int(lengths[start]), 1)
        batches.append((start, min(start + size, total)))
        start += size
    return batches
