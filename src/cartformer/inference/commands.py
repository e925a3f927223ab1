"""The `cartformer score`, `submit` and `catboost` commands: their options and handlers.

This module imports only the standard library at load time, so building the parser stays
cheap. The handlers import torch, polars and (for `catboost`) catboost when they run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

COMMANDS: tuple[str, ...] = ("score", "submit", "catboost")
FINETUNE_VARIANT_CHOICES = ("scratch", "pretrained-backbone", "pretrained-backbone-heads")
DEFAULT_BATCH_TOKENS = 8192  # the same value as cartformer.inference.score.DEFAULT_BATCH_TOKENS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the `score`, `submit` and `catboost` subcommands to the `cartformer` parser."""
    score = sub.add_parser(
        "score", help="score a requests file with a trained run and write a scores parquet"
    )
    score.add_argument("--run", type=Path, required=True, help="trained run directory")
    score.add_argument(
        "--requests",
        type=Path,
        required=True,
        help="Lavka-schema parquet of the rows to score, such as the competition's test file",
    )
    score.add_argument("--output", type=Path, required=True, help="scores parquet to write")
    score.add_argument(
        "--events",
        type=Path,
        help="Lavka-schema event log that the histories come from (default: the run's input file)",
    )
    score.add_argument(
        "--variant",
        choices=FINETUNE_VARIANT_CHOICES,
        help="finetune variant (default: the finished one with the best validation NDCG@10)",
    )
    score.add_argument(
        "--lag-days",
        type=float,
        default=0.0,
        help="score from the latest positive event at least this many days before the request; "
        "0 takes the latest one strictly before it (default: 0)",
    )
    score.add_argument(
        "--batch-tokens",
        type=int,
        default=DEFAULT_BATCH_TOKENS,
        help=f"padded history events per scoring batch (default: {DEFAULT_BATCH_TOKENS})",
    )
    _add_device(score)

    submit = sub.add_parser(
        "submit", help="write the competition's submission CSV (index,request_id) from scores"
    )
    submit.add_argument(
        "--scores", type=Path, required=True, help="scores parquet that `cartformer score` wrote"
    )
    submit.add_argument(
        "--requests",
        type=Path,
        help="the scored requests file, to check that every index appears once (default: the "
        "file recorded in the scores)",
    )
    submit.add_argument("--output", type=Path, required=True, help="submission CSV to write")

    from cartformer.ranking.commands import add_catboost_parser

    add_catboost_parser(sub)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        help="torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N "
        "(default: the run's finetune device)",
    )


def run_command(args: argparse.Namespace, log_to_file: Callable[[Path], None]) -> int:
    """Run `score`, `submit` or `catboost`; `log_to_file` adds a log file handler."""
    if args.command == "score" and args.run.is_dir():
        log_to_file(args.run / "cartformer.log")
    elif args.command == "catboost":
        args.out.mkdir(parents=True, exist_ok=True)
        log_to_file(args.out / "cartformer.log")
    logger.info("command: cartformer %s", " ".join(sys.argv[1:]))
    if args.command == "score":
        return run_score(args)
    if args.command == "submit":
        return run_submit(args)
    from cartformer.ranking.commands import run_catboost

    return run_catboost(args)


def run_score(args: argparse.Namespace) -> int:
    """Score `args.requests` with the run `args.run` and write the scores parquet."""
    from cartformer.inference.score import score_requests, write_scores

    if args.batch_tokens < 1:
        raise ValueError(f"--batch-tokens must be at least 1, got {args.batch_tokens}")
    result = score_requests(
        args.run,
        args.requests,
        args.events,
        variant=args.variant,
        lag_days=args.lag_days,
        device=args.device,
        batch_tokens=args.batch_tokens,
    )
    path = write_scores(result, args.output)
    counts = result.counts
    print(
        f"scored {counts['rows']} rows of {counts['requests']} requests with variant "
        f"{result.metadata['variant']} in {result.metadata['seconds']:.1f} s; "
        f"{counts['rows_fallback']} rows got the fallback score "
        f"({counts['rows_no_history']} without history, "
        f"{counts['rows_unseen_product']} with an unseen product)"
    )
    print(f"wrote {path}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    """Write the submission CSV of the scores file `args.scores`."""
    from cartformer.inference.submit import write_submission

    path = write_submission(args.scores, args.output, args.requests)
    print(f"wrote {path}")
    return 0
