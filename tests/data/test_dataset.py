import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cartformer.config import ModelConfig
from cartformer.data.dataset import (
    FinetuneDataset,
    LengthBucketBatchSampler,
    PretrainDataset,
    TokenBudgetBatchSampler,
    collate,
    move_to_device,
)
from cartformer.model import Backbone, FinetuneModel, PretrainModel

I32 = pa.list_(pa.int32())
I8 = pa.list_(pa.int8())
I64 = pa.list_(pa.int64())
U64 = pa.list_(pa.uint64())

PRETRAIN_ROWS = {
    "user": ([3, 7, 9], pa.int32()),
    "product": ([[5, 6, 7, 8, 9], [1, 2, 3], [4, 4, 4, 4, 4, 4]], I32),
    "source": ([[1, 1, 2, 3, 4], [2, 2, 2], [1, 2, 1, 2, 1, 2]], I32),
    "action": ([[1, 2, 1, 2, 3], [3, 3, 1], [2, 2, 2, 2, 2, 1]], I8),
    "timestamp": ([[10, 20, 30, 40, 50], [1, 2, 3], [5, 6, 7, 8, 9, 10]], I64),
    "target_index": ([[0, 1, 2], [1, 2], [5]], I32),
}

BIG_REQUEST_ID = 2**64 - 5

FINETUNE_ROWS = {
    "user": ([4, 8], pa.int32()),
    "product": ([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6]], I32),
    "source": ([[1, 1, 2, 3, 4], [2, 2, 2, 1, 1, 1]], I32),
    "action": ([[1, 2, 1, 2, 3], [3, 3, 1, 1, 1, 2]], I8),
    "timestamp": ([[10, 20, 30, 40, 50], [1, 2, 3, 4, 5, 6]], I64),
    "request_id": ([[11, BIG_REQUEST_ID], [13]], U64),
    "request_source": ([[1, 2], [3]], I32),
    "request_timestamp": ([[60, 70], [9]], I64),
    "state_index": ([[2, 4], [5]], I32),
    "request_size": ([[3, 2], [4]], I32),
    "candidate_product": ([[1, 2, 3, 4, 5], [6, 7, 8, 9]], I32),
    "candidate_target": ([[1, 0, 0, 0, 1], [0, 0, 1, 0]], I8),
}


def write_table(path, rows, row_group_size=None, **replace):
    columns = {name: pa.array(values, type=kind) for name, (values, kind) in rows.items()}
    columns.update({name: pa.array(values, type=rows[name][1]) for name, values in replace.items()})
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_collate_spec_example():
    batch = [
        {"x": torch.tensor([1, 2]), "y": {"z": torch.tensor([[10], [20]]), "w": 5}, "s": "foo"},
        {"x": torch.tensor([3, 4]), "y": {"z": torch.tensor([[30], [40]]), "w": 6}, "s": "bar"},
    ]
    result = collate(batch)
    assert isinstance(result["x"], torch.Tensor)
    assert result["x"].tolist() == [1, 2, 3, 4]
    assert isinstance(result["y"], dict)
    assert isinstance(result["y"]["z"], torch.Tensor)
    assert result["y"]["z"].tolist() == [[10], [20], [30], [40]]
    assert result["y"]["w"] == [5, 6]
    assert result["s"] == ["foo", "bar"]


def test_collate_rejects_mixed_keys():
    with pytest.raises(ValueError, match="different keys"):
        collate([{"x": torch.tensor([1])}, {"y": torch.tensor([1])}])


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_move_to_device_recurses():
    batch = {"a": torch.tensor([1]), "b": {"c": torch.tensor([2.0]), "d": [torch.tensor([3])]}}
    batch["e"] = "text"
    moved = move_to_device(batch, "meta")
    assert moved["a"].device.type == "meta"
    assert moved["b"]["c"].device.type == "meta"
    assert moved["b"]["d"][0].device.type == "meta"
    assert moved["e"] == "text"


@pytest.mark.parametrize("row_group_size", [None, 1])
def test_pretrain_round_trip(tmp_path, row_group_size):
    path = write_table(tmp_path / "pretrain.parquet", PRETRAIN_ROWS, row_group_size)
    dataset = PretrainDataset(path)
    assert len(dataset) == 3

    sample = dataset[2]
    history = sample["history"]
    assert sample["user"].tolist() == [9]
    assert history["product"].tolist() == [4, 4, 4, 4, 4, 4]
    assert history["source"].tolist() == [1, 2, 1, 2, 1, 2]
    assert history["action"].tolist() == [2, 2, 2, 2, 2, 1]
    assert history["position"].tolist() == [0, 1, 2, 3, 4, 5]
    assert history["lengths"].tolist() == [6]
    assert history["target_index"].tolist() == [5]
    assert history["target_lengths"].tolist() == [1]
    for name, value in history.items():
        assert value.dtype == torch.int64, name


def test_pretrain_batch_layout(tmp_path):
    dataset = PretrainDataset(write_table(tmp_path / "pretrain.parquet", PRETRAIN_ROWS))
    batch = collate([dataset[0], dataset[1]])
    history = batch["history"]
    assert history["product"].tolist() == [5, 6, 7, 8, 9, 1, 2, 3]
    assert history["position"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert history["lengths"].tolist() == [5, 3]
    assert history["target_index"].tolist() == [0, 1, 2, 1, 2]
    assert history["target_lengths"].tolist() == [3, 2]
    assert batch["user"].tolist() == [3, 7]


def test_finetune_round_trip(tmp_path):
    dataset = FinetuneDataset(write_table(tmp_path / "finetune.parquet", FINETUNE_ROWS))
    assert len(dataset) == 2

    sample = dataset[0]
    assert sample["history"]["product"].tolist() == [5, 6, 7, 8, 9]
    assert sample["history"]["target_index"].tolist() == []
    assert sample["history"]["target_lengths"].tolist() == [0]
    assert sample["requests"]["source"].tolist() == [1, 2]
    assert sample["requests"]["state_index"].tolist() == [2, 4]
    assert sample["requests"]["lengths"].tolist() == [3, 2]
    assert sample["requests"]["num_requests"].tolist() == [2]
    assert sample["candidates"]["product"].tolist() == [1, 2, 3, 4, 5]
    assert sample["candidates"]["target"].tolist() == [1, 0, 0, 0, 1]
    raw_ids = sample["requests"]["request_id"].numpy().view(np.uint64).tolist()
    assert raw_ids == [11, BIG_REQUEST_ID]
    for part in ("history", "requests", "candidates"):
        for name, value in sample[part].items():
            assert value.dtype == torch.int64, f"{part}.{name}"


def test_loader_batches_feed_models(tmp_path):
    config = ModelConfig(embedding_dim=8, num_heads=2, num_products=12, num_sources=5)
    pretrain_data = PretrainDataset(write_table(tmp_path / "p.parquet", PRETRAIN_ROWS))
    finetune_data = FinetuneDataset(write_table(tmp_path / "f.parquet", FINETUNE_ROWS))

    pretrain_batch = next(iter(DataLoader(pretrain_data, batch_size=3, collate_fn=collate)))
    pretrain_output = PretrainModel(Backbone(config))(pretrain_batch)
    assert pretrain_output["num_predictions"].item() == 2 + 2 + 1

    finetune_batch = next(iter(DataLoader(finetune_data, batch_size=2, collate_fn=collate)))
    finetune_output = FinetuneModel(Backbone(config))(finetune_batch)
    assert finetune_output["logits"].shape == (9,)
    assert torch.isfinite(finetune_output["loss"]).item()


def test_missing_column(tmp_path):
    rows = {name: value for name, value in PRETRAIN_ROWS.items() if name != "target_index"}
    path = write_table(tmp_path / "pretrain.parquet", rows)
    with pytest.raises(ValueError, match="target_index"):
        PretrainDataset(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        PretrainDataset(tmp_path / "absent.parquet")


def test_target_outside_history(tmp_path):
    path = write_table(tmp_path / "pretrain.parquet", PRETRAIN_ROWS, target_index=[[0], [3], [1]])
    with pytest.raises(ValueError, match="first in row 1"):
        PretrainDataset(path)


def test_null_list_rejected(tmp_path):
    path = write_table(tmp_path / "pretrain.parquet", PRETRAIN_ROWS, target_index=[[0], None, [1]])
    with pytest.raises(ValueError, match="null lists"):
        PretrainDataset(path)


def test_parallel_lists_checked(tmp_path):
    path = write_table(
        tmp_path / "pretrain.parquet",
        PRETRAIN_ROWS,
        source=[[1, 1, 2, 3, 4], [2, 2], [1, 2, 1, 2, 1, 2]],
    )
    with pytest.raises(ValueError, match="'source'"):
        PretrainDataset(path)


def test_request_sizes_checked(tmp_path):
    path = write_table(tmp_path / "finetune.parquet", FINETUNE_ROWS, request_size=[[3, 2], [3]])
    with pytest.raises(ValueError, match="request_size"):
        FinetuneDataset(path)


def test_state_index_checked(tmp_path):
    path = write_table(tmp_path / "finetune.parquet", FINETUNE_ROWS, state_index=[[2, 5], [5]])
    with pytest.raises(ValueError, match="state_index"):
        FinetuneDataset(path)


def test_empty_file(tmp_path):
    rows = {name: ([], kind) for name, (_, kind) in PRETRAIN_ROWS.items()}
    dataset = PretrainDataset(write_table(tmp_path / "pretrain.parquet", rows))
    assert len(dataset) == 0


def test_bucket_sampler_covers_every_sample_once():
    lengths = np.random.default_rng(0).integers(1, 512, size=103)
    sampler = LengthBucketBatchSampler(lengths, batch_size=8, seed=1, pool_batches=4)
    for _ in range(2):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = sorted(i for batch in batches for i in batch)
        assert flat == list(range(103))


def test_bucket_sampler_reduces_padding():
    lengths = np.random.default_rng(0).integers(1, 512, size=800)
    bucketed = list(LengthBucketBatchSampler(lengths, batch_size=16, seed=0))
    padded = sum(len(b) * lengths[b].max() for b in bucketed)
    random_batches = np.array_split(np.random.default_rng(0).permutation(800), 50)
    padded_random = sum(len(b) * lengths[b].max() for b in random_batches)
    assert padded < 0.7 * padded_random


def test_bucket_sampler_order_changes_per_epoch():
    sampler = LengthBucketBatchSampler(np.arange(64), batch_size=4, seed=0)
    assert list(sampler) != list(sampler)


# --- side features -------------------------------------------------------------------------------

PRETRAIN_SIDECAR = {
    "user": ([3, 7, 9], pa.int32()),
    "city": ([[1, 1, 1, 2, 2], [3, 3, 3], [1, 1, 1, 1, 1, 1]], I32),
    "store": ([[4, 4, 5, 6, 6], [7, 7, 0], [4, 4, 4, 4, 4, 4]], I32),
}
FINETUNE_SIDECAR = {
    "user": ([4, 8], pa.int32()),
    "city": ([[1, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3]], I32),
    "store": ([[4, 4, 5, 6, 6], [7, 7, 7, 7, 7, 7]], I32),
    "request_city": ([[2, 1], [3]], I32),
    "request_store": ([[6, 0], [7]], I32),
}


def write_with_sidecar(directory, name, rows, sidecar, **replace):
    path = write_table(directory / name, rows)
    (directory / "features").mkdir(exist_ok=True)
    write_table(directory / "features" / name, sidecar, **replace)
    return path


def test_pretrain_side_features(tmp_path):
    path = write_with_sidecar(tmp_path, "p.parquet", PRETRAIN_ROWS, PRETRAIN_SIDECAR)
    sample = PretrainDataset(path, ("timestamp", "store", "city"))[1]
    history = sample["history"]
    assert history["city"].tolist() == [3, 3, 3]
    assert history["store"].tolist() == [7, 7, 0]
    assert history["timestamp"].tolist() == [1, 2, 3]
    assert history["city"].dtype == torch.int64


def test_finetune_side_features(tmp_path):
    path = write_with_sidecar(tmp_path, "f.parquet", FINETUNE_ROWS, FINETUNE_SIDECAR)
    sample = FinetuneDataset(path, ("city", "store", "timestamp"))[0]
    assert sample["history"]["store"].tolist() == [4, 4, 5, 6, 6]
    assert sample["requests"]["city"].tolist() == [2, 1]
    assert sample["requests"]["store"].tolist() == [6, 0]
    assert sample["requests"]["timestamp"].tolist() == [60, 70]


def test_side_features_collate(tmp_path):
    path = write_with_sidecar(tmp_path, "f.parquet", FINETUNE_ROWS, FINETUNE_SIDECAR)
    dataset = FinetuneDataset(path, ("city", "timestamp"))
    batch = collate([dataset[0], dataset[1]])
    assert batch["history"]["city"].shape == batch["history"]["product"].shape
    assert batch["requests"]["timestamp"].tolist() == [60, 70, 9]
    assert "store" not in batch["requests"]


def test_no_side_features_by_default(tmp_path):
    path = write_with_sidecar(tmp_path, "p.parquet", PRETRAIN_ROWS, PRETRAIN_SIDECAR)
    history = PretrainDataset(path)[0]["history"]
    assert "city" not in history
    assert "timestamp" not in history


def test_missing_sidecar_named(tmp_path):
    path = write_table(tmp_path / "p.parquet", PRETRAIN_ROWS)
    with pytest.raises(FileNotFoundError, match="city_name and store_id"):
        PretrainDataset(path, ("city",))


def test_sidecar_other_users_rejected(tmp_path):
    path = write_with_sidecar(
        tmp_path, "p.parquet", PRETRAIN_ROWS, PRETRAIN_SIDECAR, user=[3, 7, 10]
    )
    with pytest.raises(ValueError, match="list different users"):
        PretrainDataset(path, ("store",))


def test_sidecar_not_parallel_rejected(tmp_path):
    path = write_with_sidecar(
        tmp_path, "p.parquet", PRETRAIN_ROWS, PRETRAIN_SIDECAR, city=[[1], [3, 3, 3], [1] * 6]
    )
    with pytest.raises(ValueError, match="'city'"):
        PretrainDataset(path, ("city",))


def test_unknown_side_feature_rejected(tmp_path):
    path = write_table(tmp_path / "p.parquet", PRETRAIN_ROWS)
    with pytest.raises(ValueError, match="unknown side features"):
        PretrainDataset(path, ("hour",))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=200),
    max_tokens=st.integers(1, 2000),
    seed=st.integers(0, 100),
)
def test_token_sampler_covers_every_sample_within_budget(lengths, max_tokens, seed):
    lengths = np.array(lengths)
    batches = list(TokenBudgetBatchSampler(lengths, max_tokens, seed=seed, pool_batches=3))
    covered = np.sort(np.concatenate([np.array(batch) for batch in batches]))
    assert covered.tolist() == list(range(len(lengths)))
    for batch in batches:
        cost = len(batch) * lengths[batch].max()
        assert cost <= max_tokens or len(batch) == 1


def test_token_sampler_long_history_alone():
    lengths = np.array([5, 100, 5, 5])
    batches = list(TokenBudgetBatchSampler(lengths, 20, seed=0))
    assert [1] in batches


def test_token_sampler_reshuffles_each_epoch():
    sampler = TokenBudgetBatchSampler(np.arange(1, 201), 500, seed=3)
    first, second = list(sampler), list(sampler)
    assert first != second


def test_token_sampler_resumes_epoch():
    lengths = np.arange(1, 201)
    sampler = TokenBudgetBatchSampler(lengths, 500, seed=3)
    list(sampler)
    expected = list(sampler)
    resumed = TokenBudgetBatchSampler(lengths, 500, seed=3)
    resumed.epoch = 1
    assert list(resumed) == expected


def test_token_sampler_length_matches_iteration():
    sampler = TokenBudgetBatchSampler(np.arange(1, 101), 300, seed=0)
    assert len(sampler) == len(list(sampler))


def test_token_sampler_rejects_zero_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler(np.ones(3), 0)
