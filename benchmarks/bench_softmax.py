"""Time the full and the sampled pretrain retrieval softmax on large catalogues.

Usage:
    python benchmarks/bench_softmax.py [--catalogues 26500 100000 1000000]
        [--predictions 4096] [--num-negatives 4096] [--repeat 5] [--json RESULTS.json]

Each case (catalogue size, softmax mode, part) runs in its own subprocess, with a model in
training mode built from `ModelConfig(embedding_dim=64, dropout=0, softmax=MODE)`:

- `head`: `PretrainModel.retrieval_losses` plus `backward` for P random normalized user vectors
  and P positives. The full softmax encodes and projects every catalogue product and scores
  the P x M logits. The sampled softmax draws `--num-negatives` uniform products, encodes and
  projects the K <= P + N unique candidates and scores P x K logits with the logQ correction.
- `step`: forward and backward of the whole `PretrainModel` (backbone, both heads) on a batch
  of histories of 512 events whose every event is a target, so P = users * 511 predictions.
  The optimizer step is not included.

Positives and history products follow a Zipf distribution with exponent 1 over the catalogue,
and `target_counts` contains the expected counts of 10 million draws from it, rounded. A case
runs one warm-up step and then `--repeat` timed steps. It reports the median and fastest wall
time per step, the CPU time per step (user + system, all threads), the candidate count K, the
peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`, interpreter and imports included)
and that peak minus the resident size before the first step. On CUDA it also reports
`torch.cuda.max_memory_allocated`. NOTE: only the CPU path (`--device cpu`) has been run.

The script prints the 1-minute load average before and after each case, because other processes
on a shared machine slow the runs down. Workers run with `OMP_WAIT_POLICY=PASSIVE` unless the
environment sets it. With the default busy-waiting barrier, on a 2-core machine where another
process kept a core busy, the 2,000-product head case took about 17 times more CPU time (1.1 s
against 63 ms per step in the torch profiler, torch 2.13 CPU).

A full-softmax case whose P x M float32 logits would take more than `--max-logits-gib` is
skipped to bound the run time. Both softmaxes compute their logits blockwise
(`cartformer.model.kernels.matmul_logsumexp`), so memory no longer grows with P x M, but the
time still does: the 1M catalogue at P = 4096 is 15.3 GiB of logits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

PARTS = ("head", "step")
MODES = ("full", "sampled")
HISTORY_LENGTH = 512


def load_average() -> float:
    return os.getloadavg()[0]


def resident_mib() -> float:
    """Return the current resident set size of this process in MiB, from /proc/self/statm."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def zipf_probabilities(num_products: int) -> Any:
    """Return (num_products,) probabilities with p_j proportional to 1 / j and p_0 = 0."""
    import torch

    weights = 1.0 / torch.arange(1, num_products, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), weights / weights.sum()])


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """Build one case, time it and return its figures."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from cartformer.config import ModelConfig
    from cartformer.model.backbone import Backbone
    from cartformer.model.pretrain import PretrainModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    num_products = args.catalogue + 1  # the reserved unknown index 0 is not a candidate
    probabilities = zipf_probabilities(num_products)
    target_counts = torch.round(probabilities * 10_000_000).to(torch.int64)
    config = ModelConfig(
        embedding_dim=args.embedding_dim,
        num_products=num_products,
        num_sources=8,
        dropout=0.0,
        softmax=args.mode,
        num_negatives=args.num_negatives,
        logq_correction=True,
    )
    model = PretrainModel(Backbone(config), config, target_counts=target_counts).to(device)
    model.train()

    if args.part == "head":
        dim = args.embedding_dim
        users = F.normalize(torch.randn(args.predictions, dim, device=device), dim=-1)
        users.requires_grad_()
        items = torch.randn(args.predictions, dim, device=device, requires_grad=True)
        products = torch.multinomial(probabilities, args.predictions, replacement=True).to(device)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            users.grad = None
            items.grad = None
            model.retrieval_losses(users, items, products).mean().backward()

        predictions = args.predictions
    else:
        num_users = max(1, round(args.predictions / (HISTORY_LENGTH - 1)))
        size = num_users * HISTORY_LENGTH
        history = {
            "product": torch.multinomial(probabilities, size, replacement=True),
            "source": torch.randint(1, 8, (size,)),
            "action": torch.randint(1, 4, (size,)),
            "position": torch.arange(HISTORY_LENGTH).repeat(num_users),
            "lengths": torch.full((num_users,), HISTORY_LENGTH),
            "target_index": torch.arange(HISTORY_LENGTH).repeat(num_users),
            "target_lengths": torch.full((num_users,), HISTORY_LENGTH),
        }
        batch = {"history": {key: value.to(device) for key, value in history.items()}}

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()

        predictions = num_users * (HISTORY_LENGTH - 1)

    candidates = _candidate_count(model, predictions, args)
    baseline_mib = resident_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    wall, cpu = [], []
    for _ in range(args.repeat):
        _synchronize(device)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _synchronize(device)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "catalogue": args.catalogue,
        "mode": args.mode,
        "part": args.part,
        "predictions": predictions,
        "candidates": candidates,
        "wall_ms_median": 1000 * statistics.median(wall),
        "wall_ms_min": 1000 * min(wall),
        "cpu_ms_median": 1000 * statistics.median(cpu),
        "peak_rss_mib": peak_mib,
        "step_rss_mib": peak_mib - baseline_mib,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _candidate_count(model: Any, predictions: int, args: argparse.Namespace) -> int:
    """Return the columns of the softmax: M for the full one, K of one draw for the sampled."""
    if args.mode == "full":
        return args.catalogue
    import torch

    from cartformer.model.losses import sample_candidates

    state = torch.random.get_rng_state()
    positives = torch.multinomial(zipf_probabilities(args.catalogue + 1), predictions, True)
    candidates, _ = sample_candidates(positives, args.catalogue + 1, args.num_negatives)
    torch.random.set_rng_state(state)
    return int(candidates.numel())


def _synchronize(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def logits_gib(catalogue: int, predictions: int) -> float:
    """Return the size of one float32 copy of the full softmax's P x (M + 1) logits in GiB."""
    return predictions * (catalogue + 1) * 4 / 2**30


def step_predictions(part: str, predictions: int) -> int:
    if part == "head":
        return predictions
    return max(1, round(predictions / (HISTORY_LENGTH - 1))) * (HISTORY_LENGTH - 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time the full and the sampled pretrain softmax on large catalogues."
    )
    parser.add_argument(
        "--catalogues",
        type=int,
        nargs="+",
        default=[26_500, 100_000, 1_000_000],
        help="catalogue sizes M, without the reserved index 0",
    )
    parser.add_argument("--predictions", type=int, default=4096, help="predictions P per step")
    parser.add_argument("--num-negatives", type=int, default=4096, help="uniform negatives N")
    parser.add_argument("--embedding-dim", type=int, default=64, help="embedding width D")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per case")
    parser.add_argument(
        "--max-logits-gib",
        type=float,
        default=2.0,
        help="skip full-softmax cases whose float32 logits take more than this many GiB",
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads, or 0 for torch's default"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and draws")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--catalogue", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_case(args)))
        return

    results = []
    for catalogue in args.catalogues:
        for part in args.parts:
            for mode in args.modes:
                predictions = step_predictions(part, args.predictions)
                size = logits_gib(catalogue, predictions)
                if mode == "full" and size > args.max_logits_gib:
                    print(
                        f"skip {part} full M={catalogue}: logits take {size:.1f} GiB, "
                        f"over --max-logits-gib {args.max_logits_gib}",
                        flush=True,
                    )
                    results.append(
                        {"catalogue": catalogue, "mode": mode, "part": part, "skipped": size}
                    )
                    continue
                results.append(_run_worker(args, catalogue, mode, part))

    print()
    print(
        "| M | part | softmax | P | K | ms/step median | fastest | CPU ms | peak RSS MiB "
        "| step RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        if "skipped" in row:
            print(
                f"| {row['catalogue']} | {row['part']} | {row['mode']} | | | skipped: logits "
                f"{row['skipped']:.1f} GiB | | | | |"
            )
            continue
        print(
            f"| {row['catalogue']} | {row['part']} | {row['mode']} | {row['predictions']} | "
            f"{row['candidates']} | {row['wall_ms_median']:.0f} | {row['wall_ms_min']:.0f} | "
            f"{row['cpu_ms_median']:.0f} | {row['peak_rss_mib']:.0f} | "
            f"{row['step_rss_mib']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def _run_worker(args: argparse.Namespace, catalogue: int, mode: str, part: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"--catalogue={catalogue}",
        f"--mode={mode}",
        f"--part={part}",
        f"--predictions={args.predictions}",
        f"--num-negatives={args.num_negatives}",
        f"--embedding-dim={args.embedding_dim}",
        f"--repeat={args.repeat}",
        f"--device={args.device}",
        f"--seed={args.seed}",
    ]
    if args.threads:
        command.append(f"--threads={args.threads}")
    # A busy-waiting OpenMP barrier slows small ops more than 10 times when another process
    # keeps a core busy, so the workers wait passively unless the caller chose otherwise.
    env = {**os.environ}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_before = load_average()
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    load_after = load_average()

    if completed.returncode != 0:
        raise RuntimeError(
            f"worker for M={catalogue} {mode} {part} failed with exit code "
            f"{completed.returncode}:\n{completed.stderr}"
        )

    row = json.loads(completed.stdout.strip().splitlines()[-1])
    row["load_before"], row["load_after"] = load_before, load_after
    print(
        f"M={catalogue} {part} {mode}: {row['wall_ms_median']:.0f} ms/step median, "
        f"K={row['candidates']}, peak RSS {row['peak_rss_mib']:.0f} MiB, load "
        f"{load_before:.2f} -> {load_after:.2f}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()
