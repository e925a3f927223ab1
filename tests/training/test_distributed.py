"""Sharded batches, bf16 autocast, and two torchrun processes against one process."""

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cartformer import pipeline
from cartformer.cli import main
from cartformer.config import RunConfig, TrainConfig
from cartformer.data.dataset import (
    FinetuneDataset,
    LengthBucketBatchSampler,
    PretrainDataset,
    TokenBudgetBatchSampler,
)
from cartformer.data.demo import write_demo
from cartformer.training import distributed
from cartformer.training.loop import resolve_amp, train_stage

MODEL = ["--dropout", "0", "--embedding-dim", "16", "--device", "cpu"]
# Per-process batch budget of the two-process run; the one-process run gets twice this.
RANK_TOKENS = 128


def padded_cost(part: list[int], lengths: np.ndarray) -> int:
    return len(part) * int(lengths[part].max())


def epoch_parts(lengths: np.ndarray, budget: int, world_size: int, epoch: int) -> list[list]:
    """Return [rank][step] parts of one epoch, each rank with its own sampler copy."""
    parts = []
    for rank in range(world_size):
        sampler = distributed.ShardedBatchSampler(
            TokenBudgetBatchSampler(lengths, budget * world_size, seed=5), lengths, rank, world_size
        )
        sampler.epoch = epoch
        parts.append(list(sampler))
    return parts


class FixedBatches:
    """Batch sampler stub that yields the same batches every epoch."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.epoch = 0

    def __iter__(self):
        self.epoch += 1
        yield from self.batches


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models here are tiny. One thread avoids OpenMP threads spinning while other processes
    # share the cores, which made a tiny epoch 50 times slower on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lengths() -> np.ndarray:
    return np.random.default_rng(0).integers(1, 65, size=300)


# --- ShardedBatchSampler ------------------------------------------------------------------------


@pytest.mark.parametrize("budget_kind", ["tokens", "users"])
def test_sampler_world_one_is_plain(lengths, budget_kind):
    def make():
        if budget_kind == "tokens":
            return TokenBudgetBatchSampler(lengths, 256, seed=1)
        return LengthBucketBatchSampler(lengths, 8, seed=1)

    plain, wrapped = make(), distributed.ShardedBatchSampler(make(), lengths, 0, 1)
    for _ in range(2):
        assert list(wrapped) == list(plain)
    assert wrapped.epoch == plain.epoch
    assert len(wrapped) == len(plain)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_parts_disjoint_complete(lengths, world_size):
    for epoch in range(2):
        parts = epoch_parts(lengths, 256, world_size, epoch)
        steps = {len(rank_parts) for rank_parts in parts}
        assert len(steps) == 1, f"ranks run different step counts {steps}"
        every_index = [i for rank_parts in parts for part in rank_parts for i in part]
        assert sorted(every_index) == list(range(len(lengths)))
        assert all(len(part) > 0 for rank_parts in parts for part in rank_parts)


def test_sampler_steps_hold_global_batches(lengths):
    parts = epoch_parts(lengths, 256, 2, epoch=0)
    global_batches = list(TokenBudgetBatchSampler(lengths, 512, seed=5))
    assert len(parts[0]) == len(global_batches)
    for step, batch in enumerate(global_batches):
        assert sorted(parts[0][step] + parts[1][step]) == sorted(batch)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_parts_share_cost(lengths, world_size):
    # The costliest part stays within one history of an even share of the global batch's
    # padded cost, and so within one history of one process's budget.
    parts = epoch_parts(lengths, 256, world_size, epoch=0)
    for step_parts in zip(*parts, strict=True):
        batch = [i for part in step_parts for i in part]
        longest = int(lengths[batch].max())
        even_share = len(batch) * longest / world_size
        costliest = max(padded_cost(part, lengths) for part in step_parts)
        assert costliest <= even_share + longest
        assert costliest <= 256 + longest


def test_sampler_merges_small_batches(caplog):
    lengths = np.full(9, 3)
    batches = [[0, 1, 2, 3], [4], [5, 6, 7], [8]]
    caplog.set_level(logging.INFO)
    ranks = [
        list(distributed.ShardedBatchSampler(FixedBatches(batches), lengths, rank, 2))
        for rank in range(2)
    ]
    assert len(ranks[0]) == 3
    assert len(ranks[1]) == 3
    assert sorted(ranks[0][2] + ranks[1][2]) == [4, 8]
    assert "merged 2 global batches" in caplog.text


def test_sampler_remainder_joins_last_batch():
    lengths = np.full(7, 3)
    batches = [[0, 1, 2], [3, 4, 5], [6]]
    ranks = [
        list(distributed.ShardedBatchSampler(FixedBatches(batches), lengths, rank, 2))
        for rank in range(2)
    ]
    assert len(ranks[0]) == 2
    assert sorted(ranks[0][1] + ranks[1][1]) == [3, 4, 5, 6]


def test_sampler_epoch_continues(lengths):
    fresh = distributed.ShardedBatchSampler(
        TokenBudgetBatchSampler(lengths, 512, seed=5), lengths, 1, 2
    )
    for _ in range(3):
        list(fresh)
    resumed = distributed.ShardedBatchSampler(
        TokenBudgetBatchSampler(lengths, 512, seed=5), lengths, 1, 2
    )
    resumed.epoch = 3
    steps = len(resumed)
    assert resumed.epoch == 3
    batches = list(resumed)
    assert batches == list(fresh)
    assert len(batches) == steps
    assert resumed.epoch == 4


def test_sampler_rejects_tiny_dataset():
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        distributed.ShardedBatchSampler(TokenBudgetBatchSampler(np.ones(3), 8), np.ones(3), 0, 4)


def test_sampler_rejects_bad_rank(lengths):
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        distributed.ShardedBatchSampler(TokenBudgetBatchSampler(lengths, 8), lengths, 2, 2)


@pytest.mark.parametrize(
    ("size", "parts"), [(1, 1), (2, 2), (3, 2), (3, 3), (7, 3), (50, 1), (50, 2), (50, 3)]
)
def test_split_batch_makes_parts(size, parts):
    lengths = np.random.default_rng(size).integers(1, 100, size=60)
    batch = np.random.default_rng(parts).choice(60, size=size, replace=False)
    split = distributed.split_batch(batch, lengths, parts)
    assert len(split) == parts
    assert all(len(part) > 0 for part in split)
    assert sorted(np.concatenate(split).tolist()) == sorted(batch.tolist())


def test_split_batch_isolates_long_history():
    lengths = np.array([500, 10, 10, 10])
    parts = distributed.split_batch(np.arange(4), lengths, 2)
    assert parts[0].tolist() == [0]
    assert sorted(parts[1].tolist()) == [1, 2, 3]


def test_shard_indices_cover_once():
    shards = [distributed.shard_indices(11, rank, 3) for rank in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(11))


def test_helpers_without_group():
    assert distributed.get_world_size() == 1
    assert distributed.get_rank() == 0
    assert distributed.is_main_process()
    values = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(values).tolist() == [1.0, 2.0]
    wrapped = distributed.main_process_only(default=list)(lambda: [1])
    assert wrapped() == [1]


# --- bf16 autocast -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amp", "device", "expected"),
    [("auto", "cpu", False), ("off", "cpu", False), ("bf16", "cpu", True)],
)
def test_resolve_amp(amp, device, expected):
    assert resolve_amp(amp, torch.device(device)) is expected


def test_resolve_amp_rejects_unknown():
    with pytest.raises(ValueError, match="invalid --amp 'fp8'"):
        resolve_amp("fp8", torch.device("cpu"))


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "train.parquet"
    write_demo(path, size="tiny", seed=3)
    return path


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory, demo_file) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    code = main(["prepare", "--data", str(demo_file), "--out", str(out), "--max-history", "64"])
    assert code == 0
    return out


def train_pretrain(run_dir: Path, stage_dir: Path, amp: str) -> tuple[float, set]:
    """Train one pretrain epoch with ``amp``; return its train loss and the Linear output dtypes."""
    cfg = RunConfig.load(run_dir / "config.json")
    cfg.model.embedding_dim = 16
    cfg.model.dropout = 0.0
    pipeline.model_config_from_meta(cfg.model, pipeline.load_meta(pipeline.RunLayout(run_dir)))
    train_cfg = TrainConfig(max_epochs=1, batch_tokens=256, device="cpu", amp=amp)
    torch.manual_seed(0)
    model = pipeline.build_pretrain_model(cfg.model)
    dtypes: set = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, output: dtypes.add(output.dtype))
    prepared = run_dir / "prepared"
    result = train_stage(
        model,
        pipeline.make_loader(PretrainDataset(prepared / "pretrain_train.parquet"), train_cfg, True),
        pipeline.make_loader(
            PretrainDataset(prepared / "pretrain_valid.parquet"), train_cfg, False
        ),
        pipeline.validate_pretrain,
        train_cfg,
        stage_dir,
        monitor="loss",
        mode="min",
        model_config={},
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return result.history[0]["train_loss"], dtypes


def test_bf16_autocast_on_cpu(prepared_run, tmp_path):
    bf16_loss, bf16_dtypes = train_pretrain(prepared_run, tmp_path / "bf16", "bf16")
    fp32_loss, fp32_dtypes = train_pretrain(prepared_run, tmp_path / "fp32", "auto")
    assert torch.bfloat16 in bf16_dtypes
    assert fp32_dtypes == {torch.float32}
    assert math.isfinite(bf16_loss)
    # bf16 keeps 8 bits of mantissa, so one epoch's mean loss moves by well under 1%.
    assert bf16_loss == pytest.approx(fp32_loss, rel=1e-2)
    assert bf16_loss != fp32_loss


# --- two processes against one -------------------------------------------------------------------

# Two commands in one torchrun launch, which saves a second start of three Python processes:
# pretrain one epoch, then `run` resumes it for a second epoch, finetunes and evaluates.
TWO_COMMANDS = """
import sys
from cartformer.cli import main

out, data, tokens = sys.argv[1], sys.argv[2], sys.argv[3]
model = sys.argv[4:]
code = main(["pretrain", "--out", out, "--epochs", "1", "--batch-tokens", tokens, *model])
if code == 0:
    code = main([
        "run", "--out", out, "--data", data, "--max-history", "64", "--resume",
        "--pretrain-epochs", "2", "--finetune-epochs", "2", "--variants", "pretrained-backbone",
        "--pretrain-batch-tokens", tokens, "--finetune-batch-tokens", tokens, *model,
    ])
sys.exit(code)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_history(run_dir: Path, stage: str) -> list[dict]:
    path = run_dir / "checkpoints" / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, prepared_run, demo_file) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    shutil.copytree(prepared_run, out)
    tokens = str(2 * RANK_TOKENS)
    code = main(
        [
            "run",
            "--out",
            str(out),
            "--data",
            str(demo_file),
            "--max-history",
            "64",
            "--pretrain-epochs",
            "2",
            "--finetune-epochs",
            "2",
            "--variants",
            "pretrained-backbone",
            "--pretrain-batch-tokens",
            tokens,
            "--finetune-batch-tokens",
            tokens,
            *MODEL,
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, prepared_run, demo_file) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(prepared_run, out)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's connections on loopback
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--no-python",
        sys.executable,
        "-c",
        TWO_COMMANDS,
        str(out),
        str(demo_file),
        str(RANK_TOKENS),
        *MODEL,
    ]
    # A session of its own lets a timeout end the workers too, not only torchrun's agent.
    launch = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = launch.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        output, _ = launch.communicate()
        pytest.fail(f"torchrun timed out after 300 s:\n{output[-4000:]}")
    assert launch.returncode == 0, output[-4000:]
    return out, output


@pytest.mark.slow
def test_global_batches_need_no_merge(prepared_run):
    # Merged batches would differ from the one-process run's, so the comparison below relies on
    # every global batch of its two epochs holding at least one sample per process.
    for name, dataset in (
        ("pretrain", PretrainDataset(prepared_run / "prepared" / "pretrain_train.parquet")),
        ("finetune", FinetuneDataset(prepared_run / "prepared" / "finetune_train.parquet")),
    ):
        sampler = TokenBudgetBatchSampler(dataset.history_lengths, 2 * RANK_TOKENS)
        sizes = [len(batch) for _ in range(2) for batch in sampler]
        assert min(sizes) >= 2, f"{name}: a global batch has one sample; change RANK_TOKENS"


# Tolerance: the two runs add the same float32 numbers in a different order (each rank sums
# its half of a batch, then the gradients are averaged), so the metrics differ by rounding:
# at most 7e-8 relative in these two epochs. Averaging the halves' mean losses without their
# prediction counts instead moved them by 3e-5 to 1.2e-4, so 1e-6 separates the two clearly.
TOLERANCE = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "metric"),
    [
        ("pretrain", "train_loss"),
        ("pretrain", "train_feedback_loss"),
        ("pretrain", "valid_loss"),
        ("finetune-pretrained-backbone", "train_loss"),
        ("finetune-pretrained-backbone", "valid_loss"),
        ("finetune-pretrained-backbone", "valid_ndcg10"),
    ],
)
def test_two_processes_match_one(one_process_run, two_process_run, stage, metric):
    expected = [record[metric] for record in read_history(one_process_run, stage)]
    actual = [record[metric] for record in read_history(two_process_run[0], stage)]
    assert len(expected) == 2
    assert actual == pytest.approx(expected, rel=TOLERANCE)


@pytest.mark.slow
def test_two_processes_write_once(two_process_run):
    out, output = two_process_run
    assert [r["epoch"] for r in read_history(out, "pretrain")] == [1, 2]
    assert [r["epoch"] for r in read_history(out, "finetune-pretrained-backbone")] == [1, 2]
    assert output.count("pretrain epoch 2:") == 1
    assert "pretrain: resuming after epoch 1" in output
    assert "as rank 0" in output
    assert "as rank 1" not in output
    assert output.count("report: ") == 1
    assert (out / "report.md").is_file()
    assert (out / "evaluation" / "summary.json").is_file()
