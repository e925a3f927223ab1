"""Time the prepare stage against plain reference implementations and compare their output.

Usage:
    python benchmarks/bench_prepare.py DATA.parquet [--reference] [--reference-mode spec]
        [--repeat 1] [--json RESULTS.json] [--make random|demo]

Modes, each run in its own subprocess:

- `vectorized`: `cartformer.data.prepare.prepare` end to end (lazy read of the six needed
  columns, validation, encoding with joins, split, vectorized samples, write).
- `spec` (reference, the default with `--reference`):
  `cartformer.data.reference.prepare_reference`, the whole stage in a plain notebook style. It
  reads the whole file eagerly, builds the id mappings from sorted Python lists, splits with
  eager `group_by().agg()` and `Expr.mode`, and builds the samples in a per-user Python loop.
  It does not validate the input.
- `samples` (reference): `prepare(..., sample_builder="reference")`, which shares the reading,
  validation, encoding and split of `vectorized` and builds only the samples per user.

Each worker reports its wall time, its CPU time (user + system, all threads) and its peak
resident set size from `resource.getrusage(RUSAGE_SELF).ru_maxrss`. The script prints the
1-minute load average (`os.getloadavg`) before and after each run, because other processes on
the machine slow the runs down. With `--repeat N` the modes run N times, interleaved, and the
summary gives the fastest and the median wall time, the median CPU time and the largest peak
RSS of each mode. After the first round the script checks that every reference wrote the same
tables, mappings, split boundaries, vocabulary sizes and counts as `vectorized`. `--make` first
writes DATA: a random Lavka-schema file (`--rows`, default 1.5M) or the demo generator's
"small" data set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

DAY = 24 * 60 * 60
TABLES = (
    "events",
    "requests",
    "pretrain_train",
    "pretrain_valid",
    "finetune_train",
    "finetune_valid",
)
MAPPINGS = ("user", "product", "source")
SURFACES = (
    "ST_Catalog",
    "ST_Search",
    "ST_Main",
    "ST_Cart",
    "ST_Promo",
    "ST_Favorites",
    "ST_Recipes",
    "ST_Upsale",
    "ST_Category",
    "ST_Banner",
    "ST_Push",
    "ST_History",
)
MODES = ("vectorized", "spec", "samples")
MODE_LABELS = {
    "vectorized": "vectorized",
    "spec": "reference (spec-style)",
    "samples": "reference (shared reading)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="input parquet in the Lavka train.parquet schema")
    parser.add_argument(
        "--reference", action="store_true", help="also run the reference mode(s) and compare"
    )
    parser.add_argument(
        "--reference-mode",
        choices=("spec", "samples", "both"),
        default="spec",
        help="reference to run with --reference: the whole stage in plain notebook style (spec, "
        "the default), the per-user samples on the shared reading (samples), or both",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="number of runs of each mode (default 1)"
    )
    parser.add_argument("--json", type=Path, help="write every run and the summary to this file")
    parser.add_argument(
        "--make", choices=("random", "demo"), help="write DATA first: random rows or demo 'small'"
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=1_500_000,
        help="approximate number of rows that --make random writes",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --make")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_worker(args.data, args.out, args.worker)
        return
    if args.compare:
        compare_outputs(*args.compare)
        return
    if args.make_only:
        make_input(args.data, args.make, args.rows, args.seed)
        return
    if args.repeat < 1:
        sys.exit(f"--repeat is {args.repeat}; pass 1 or more")
    if args.make:
        # A child inherits its parent's peak RSS across fork and exec on Linux, so the large
        # arrays of the generator must live in a process that is not the workers' parent.
        command = [sys.executable, __file__, str(args.data), "--make", args.make, "--make-only"]
        command += ["--rows", str(args.rows), "--seed", str(args.seed)]
        subprocess.run(command, check=True)
    if not args.data.is_file():
        sys.exit(f"input file {args.data} not found; pass --make random to create one")

    rows = pl.scan_parquet(args.data).select(pl.len()).collect().item()
    size_mib = args.data.stat().st_size / 2**20
    print(f"input: {args.data} ({rows} rows, {size_mib:.1f} MiB)")
    modes = ["vectorized"]
    if args.reference:
        modes += ["spec", "samples"] if args.reference_mode == "both" else [args.reference_mode]

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.repeat):
            for mode in modes:
                out = Path(scratch) / mode
                result = {"mode": mode, "round": round_index, **run_mode(args.data, out, mode)}
                runs.append(result)
                print(format_run(result), flush=True)
            if round_index == 0:
                for mode in modes[1:]:
                    # In a subprocess, so that the tables read here do not raise the peak RSS
                    # that later workers inherit from this process.
                    expected, actual = Path(scratch) / "vectorized", Path(scratch) / mode
                    command = [sys.executable, __file__, str(args.data), "--compare"]
                    subprocess.run([*command, str(expected), str(actual)], check=True)
                    print(f"{MODE_LABELS[mode]}: output identical to vectorized")
            for mode in modes:
                shutil.rmtree(Path(scratch) / mode, ignore_errors=True)

    summary = summarize(runs, modes)
    print_summary(summary, modes)
    if args.json:
        record = {"input": str(args.data), "rows": rows, "size_mib": size_mib}
        record |= {"runs": runs, "summary": summary}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


def run_mode(data: Path, out: Path, mode: str) -> dict[str, float]:
    """Run one worker in a subprocess and return its timing with the load averages around it."""
    command = [sys.executable, __file__, str(data), "--worker", mode, "--out", str(out)]
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    load_after = os.getloadavg()[0]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**result, "load_before": load_before, "load_after": load_after}


def run_worker(data: Path, out: Path, mode: str) -> None:
    """Run one prepare and print its timing as the last stdout line, in JSON."""
    from cartformer.config import DataConfig
    from cartformer.data.prepare import prepare
    from cartformer.data.reference import prepare_reference

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_started = time.process_time()
    started = time.perf_counter()
    if mode == "spec":
        prepare_reference(data, out, DataConfig())
    else:
        builder = "reference" if mode == "samples" else "vectorized"
        prepare(data, out, DataConfig(), sample_builder=builder)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # user + system time of all threads
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "wall_s": wall,
        "cpu_s": cpu,
        "max_rss_mib": max_rss / 1024,
        "import_rss_mib": import_rss / 1024,
    }
    print(json.dumps(result))


def format_run(run: dict[str, Any]) -> str:
    label = f"{MODE_LABELS[run['mode']]:>26} (round {run['round'] + 1})"
    return (
        f"{label}: wall {run['wall_s']:8.2f} s, CPU {run['cpu_s']:7.2f} s, "
        f"peak RSS {run['max_rss_mib']:7.0f} MiB (after imports {run['import_rss_mib']:.0f}), "
        f"load {run['load_before']:.2f} -> {run['load_after']:.2f}"
    )


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Return per mode the fastest and median wall time, the median CPU time and the peak RSS.

    Each reference also gets the ratios of its times to those of `vectorized`: fastest to
    fastest, median to median, and median CPU time to median CPU time.
    """
    summary: dict[str, Any] = {}
    for mode in modes:
        walls = [run["wall_s"] for run in runs if run["mode"] == mode]
        cpus = [run["cpu_s"] for run in runs if run["mode"] == mode]
        summary[mode] = {
            "min_wall_s": min(walls),
            "median_wall_s": statistics.median(walls),
            "median_cpu_s": statistics.median(cpus),
            "max_rss_mib": max(run["max_rss_mib"] for run in runs if run["mode"] == mode),
        }
    base = summary["vectorized"]
    for mode in modes[1:]:
        entry = summary[mode]
        entry["speedup_min_wall"] = entry["min_wall_s"] / base["min_wall_s"]
        entry["speedup_median_wall"] = entry["median_wall_s"] / base["median_wall_s"]
        entry["speedup_median_cpu"] = entry["median_cpu_s"] / base["median_cpu_s"]
    return summary


def print_summary(summary: dict[str, Any], modes: list[str]) -> None:
    print("summary (wall time: fastest and median run; CPU time: median; peak RSS: largest):")
    for mode in modes:
        entry = summary[mode]
        print(
            f"{MODE_LABELS[mode]:>26}: wall {entry['min_wall_s']:8.2f} s "
            f"(median {entry['median_wall_s']:.2f}), CPU {entry['median_cpu_s']:.2f} s, "
            f"peak RSS {entry['max_rss_mib']:7.0f} MiB"
        )
    for mode in modes[1:]:
        entry = summary[mode]
        print(
            f"vectorized vs {MODE_LABELS[mode]}: {entry['speedup_min_wall']:.1f}x faster "
            f"(fastest runs), {entry['speedup_median_wall']:.1f}x (median runs), "
            f"{entry['speedup_median_cpu']:.1f}x less CPU time"
        )


def make_input(path: Path, kind: str, rows: int, seed: int) -> None:
    if kind == "random":
        write_random_file(path, rows, seed)
        return
    from cartformer.data.demo import write_demo

    path.parent.mkdir(parents=True, exist_ok=True)
    write_demo(path, size="small", seed=seed)
    print(f"wrote the demo data set 'small' to {path}")


def compare_outputs(expected: Path, actual: Path) -> None:
    """Raise AssertionError unless `actual` contains the tables, mappings and counts of `expected`.

    `expected` is a directory written by `prepare`. `actual` is one written by `prepare` or by
    `prepare_reference`, whose `reference_meta.json` stores all counts in one dict.
    """
    names = [*TABLES, *(f"mappings/{name}" for name in MAPPINGS)]
    for name in names:
        expected_table = pl.read_parquet(expected / f"{name}.parquet")
        actual_table = pl.read_parquet(actual / f"{name}.parquet")
        # DataFrame.equals compares values only (polars 2.1), so the dtypes get their own check.
        assert expected_table.schema == actual_table.schema, f"{name}.parquet dtypes differ"
        assert expected_table.equals(actual_table), f"{name}.parquet differs from vectorized"
    meta = json.loads((expected / "meta.json").read_text())
    reference_meta = actual / "reference_meta.json"
    if reference_meta.is_file():
        other = json.loads(reference_meta.read_text())
        other_counts = other["counts"]
    else:
        other = json.loads((actual / "meta.json").read_text())
        other_counts = {**other["counts"], **other["dropped"]}
    assert {**meta["counts"], **meta["dropped"]} == other_counts, "meta.json counts differ"
    assert meta["split"] == other["split"], "split boundaries differ"
    assert meta["vocab_sizes"] == other["vocab_sizes"], "vocabulary sizes differ"


def write_random_file(path: Path, rows: int, seed: int) -> None:
    """Write about `rows` random events in the Lavka schema, unsorted.

    Each request has 5..30 viewed products. About 12% of views get a cart row and 6% a click row.
    Purchases (null request and surface) add about 8% of the rows. Users and products follow
    a Zipf-like popularity so some histories exceed 512 events. Times span 120 days.
    """
    rng = np.random.default_rng(seed)
    num_requests = max(1, int(rows / 21))
    num_users = max(10, rows // 150)
    num_products = 20_000
    user_weights = 1.0 / np.arange(1, num_users + 1) ** 0.8
    user_ids = rng.choice(10**12, size=num_users, replace=False).astype(np.uint64)
    product_ids = rng.choice(10**9, size=num_products, replace=False).astype(np.uint64)
    product_weights = 1.0 / np.arange(1, num_products + 1) ** 0.9

    t0 = 1_720_000_000
    sizes = rng.integers(5, 31, size=num_requests)
    request_user = rng.choice(num_users, size=num_requests, p=user_weights / user_weights.sum())
    request_time = t0 + rng.integers(0, 120 * DAY, size=num_requests)
    request_source = rng.integers(0, len(SURFACES), size=num_requests)
    request_ids = rng.choice(10**15, size=num_requests, replace=False).astype(np.uint64)

    owner = np.repeat(np.arange(num_requests), sizes)
    p = product_weights / product_weights.sum()
    product = rng.choice(num_products, size=owner.size, p=p)
    time = request_time[owner] + rng.integers(0, 300, size=owner.size)
    parts = [_random_rows("AT_View", owner, product, time, request_user, request_source)]
    for action, rate in (("AT_CartUpdate", 0.12), ("AT_Click", 0.06)):
        picked = rng.random(owner.size) < rate
        later = time[picked] + rng.integers(1, 600, size=int(picked.sum()))
        args = (owner[picked], product[picked], later, request_user, request_source)
        parts.append(_random_rows(action, *args))
    frame = pl.concat(parts)
    frame = frame.with_columns(
        pl.Series("request_id", request_ids)[frame["owner"]].alias("request_id")
    ).drop("owner")

    num_purchases = int(0.08 * rows)
    purchases = pl.DataFrame(
        {
            "action_type": pl.Series(["AT_Purchase"]).new_from_index(0, num_purchases),
            "user": rng.choice(num_users, size=num_purchases, p=user_weights / user_weights.sum()),
            "product": rng.choice(num_products, size=num_purchases, p=p),
            "timestamp": t0 + rng.integers(0, 120 * DAY, size=num_purchases),
            "source_type": pl.Series([None], dtype=pl.String).new_from_index(0, num_purchases),
            "request_id": pl.Series([None], dtype=pl.UInt64).new_from_index(0, num_purchases),
        }
    )
    frame = pl.concat([frame, purchases], how="diagonal_relaxed")
    frame = frame.with_columns(
        pl.Series(user_ids)[frame["user"]].alias("user_id"),
        pl.Series(product_ids)[frame["product"]].alias("product_id"),
        pl.lit("Moscow").alias("city_name"),
        pl.lit(1, dtype=pl.Int64).alias("position_in_request"),
        pl.lit("Dairy").alias("product_category"),
        pl.lit("").alias("product_image"),
        pl.lit("item").alias("product_name"),
        pl.lit(1, dtype=pl.UInt64).alias("store_id"),
    ).drop("user", "product")
    frame = frame[rng.permutation(frame.height)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    print(f"wrote {frame.height} random rows to {path}")


def _random_rows(
    action: str,
    owner: np.ndarray,
    product: np.ndarray,
    time: np.ndarray,
    request_user: np.ndarray,
    request_source: np.ndarray,
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "action_type": pl.Series([action]).new_from_index(0, owner.size),
            "owner": owner,
            "user": request_user[owner],
            "product": product,
            "timestamp": time.astype(np.int64),
            "source_type": pl.Series(SURFACES)[request_source[owner]],
        }
    )


if __name__ == "__main__":
    main()
