"""Time the vectorized NDCG@10 against a per-request loop over `sklearn.metrics.ndcg_score`.

Run: `python benchmarks/bench_metrics.py --requests 100000`. Request sizes are uniform in
[1, 60], scores are standard normal and about 20% of the targets are 1.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import ndcg_score

from cartformer.evaluation.metrics import mean_ndcg_at_k, ndcg_at_k


def sklearn_ndcg(
    scores: np.ndarray, targets: np.ndarray, lengths: np.ndarray, k: int
) -> np.ndarray:
    """Compute NDCG@k per request with a plain loop over sklearn, for requests of 2 or more."""
    values = []
    start = 0
    for length in lengths:
        stop = start + int(length)
        if length > 1:
            values.append(
                ndcg_score(
                    targets[None, start:stop], scores[None, start:stop], k=k, ignore_ties=True
                )
            )
        start = stop
    return np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000, help="number of requests")
    parser.add_argument(
        "--sklearn-requests",
        type=int,
        default=5_000,
        help="number of requests timed with the sklearn loop",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(1, 61, size=args.requests)
    total = int(lengths.sum())
    scores = rng.normal(size=total)
    targets = (rng.random(total) < 0.2).astype(np.int8)

    start = time.perf_counter()
    per_request = ndcg_at_k(scores, targets, lengths)
    vectorized_seconds = time.perf_counter() - start
    print(f"ndcg_at_k: {args.requests} requests, {total} candidates in {vectorized_seconds:.3f} s")

    subset = min(args.sklearn_requests, args.requests)
    subset_candidates = int(lengths[:subset].sum())
    start = time.perf_counter()
    reference = sklearn_ndcg(
        scores[:subset_candidates], targets[:subset_candidates], lengths[:subset], k=10
    )
    sklearn_seconds = time.perf_counter() - start
    print(
        f"sklearn loop: {subset} requests in {sklearn_seconds:.3f} s "
        f"({sklearn_seconds / subset * args.requests:.1f} s estimated for {args.requests})"
    )

    counted = per_request[:subset][lengths[:subset] > 1]
    print(f"max abs difference on the subset: {np.abs(counted - reference).max():.2e}")
    print(f"mean NDCG@10 of random scores: {mean_ndcg_at_k(scores, targets, lengths):.4f}")


if __name__ == "__main__":
    main()
