"""Tests of the side-feature blocks: cross layers, token bags, categorical and time encoders."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch

from cartformer.model.features import (
    DEFAULT_GAP_BUCKETS,
    FIRST_EVENT_BUCKET,
    CategoricalEmbeddings,
    CrossLayer,
    CrossNetwork,
    FeatureCross,
    ProductTextEncoder,
    TimeEncoder,
    TokenBagEncoder,
    calendar_features,
    gather_bags,
    log_time_buckets,
    time_gap_buckets,
)


def _tensor(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_cross_layer_hand_computed() -> None:
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.linear.weight.copy_(_tensor([[1.0, 2.0], [0.0, -1.0]]))
        layer.linear.bias.copy_(_tensor([0.5, 1.0]))
    x0 = _tensor([[2.0, 3.0]])
    x = _tensor([[1.0, -1.0]])
    # W x + b = [1 - 2 + 0.5, 0 + 1 + 1] = [-0.5, 2]; x0 * that = [-1, 6]; plus x = [0, 5].
    assert torch.equal(layer(x0, x), _tensor([[0.0, 5.0]]))


def test_cross_layer_first_step_on_x0() -> None:
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.linear.weight.copy_(_tensor([[0.0, 1.0], [1.0, 0.0]]))
        layer.linear.bias.zero_()
    x0 = _tensor([[2.0, 3.0]])
    # W x0 = [3, 2]; x0 * W x0 = [6, 6]; plus x0 = [8, 9].
    assert torch.equal(layer(x0, x0), _tensor([[8.0, 9.0]]))


def test_cross_network_matches_loop() -> None:
    torch.manual_seed(0)
    network = CrossNetwork(4, num_layers=3)
    x0 = torch.randn(5, 4)
    expected = x0
    for layer in network.layers:
        expected = x0 * (expected @ layer.linear.weight.T + layer.linear.bias) + expected
    assert torch.allclose(network(x0), expected)


def test_cross_network_zero_layers_identity() -> None:
    x0 = torch.randn(3, 4)
    assert torch.equal(CrossNetwork(4, num_layers=0)(x0), x0)


def test_cross_network_negative_layers_rejected() -> None:
    with pytest.raises(ValueError, match="num_layers is -1"):
        CrossNetwork(4, num_layers=-1)


def test_feature_cross_shape() -> None:
    cross = FeatureCross(num_fields=3, dim=8, num_layers=2)
    fields = [torch.randn(5, 8) for _ in range(3)]
    assert cross(fields).shape == (5, 8)


def test_feature_cross_single_field_identity() -> None:
    cross = FeatureCross(num_fields=1, dim=8, num_layers=0)
    field = torch.randn(5, 8)
    assert torch.equal(cross([field]), field)
    assert not list(cross.parameters())


def test_feature_cross_mixes_fields() -> None:
    torch.manual_seed(0)
    cross = FeatureCross(num_fields=2, dim=4, num_layers=1)
    first, second = torch.randn(3, 4), torch.randn(3, 4)
    changed = cross([first, second + 1.0]) - cross([first, second])
    assert changed.abs().max() > 1e-3


def test_feature_cross_wrong_field_count() -> None:
    cross = FeatureCross(num_fields=2, dim=4)
    with pytest.raises(ValueError, match="got 1 fields but was built for 2"):
        cross([torch.randn(3, 4)])


def test_token_bag_sums_rows() -> None:
    encoder = TokenBagEncoder(vocab_size=6, dim=3)
    token_ids = torch.tensor([1, 4, 4, 2, 5])
    offsets = torch.tensor([0, 3, 3, 5])
    out = encoder(token_ids, offsets)
    weight = encoder.embedding.weight
    assert out.shape == (3, 3)
    assert torch.allclose(out[0], weight[1] + 2 * weight[4])
    assert torch.equal(out[1], torch.zeros(3))
    assert torch.allclose(out[2], weight[2] + weight[5])


def _bags() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Products 0 (unknown, empty), 1 "a b", 2 "b c", 3 "a". Categories: 0 empty, 1-2 "x", 3 "y a".
    return {
        "name": (np.array([1, 2, 2, 3, 1]), np.array([0, 0, 2, 4, 5])),
        "category": (np.array([4, 4, 5, 1]), np.array([0, 0, 1, 2, 4])),
    }


def test_text_matrix_shared() -> None:
    encoder = ProductTextEncoder(_bags(), vocab_size=6, dim=4)
    tables = [module for module in encoder.modules() if isinstance(module, torch.nn.EmbeddingBag)]
    assert len(tables) == 1
    assert len(list(encoder.parameters())) == 1

    out = encoder(torch.tensor([3]))
    weight = encoder.bag_encoder.embedding.weight
    # Token 1 ("a") appears in the name and in the category of product 3 with the same vector.
    assert torch.allclose(out["name"][0], weight[1])
    assert torch.allclose(out["category"][0], weight[5] + weight[1])


def test_text_gradients_reach_shared_rows() -> None:
    encoder = ProductTextEncoder(_bags(), vocab_size=6, dim=4)
    out = encoder(torch.tensor([1, 3]))
    (out["name"].sum() + out["category"].sum()).backward()
    grad = encoder.bag_encoder.embedding.weight.grad
    assert grad is not None
    assert grad[4].abs().sum() > 0  # category-only token
    assert grad[2].abs().sum() > 0  # name-only token
    assert torch.allclose(grad[1], torch.full((4,), 3.0))  # twice in names, once in categories
    assert torch.equal(grad[0], torch.zeros(4))


def test_text_lookup_matches_bags() -> None:
    encoder = ProductTextEncoder(_bags(), vocab_size=6, dim=4)
    product = torch.tensor([2, 0, 1, 2])
    out = encoder(product)
    weight = encoder.bag_encoder.embedding.weight
    assert out["name"].shape == (4, 4)
    assert torch.allclose(out["name"][0], weight[2] + weight[3])
    assert torch.equal(out["name"][1], torch.zeros(4))
    assert torch.allclose(out["name"][2], weight[1] + weight[2])
    assert torch.allclose(out["category"][3], weight[4])


def test_held_out_product_vector() -> None:
    encoder = ProductTextEncoder(_bags(), vocab_size=6, dim=4)
    # A product outside the buffers named "a c" with category "x": built from known tokens.
    vector = encoder.encode_bags(torch.tensor([1, 3, 4]), torch.tensor([0, 2, 3]))
    weight = encoder.bag_encoder.embedding.weight
    assert torch.allclose(vector[0], weight[1] + weight[3])
    assert torch.allclose(vector[1], encoder(torch.tensor([1]))["category"][0])
    assert vector[0].abs().sum() > 0


def test_text_token_beyond_vocab_rejected() -> None:
    with pytest.raises(ValueError, match="token id 5, beyond vocab_size 5"):
        ProductTextEncoder(_bags(), vocab_size=5, dim=4)


def test_text_product_counts_must_match() -> None:
    bags = _bags()
    bags["category"] = (np.array([4]), np.array([0, 1]))
    with pytest.raises(ValueError, match="different product counts"):
        ProductTextEncoder(bags, vocab_size=6, dim=4)


def test_gather_bags_matches_reference() -> None:
    token_ids = torch.tensor([10, 11, 12, 13, 14, 15])
    offsets = torch.tensor([0, 2, 2, 5, 6])
    index = torch.tensor([3, 0, 1, 2, 0])
    gathered, new_offsets = gather_bags(token_ids, offsets, index)
    # Plain per-bag reference, for the test only.
    expected = [token_ids[offsets[i] : offsets[i + 1]].tolist() for i in index.tolist()]
    assert new_offsets.tolist() == [0, 1, 3, 3, 6, 8]
    assert gathered.tolist() == [token for bag in expected for token in bag]


def test_gather_bags_empty_index() -> None:
    gathered, new_offsets = gather_bags(
        torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([], dtype=torch.int64)
    )
    assert gathered.tolist() == []
    assert new_offsets.tolist() == [0]


def test_categorical_unknown_row_learned() -> None:
    embeddings = CategoricalEmbeddings({"city": 3, "store": 5}, dim=4)
    out = embeddings({"city": torch.tensor([0, 2]), "store": torch.tensor([4, 0])})
    assert set(out) == {"city", "store"}
    assert out["city"].shape == (2, 4)
    assert out["city"][0].abs().sum() > 0
    out["city"][0].sum().backward()
    assert embeddings.tables["city"].weight.grad[0].abs().sum() > 0


def test_categorical_unseen_city_shares_unknown_row() -> None:
    embeddings = CategoricalEmbeddings({"city": 3}, dim=4)
    # Two different unseen cities both map to index 0 in the mapping, so one vector.
    out = embeddings({"city": torch.tensor([0, 0, 1])})["city"]
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


def test_categorical_missing_field() -> None:
    embeddings = CategoricalEmbeddings({"city": 3}, dim=4)
    with pytest.raises(KeyError, match="'city' is missing"):
        embeddings({"store": torch.tensor([1])})


def test_categorical_tiny_vocab_rejected() -> None:
    with pytest.raises(ValueError, match="'store' is 1"):
        CategoricalEmbeddings({"store": 1}, dim=4)


def _python_calendar(timestamp: int, offset_hours: float) -> tuple[int, int, int]:
    zone = dt.timezone(dt.timedelta(hours=offset_hours))
    local = dt.datetime.fromtimestamp(timestamp, zone)
    return local.hour, local.weekday(), local.month - 1


@pytest.mark.parametrize("offset_hours", [0.0, 3.0, 5.5, -8.0])
def test_calendar_matches_datetime(offset_hours: float) -> None:
    rng = np.random.default_rng(0)
    timestamps = np.concatenate(
        [
            rng.integers(-2_000_000_000, 4_000_000_000, 2000),
            # Around month ends, leap days and new year, in 2023-2025.
            np.array([1_709_164_800, 1_709_251_199, 1_709_251_200, 1_704_067_199, 1_704_067_200]),
            np.array([0, -1, 951_782_400, 4_107_542_400]),
        ]
    )
    features = calendar_features(torch.tensor(timestamps), offset_hours)
    for index, timestamp in enumerate(timestamps.tolist()):
        hour, weekday, month = _python_calendar(timestamp, offset_hours)
        assert features["hour"][index] == hour, timestamp
        assert features["weekday"][index] == weekday, timestamp
        assert features["month"][index] == month, timestamp


def test_calendar_moscow_default() -> None:
    # 2023-09-01 00:00 UTC is 03:00 on a Friday in Moscow.
    features = calendar_features(torch.tensor([1_693_526_400]))
    assert features["hour"].tolist() == [3]
    assert features["weekday"].tolist() == [4]
    assert features["month"].tolist() == [8]


def test_log_buckets_hand_values() -> None:
    seconds = torch.tensor([-5, 0, 1, 2, 3600, 86_400, 10**12])
    buckets = log_time_buckets(seconds, num_buckets=64)
    # 1 + floor(ln(s) / 0.301): ln 2 = 0.69 -> 2, ln 3600 = 8.19 -> 27, ln 86400 = 11.37 -> 37.
    assert buckets.tolist() == [1, 1, 1, 3, 28, 38, 63]


def test_log_buckets_monotone() -> None:
    seconds = torch.arange(0, 10**8, 9973)
    buckets = log_time_buckets(seconds)
    assert bool((buckets[1:] >= buckets[:-1]).all())
    assert int(buckets.min()) >= 1
    assert int(buckets.max()) <= DEFAULT_GAP_BUCKETS - 1


def test_log_buckets_too_few_rejected() -> None:
    with pytest.raises(ValueError, match="num_buckets is 1"):
        log_time_buckets(torch.tensor([1]), num_buckets=1)


def test_gap_buckets_per_sequence() -> None:
    timestamp = torch.tensor([100, 100, 3700, 50, 52, 9])
    lengths = torch.tensor([3, 0, 2, 1])
    buckets = time_gap_buckets(timestamp, lengths)
    assert buckets.tolist() == [
        FIRST_EVENT_BUCKET,
        1,
        28,
        FIRST_EVENT_BUCKET,
        3,
        FIRST_EVENT_BUCKET,
    ]


def test_gap_buckets_empty_batch() -> None:
    buckets = time_gap_buckets(
        torch.tensor([], dtype=torch.int64), torch.tensor([0, 0], dtype=torch.int64)
    )
    assert buckets.tolist() == []


def test_time_encoder_sum_of_fields() -> None:
    encoder = TimeEncoder(dim=4, utc_offset_hours=0.0)
    timestamp = torch.tensor([1_693_526_400, 1_693_530_000, 1_700_000_000])
    lengths = torch.tensor([2, 1])
    out = encoder(timestamp, lengths)
    fields = encoder.encode_fields(timestamp, lengths)
    assert encoder.fields == ("hour", "weekday", "month", "gap")
    assert out.shape == (3, 4)
    assert torch.allclose(out, sum(fields.values()))
    indices = encoder.indices(timestamp, lengths)
    assert indices["hour"].tolist() == [0, 1, 22]
    assert indices["gap"].tolist() == [0, 28, 0]


def test_time_encoder_calendar_only() -> None:
    encoder = TimeEncoder(dim=4, gap=False)
    assert encoder.fields == ("hour", "weekday", "month")
    assert encoder(torch.tensor([0, 1])).shape == (2, 4)


def test_time_encoder_gap_needs_lengths() -> None:
    encoder = TimeEncoder(dim=4, calendar=False)
    with pytest.raises(ValueError, match="needs the sequence lengths"):
        encoder(torch.tensor([0, 1]))


def test_time_encoder_all_off_rejected() -> None:
    with pytest.raises(ValueError, match="both are off"):
        TimeEncoder(dim=4, calendar=False, gap=False)


def test_time_encoder_bad_offset_rejected() -> None:
    with pytest.raises(ValueError, match="utc_offset_hours is 30"):
        TimeEncoder(dim=4, utc_offset_hours=30)


def test_time_embed_matches_forward() -> None:
    torch.manual_seed(0)
    encoder = TimeEncoder(dim=4)
    timestamp = torch.tensor([1_700_000_000, 1_700_000_100, 1_700_090_000])
    lengths = torch.tensor([2, 1])
    buckets = time_gap_buckets(timestamp, lengths)
    assert torch.allclose(encoder.embed(timestamp, buckets), encoder(timestamp, lengths))


def test_time_embed_needs_gap_buckets() -> None:
    encoder = TimeEncoder(dim=4)
    with pytest.raises(ValueError, match="needs gap buckets"):
        encoder.embed(torch.tensor([0]))


def test_time_embed_calendar_only() -> None:
    encoder = TimeEncoder(dim=4, gap=False)
    timestamp = torch.tensor([1_700_000_000])
    expected = sum(
        encoder.tables[name](index) for name, index in calendar_features(timestamp).items()
    )
    assert torch.allclose(encoder.embed(timestamp), expected)
