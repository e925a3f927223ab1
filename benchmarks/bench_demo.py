"""Time the demo generator and measure its peak memory for one size.

Usage:
    python benchmarks/bench_demo.py [--size tiny|small|full] [--seed 0] [--out DIR]

Runs `write_demo` once and prints the wall time, the peak resident set size of this process
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes the interpreter and the imports),
the row counts and the file sizes. Without `--out` the files go to a temporary directory that
is deleted afterwards.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import polars as pl

from cartformer.data.demo import DEMO_SIZES, write_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(DEMO_SIZES), default="small", help="demo size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator")
    parser.add_argument("--out", type=Path, help="directory to keep the files in")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        directory = args.out or Path(scratch)
        started = time.perf_counter()
        data_path, oracle_path = write_demo(directory / "train.parquet", args.size, args.seed)
        elapsed = time.perf_counter() - started
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = pl.scan_parquet(data_path).select(pl.len()).collect().item()
        pairs = pl.scan_parquet(oracle_path).select(pl.len()).collect().item()
        print(f"size {args.size}, seed {args.seed}")
        print(f"write_demo: {elapsed:.1f} s, peak RSS {peak_mib:.0f} MiB")
        print(f"events: {rows} rows, {data_path.stat().st_size / 2**20:.0f} MiB")
        print(f"oracle: {pairs} rows, {oracle_path.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
