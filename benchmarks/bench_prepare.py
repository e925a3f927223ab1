"""Time the prepare stage with the vectorized samples and with the per-user reference samples.

Usage:
    python benchmarks/bench_prepare.py DATA.parquet [--reference] [--make random|demo]

Each mode runs `cartformer.data.prepare.prepare` end to end (read, validate, encode, split,
samples, write) in its own subprocess, which reports its wall time and its peak resident set
size from `resource.getrusage(RUSAGE_SELF).ru_maxrss`. With `--reference` both modes run and
the script checks that they wrote identical tables and counts. `--make` first writes DATA: a
random Lavka-schema file (`--rows`, default 1.5M) or the demo generator's "small" data set.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="input parquet in the Lavka train.parquet schema")
    parser.add_argument(
        "--reference", action="store_true", help="also run the reference samples and compare"
    )
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
    parser.add_argument("--worker", choices=("vectorized", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_worker(args.data, args.out, args.worker)
        return
    if args.make_only:
        make_input(args.data, args.make, args.rows, args.seed)
        return
    if args.make:
        # A child inherits its parent's peak RSS across fork and exec on Linux, so the large
        # arrays of the generator must live in a process that is not the workers' parent.
        command = [sys.executable, __file__, str(args.data), "--make", args.make, "--make-only"]
        command += ["--rows", str(args.rows), "--seed", str(args.seed)]
        subprocess.run(command, check=True)
    if not args.data.is_file():
        sys.exit(f"input file {args.data} not found; pass --make random to create one")

    rows = pl.scan_parquet(args.data).select(pl.len()).collect().item()
    print(f"input: {args.data} ({rows} rows, {args.data.stat().st_size / 2**20:.1f} MiB)")
    modes = ["vectorized", "reference"] if args.reference else ["vectorized"]
    with tempfile.TemporaryDirectory() as scratch:
        results = {mode: run_mode(args.data, Path(scratch) / mode, mode) for mode in modes}
        for mode, result in results.items():
            print(
                f"{mode:>10}: wall {result['wall_s']:8.2f} s, peak RSS "
                f"{result['max_rss_mib']:7.0f} MiB (after imports {result['import_rss_mib']:.0f})"
            )
        if args.reference:
            compare_outputs(Path(scratch) / "vectorized", Path(scratch) / "reference")
            speedup = results["reference"]["wall_s"] / results["vectorized"]["wall_s"]
            print(f"outputs identical; vectorized is {speedup:.1f}x faster end to end")


def run_mode(data: Path, out: Path, mode: str) -> dict[str, float]:
    command = [sys.executable, __file__, str(data), "--worker", mode, "--out", str(out)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_worker(data: Path, out: Path, mode: str) -> None:
    """Run one prepare and print its timing as the last stdout line, in JSON."""
    from cartformer.config import DataConfig
    from cartformer.data.prepare import prepare

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    prepare(data, out, DataConfig(), sample_builder=mode)
    wall = time.perf_counter() - started
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {"wall_s": wall, "max_rss_mib": max_rss / 1024, "import_rss_mib": import_rss / 1024}
    print(json.dumps(result))


def make_input(path: Path, kind: str, rows: int, seed: int) -> None:
    if kind == "random":
        write_random_file(path, rows, seed)
        return
    from cartformer.data.demo import write_demo

    path.parent.mkdir(parents=True, exist_ok=True)
    write_demo(path, size="small", seed=seed)
    print(f"wrote the demo data set 'small' to {path}")


def compare_outputs(left: Path, right: Path) -> None:
    for name in TABLES:
        left_table = pl.read_parquet(left / f"{name}.parquet")
        right_table = pl.read_parquet(right / f"{name}.parquet")
        assert left_table.equals(right_table), f"{name}.parquet differs between the two modes"
    meta_a = json.loads((left / "meta.json").read_text())
    meta_b = json.loads((right / "meta.json").read_text())
    assert meta_a["counts"] == meta_b["counts"], "meta.json counts differ"
    assert meta_a["dropped"] == meta_b["dropped"], "meta.json dropped counts differ"


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
