"""Write a demo file with k times the users of the full-size demo, for preparation scaling runs.

The products, stores, cities and surfaces stay those of the full size. Only the number of
shoppers, and with it the number of rows, grows k times.

Usage:
    python benchmarks/scaled_demo.py OUT.parquet --scale 4
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from cartformer.data.demo import DEMO_SIZES, write_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output parquet path")
    parser.add_argument("--scale", type=int, default=2, help="multiple of the full size's users")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo generator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    full = DEMO_SIZES["full"]
    name = f"full-x{args.scale}"
    DEMO_SIZES[name] = dataclasses.replace(full, num_users=full.num_users * args.scale)
    started = time.perf_counter()
    write_demo(args.out, size=name, seed=args.seed)
    logging.info("wrote %s in %.1f s", args.out, time.perf_counter() - started)


if __name__ == "__main__":
    main()
