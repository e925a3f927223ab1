import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cartformer.model.ops import (
    history_matches,
    lengths_to_mask,
    make_groups,
    make_pairs,
    pad_sequences,
    sequence_offsets,
    unpad,
)

lengths_lists = st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=6)
positive_lengths_lists = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=6)


# Plain Python references, looping on purpose.
def reference_mask(lengths: list[int]) -> list[list[bool]]:
    width = max(lengths, default=0)
    return [[j < length for j in range(width)] for length in lengths]


def reference_offsets(lengths: list[int]) -> list[int]:
    offsets, start = [], 0
    for length in lengths:
        offsets.append(start)
        start += length
    return offsets


def reference_groups(lengths: list[int]) -> list[int]:
    return [group for group, length in enumerate(lengths) for _ in range(length)]


def reference_pairs(lengths: list[int]) -> list[list[int]]:
    first, second = [], []
    for start, length in zip(reference_offsets(lengths), lengths, strict=True):
        for p in range(length):
            for q in range(length):
                first.append(start + p)
                second.append(start + q)
    return [first, second]


def test_mask_example():
    expected = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    assert torch.equal(lengths_to_mask(torch.tensor([2, 3, 1])), expected)


def test_groups_example():
    assert make_groups(torch.tensor([2, 3, 1])).tolist() == [0, 0, 1, 1, 1, 2]


def test_pairs_example():
    pairs = make_pairs(torch.tensor([1, 2]))
    assert pairs.shape == (2, 5)
    assert pairs.tolist() == [[0, 1, 1, 2, 2], [0, 1, 2, 1, 2]]


def test_offsets_example():
    assert sequence_offsets(torch.tensor([2, 3, 1])).tolist() == [0, 2, 5]


def test_mask_rejects_short_max_len():
    with pytest.raises(ValueError, match="max_len"):
        lengths_to_mask(torch.tensor([4]), max_len=3)


def test_mask_rejects_float_lengths():
    with pytest.raises(ValueError, match="integer"):
        lengths_to_mask(torch.tensor([1.0, 2.0]))


@given(lengths_lists)
def test_mask_matches_reference(lengths):
    mask = lengths_to_mask(torch.tensor(lengths, dtype=torch.int64))
    assert mask.dtype == torch.bool
    assert mask.tolist() == reference_mask(lengths)


@given(lengths_lists)
def test_offsets_match_reference(lengths):
    offsets = sequence_offsets(torch.tensor(lengths, dtype=torch.int64))
    assert offsets.tolist() == reference_offsets(lengths)


@given(lengths_lists)
def test_groups_match_reference(lengths):
    groups = make_groups(torch.tensor(lengths, dtype=torch.int64))
    assert groups.tolist() == reference_groups(lengths)


@given(lengths_lists)
def test_pairs_match_reference(lengths):
    pairs = make_pairs(torch.tensor(lengths, dtype=torch.int64))
    assert pairs.dtype == torch.int64
    assert pairs.shape == (2, sum(length * length for length in lengths))
    assert pairs.tolist() == reference_pairs(lengths)


@settings(max_examples=50)
@given(lengths_lists, st.integers(min_value=0, max_value=2))
def test_pad_matches_reference(lengths, trailing_dims):
    lengths_tensor = torch.tensor(lengths, dtype=torch.int64)
    values = torch.randn(sum(lengths), *([2] * trailing_dims))
    padded = pad_sequences(values, lengths_tensor, padding_value=-1.0)

    width = max(lengths, default=0)
    assert padded.shape == (len(lengths), width, *values.shape[1:])
    for row, (start, length) in enumerate(zip(reference_offsets(lengths), lengths, strict=True)):
        assert torch.equal(padded[row, :length], values[start : start + length])
        assert bool((padded[row, length:] == -1.0).all())


@settings(max_examples=50)
@given(lengths_lists)
def test_unpad_inverts_pad(lengths):
    lengths_tensor = torch.tensor(lengths, dtype=torch.int64)
    values = torch.randn(sum(lengths), 3)
    padded = pad_sequences(values, lengths_tensor, max_len=max(lengths, default=0) + 2)
    assert torch.equal(unpad(padded, lengths_tensor), values)


def test_pad_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="rows"):
        pad_sequences(torch.zeros(4), torch.tensor([2, 1]))


@given(positive_lengths_lists)
def test_pairs_cover_each_group_square(lengths):
    first, second = make_pairs(torch.tensor(lengths, dtype=torch.int64))
    groups = make_groups(torch.tensor(lengths, dtype=torch.int64))
    assert torch.equal(groups[first], groups[second])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_history_matches_equal_brute_force(data):
    lengths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    num_products = data.draw(st.integers(1, 6))
    products = data.draw(
        st.lists(st.integers(0, num_products - 1), min_size=sum(lengths), max_size=sum(lengths))
    )
    num_candidates = data.draw(st.integers(0, 15))
    samples = data.draw(
        st.lists(st.integers(0, len(lengths) - 1), min_size=num_candidates, max_size=num_candidates)
    )
    candidates, states = [], []
    for sample in samples:
        candidates.append(data.draw(st.integers(0, num_products - 1)))
        states.append(data.draw(st.integers(0, lengths[sample] - 1)))

    count, since = history_matches(
        torch.tensor(products),
        torch.tensor(lengths),
        torch.tensor(candidates, dtype=torch.long),
        torch.tensor(samples, dtype=torch.long),
        torch.tensor(states, dtype=torch.long),
        num_products,
    )

    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    for i, (sample, product, state) in enumerate(zip(samples, candidates, states, strict=True)):
        seen = [pos for pos in range(state + 1) if products[starts[sample] + pos] == product]
        assert count[i] == len(seen)
        assert since[i] == (state - seen[-1] if seen else -1)
