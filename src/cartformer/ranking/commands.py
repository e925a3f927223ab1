"""The `cartformer catboost` command: its options and handler.

Only the standard library is imported at load time; catboost is imported when a ranker trains.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# Transformer training lengths of the stage: the same as `cartformer run` on demo data.
DEFAULT_PRETRAIN_EPOCHS = 10
DEFAULT_FINETUNE_EPOCHS = 12
DEFAULT_PATIENCE = 3


def add_catboost_parser(sub: argparse._SubParsersAction) -> None:
    """Add the `catboost` subcommand to the `cartformer` parser."""
    parser = sub.add_parser(
        "catboost",
        help="train the transformer on period A and CatBoost rankers on period B, "
        "evaluate on period C",
    )
    parser.add_argument("--data", type=Path, required=True, help="Lavka-schema parquet file")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="stage directory; the transformer run goes to OUT/transformer and the report to "
        "OUT/catboost",
    )

    parser.add_argument(
        "--period-days",
        type=float,
        default=30.0,
        help="length of periods B and C in days; A is everything before them (default: 30)",
    )
    parser.add_argument(
        "--variant",
        choices=("scratch", "pretrained-backbone", "pretrained-backbone-heads"),
        default="scratch",
        help="finetune variant of the transformer (default: scratch)",
    )
    parser.add_argument(
        "--transformer-run",
        type=Path,
        help="use this trained run instead of training one on period A; it must pass the leak "
        "check, and its best variant is used",
    )

    parser.add_argument(
        "--pretrain-epochs",
        dest="stage_pretrain_epochs",
        metavar="EPOCHS",
        type=int,
        default=DEFAULT_PRETRAIN_EPOCHS,
        help=f"maximum pretrain epochs (default: {DEFAULT_PRETRAIN_EPOCHS})",
    )
    parser.add_argument(
        "--finetune-epochs",
        dest="stage_finetune_epochs",
        metavar="EPOCHS",
        type=int,
        default=DEFAULT_FINETUNE_EPOCHS,
        help=f"maximum finetune epochs (default: {DEFAULT_FINETUNE_EPOCHS})",
    )
    parser.add_argument(
        "--patience",
        dest="stage_patience",
        metavar="EPOCHS",
        type=int,
        default=DEFAULT_PATIENCE,
        help="epochs without validation improvement before a training stage stops "
        f"(default: {DEFAULT_PATIENCE})",
    )

    parser.add_argument(
        "--iterations",
        type=int,
        default=1000,
        help="maximum CatBoost trees; early stopping usually ends sooner (default: 1000)",
    )
    parser.add_argument(
        "--catboost-seed", type=int, default=0, help="CatBoost random seed (default: 0)"
    )
    parser.add_argument(
        "--device",
        dest="stage_device",
        metavar="DEVICE",
        default="auto",
        help="torch device of the transformer: auto, cpu, cuda or cuda:N (default: auto)",
    )


def run_catboost(args: argparse.Namespace) -> int:
    """Run the CatBoost stage and print its NDCG@10 table."""
    if importlib.util.find_spec("catboost") is None:
        message = 'catboost is not installed; install it with pip install "cartformer[catboost]"'
        logger.error("catboost failed: %s", message, extra={"file_only": True})
        print(f"cartformer catboost: error: {message}", file=sys.stderr)
        return 2
    from cartformer.config import RunConfig
    from cartformer.ranking.catboost_stage import StageSettings, run_catboost_stage

    for option, value in (
        ("--pretrain-epochs", args.stage_pretrain_epochs),
        ("--finetune-epochs", args.stage_finetune_epochs),
        ("--patience", args.stage_patience),
    ):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    config = RunConfig()
    config.pretrain.max_epochs = args.stage_pretrain_epochs
    config.finetune.max_epochs = args.stage_finetune_epochs
    config.pretrain.patience = config.finetune.patience = args.stage_patience
    settings = StageSettings(
        period_days=args.period_days,
        variant=args.variant,
        transformer_run=str(args.transformer_run) if args.transformer_run else "",
        iterations=args.iterations,
        seed=args.catboost_seed,
        device=args.stage_device,
    )
    summary = run_catboost_stage(args.data, args.out, settings, config)
    width = max(len(name) for name in summary["methods"]) + 2
    print(f"{'method':<{width}}{'NDCG@10 on C':>14}")
    for name, entry in sorted(
        summary["methods"].items(), key=lambda item: item[1]["ndcg10"], reverse=True
    ):
        print(f"{name:<{width}}{entry['ndcg10']:>14.4f}")
    rank = summary["feature_importance"]["transformer_score_rank"]
    print(
        f"transformer score importance rank: {rank} of {summary['feature_importance']['features']}"
    )
    print(f"report: {args.out / 'catboost' / 'report.md'}")
    return 0
