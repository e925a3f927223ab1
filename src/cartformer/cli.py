"""The ``cartformer`` command line.

Each subcommand is one stage of a run directory (``--out``). Options given on the command line
override the run's saved ``config.json``; options left out keep the saved value, or the default
when the run is new.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from cartformer import __version__
from cartformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig

logger = logging.getLogger("cartformer")

DEMO_DATA_FILE = "demo/train.parquet"
ABLATION_ARM_NAMES = ("id-only", "categorical", "text", "time", "all")

# Training lengths for `run` on generated demo data when no epoch option is given: they keep the
# whole demo within about ten minutes on two CPU cores. Real data uses the config defaults.
DEMO_PRETRAIN_EPOCHS = 10
DEMO_FINETUNE_EPOCHS = 12
DEMO_PATIENCE = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cartformer",
        description="Rank grocery products for a shopper with a transformer over their history "
        "(ARGUS-style pretrain and finetune on Lavka-schema data).",
    )
    parser.add_argument("--version", action="version", version=f"cartformer {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages as well as progress"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write a Lavka-schema demo file and its oracle file")
    demo.add_argument("output", type=Path, help="path of the parquet file to write")
    _add_demo_options(demo)

    prepare = sub.add_parser("prepare", help="validate the input and build the training samples")
    _add_out(prepare)
    _add_data_options(prepare, data_required=False)

    pretrain = sub.add_parser("pretrain", help="pretrain on next-positive and feedback prediction")
    _add_out(pretrain)
    _add_model_options(pretrain)
    _add_train_options(pretrain, prefix="")
    pretrain.add_argument("--resume", action="store_true", help="continue a stopped pretrain stage")

    finetune = sub.add_parser(
        "finetune", help="finetune the ranking variants with the pairwise loss"
    )
    _add_out(finetune)
    _add_model_options(finetune)
    _add_train_options(finetune, prefix="")
    _add_variants(finetune)
    finetune.add_argument("--resume", action="store_true", help="continue stopped finetune stages")

    evaluate = sub.add_parser("evaluate", help="score the validation requests and write report.md")
    _add_out(evaluate)
    _add_oracle(evaluate)
    _add_device(evaluate)

    run = sub.add_parser(
        "run", help="prepare, pretrain, finetune and evaluate; generates demo data without --data"
    )
    _add_whole_run_options(run)
    _add_variants(run)
    run.add_argument("--resume", action="store_true", help="continue stopped training stages")

    ablation = sub.add_parser(
        "ablation",
        help="train the same run with each side-feature group (city and store, product texts, "
        "time) in turn and write ablation.md; generates demo data without --data",
    )
    _add_whole_run_options(ablation)
    ablation.add_argument(
        "--arms",
        nargs="+",
        choices=tuple(ABLATION_ARM_NAMES),
        help="arms to train (default: all five)",
    )
    ablation.add_argument(
        "--variants",
        nargs="+",
        choices=("scratch", "pretrained-backbone", "pretrained-backbone-heads"),
        help="finetune initializations to train per arm (default: pretrained-backbone)",
    )
    ablation.add_argument("--resume", action="store_true", help="continue stopped training stages")
    _show_config_defaults(sub.choices.values())

    from cartformer.inference.commands import add_parsers

    add_parsers(sub)  # score, submit, catboost: their help texts state their own defaults
    return parser


def _show_config_defaults(parsers: Iterable[argparse.ArgumentParser]) -> None:
    """Append each option's config default to its help text; the options themselves default to
    None so that a saved config.json keeps its values."""
    data, model, train = DataConfig(), ModelConfig(), TrainConfig()
    defaults: dict[str, object] = {
        "valid_days": data.valid_days,
        "gap_days": data.gap_days,
        "min_history": data.min_history,
        "max_history": data.max_history,
        "max_requests": data.max_requests,
        "lag_min_days": data.lag_min_days,
        "lag_max_days": data.lag_max_days,
        "data_seed": data.seed,
        "tokenizer": "train WordPiece on the training period's texts",
        "text_vocab_size": data.text_vocab_size,
        "cross_layers": model.cross_layers,
        "utc_offset_hours": model.utc_offset_hours,
        "embedding_dim": model.embedding_dim,
        "num_heads": model.num_heads,
        "num_layers": model.num_layers,
        "dropout": model.dropout,
        "device": train.device,
    }
    for prefix in ("", "pretrain_", "finetune_"):
        demo_epochs = {
            "": f"{DEMO_PRETRAIN_EPOCHS} pretrain, {DEMO_FINETUNE_EPOCHS} finetune",
            "pretrain_": DEMO_PRETRAIN_EPOCHS,
            "finetune_": DEMO_FINETUNE_EPOCHS,
        }[prefix]
        defaults[f"{prefix}epochs"] = f"{train.max_epochs}; demo `run`: {demo_epochs}"
        defaults[f"{prefix}patience"] = f"{train.patience}; demo `run`: {DEMO_PATIENCE}"
        defaults[f"{prefix}batch_size"] = train.batch_size
        defaults[f"{prefix}lr"] = train.lr
        defaults[f"{prefix}num_workers"] = train.num_workers
        defaults[f"{prefix}seed"] = train.seed
    for parser in parsers:
        for action in parser._actions:
            if action.dest in defaults and action.help:
                action.help += f" (default: {defaults[action.dest]})"


def _add_whole_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of a command that runs every stage: data, demo, model and both stages."""
    _add_out(parser)
    _add_data_options(parser, data_required=False)
    _add_demo_options(parser)
    _add_oracle(parser)
    _add_model_options(parser)
    _add_train_options(parser, prefix="pretrain-")
    _add_train_options(parser, prefix="finetune-")


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory that holds everything a run makes"
    )


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", help="torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
    )


def _add_oracle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--oracle",
        help="parquet of true cart probabilities (request_id, product_id, cart_probability); "
        "default: DATA.oracle.parquet beside the input when it exists",
    )


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        choices=("tiny", "small", "full"),
        default="small",
        help="demo size: tiny (tests), small (default, a run of minutes) or full (real-file shape)",
    )
    parser.add_argument("--demo-seed", type=int, default=0, help="seed of the demo generator")


def _add_data_options(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        required=data_required,
        help="Lavka-schema parquet file (train.parquet)",
    )
    group = parser.add_argument_group("split and samples")
    group.add_argument("--valid-days", type=float, help="length of the validation period in days")
    group.add_argument(
        "--gap-days", type=float, help="days between training targets and validation"
    )
    group.add_argument("--min-history", type=int, help="minimum positive events per user history")
    group.add_argument("--max-history", type=int, help="positive events kept per user (latest)")
    group.add_argument("--max-requests", type=int, help="requests kept per user in finetuning")
    group.add_argument(
        "--lag-min-days",
        type=float,
        help="smallest state-to-request lag in finetune training, days",
    )
    group.add_argument(
        "--lag-max-days", type=float, help="largest state-to-request lag in finetune training, days"
    )
    group.add_argument(
        "--data-seed", type=int, help="seed of the lag draws and the random baseline"
    )
    text = parser.add_argument_group("product texts (side features)")
    text.add_argument(
        "--tokenizer",
        help="Hugging Face tokenizer of product_name and product_category: a hub name or a "
        "local directory, loaded through transformers",
    )
    text.add_argument(
        "--text-vocab-size", type=int, help="target vocabulary of the trained WordPiece tokenizer"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (applies when a model is first built)")
    group.add_argument("--embedding-dim", type=int, help="embedding and transformer width")
    group.add_argument("--num-heads", type=int, help="attention heads per layer")
    group.add_argument("--num-layers", type=int, help="transformer layers")
    group.add_argument("--dropout", type=float, help="dropout probability")
    group.add_argument(
        "--history-match",
        action=argparse.BooleanOptionalAction,
        help="add finetune logit offsets for how often and how recently the shopper had the "
        "candidate (default on; --no-history-match gives the plain method)",
    )
    group.add_argument(
        "--softmax",
        choices=("full", "sampled"),
        help="pretrain retrieval loss over the full catalogue, or over in-batch plus uniform "
        "negatives for large catalogues",
    )
    group.add_argument(
        "--num-negatives", type=int, help="uniform negatives per step of --softmax sampled"
    )
    group.add_argument(
        "--logq-correction",
        action=argparse.BooleanOptionalAction,
        help="correct the sampled softmax logits by the log sampling probability",
    )
    features = parser.add_argument_group("side features (default off: the id-only model)")
    features.add_argument(
        "--categorical-features",
        action=argparse.BooleanOptionalAction,
        help="embed the city and store of every event and request (needs city_name, store_id)",
    )
    features.add_argument(
        "--text-features",
        action=argparse.BooleanOptionalAction,
        help="add product name and category token bags to the item encoder (needs "
        "product_name, product_category)",
    )
    features.add_argument(
        "--time-features",
        action=argparse.BooleanOptionalAction,
        help="embed hour of day, weekday, month and the log-bucketed gap to the previous event",
    )
    features.add_argument(
        "--cross-layers",
        type=int,
        help="DCN cross layers that combine the item's id and text vectors",
    )
    features.add_argument(
        "--utc-offset-hours",
        type=float,
        help="time zone of the hour, weekday and month features, in hours east of UTC",
    )
    _add_device(parser)


def _add_train_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    stage = prefix.rstrip("-") or "this stage"
    group = parser.add_argument_group(f"training ({stage})")
    group.add_argument(f"--{prefix}epochs", type=int, help=f"maximum epochs of {stage}")
    group.add_argument(
        f"--{prefix}patience",
        type=int,
        help="epochs without validation improvement before stopping",
    )
    group.add_argument(
        f"--{prefix}batch-size",
        type=int,
        help="users per evaluation batch, and per training batch when --batch-tokens is 0",
    )
    group.add_argument(
        f"--{prefix}batch-tokens",
        type=int,
        help="padded history events per training batch (users x longest history); 0 batches "
        "by --batch-size users",
    )
    group.add_argument(
        f"--{prefix}amp",
        choices=("auto", "bf16", "off"),
        help="bf16 autocast: auto is on for CUDA and off for CPU",
    )
    group.add_argument(f"--{prefix}lr", type=float, help="AdamW learning rate after warm-up")
    group.add_argument(
        f"--{prefix}warmup-epochs",
        type=int,
        help="epochs of linear warm-up from 0.1 x --lr; 0 starts at --lr",
    )
    group.add_argument(f"--{prefix}num-workers", type=int, help="DataLoader worker processes")
    group.add_argument(f"--{prefix}seed", type=int, help="seed of weights init and shuffling")


def _add_variants(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("scratch", "pretrained-backbone", "pretrained-backbone-heads"),
        help="finetune initializations to train (default: all three)",
    )


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Start from the run's saved config (or defaults) and apply the options given."""
    config_path = args.out / "config.json"
    cfg = RunConfig.load(config_path) if config_path.is_file() else RunConfig()
    cfg.out_dir = str(args.out)
    # Absolute paths keep the run usable from any working directory.
    if getattr(args, "data", None):
        cfg.data_path = str(Path(args.data).resolve())
    if getattr(args, "oracle", None):
        cfg.oracle_path = str(Path(args.oracle).resolve())

    _set(cfg.data, args, valid_days="valid_days", gap_days="gap_days", min_history="min_history")
    _set(cfg.data, args, max_history="max_history", max_requests="max_requests")
    _set(cfg.data, args, lag_min_days="lag_min_days", lag_max_days="lag_max_days", seed="data_seed")
    _set(cfg.data, args, tokenizer="tokenizer", text_vocab_size="text_vocab_size")
    if getattr(args, "max_history", None):
        cfg.model.max_seq_len = args.max_history
    _set(cfg.model, args, embedding_dim="embedding_dim", num_heads="num_heads")
    _set(cfg.model, args, num_layers="num_layers", dropout="dropout")
    _set(cfg.model, args, history_match="history_match", softmax="softmax")
    _set(cfg.model, args, num_negatives="num_negatives", logq_correction="logq_correction")
    _set(cfg.model, args, use_categorical="categorical_features", use_text="text_features")
    _set(cfg.model, args, use_time="time_features", cross_layers="cross_layers")
    _set(cfg.model, args, utc_offset_hours="utc_offset_hours")

    if args.command in ("run", "ablation"):
        stages = {"pretrain_": cfg.pretrain, "finetune_": cfg.finetune}
    elif args.command in ("pretrain", "finetune"):
        stages = {"": getattr(cfg, args.command)}
    else:
        stages = {}
    for prefix, train_cfg in stages.items():
        _set(train_cfg, args, max_epochs=f"{prefix}epochs", patience=f"{prefix}patience")
        _set(train_cfg, args, batch_size=f"{prefix}batch_size", lr=f"{prefix}lr")
        _set(train_cfg, args, num_workers=f"{prefix}num_workers", seed=f"{prefix}seed")
        _set(train_cfg, args, batch_tokens=f"{prefix}batch_tokens", amp=f"{prefix}amp")
        _set(train_cfg, args, warmup_epochs=f"{prefix}warmup_epochs")
    if getattr(args, "device", None):
        cfg.pretrain.device = cfg.finetune.device = args.device
    return cfg


def _set(target: object, args: argparse.Namespace, **fields: str) -> None:
    for field_name, option in fields.items():
        value = getattr(args, option, None)
        if value is not None:
            setattr(target, field_name, value)


def _apply_demo_defaults(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Shorten training on generated demo data unless the user chose the lengths."""
    for prefix, train_cfg, epochs in (
        ("pretrain_", cfg.pretrain, DEMO_PRETRAIN_EPOCHS),
        ("finetune_", cfg.finetune, DEMO_FINETUNE_EPOCHS),
    ):
        if getattr(args, f"{prefix}epochs") is None:
            train_cfg.max_epochs = epochs
        if getattr(args, f"{prefix}patience") is None:
            train_cfg.patience = DEMO_PATIENCE


def main(argv: Sequence[str] | None = None) -> int:
    # Spinning OpenMP waiters slowed a pretrain epoch from 18 s to 176 s when a second torch
    # process shared the 2 cores, and sleeping waiters kept it at 29 s. The variable only acts
    # before torch is first imported (below). A value the user exported wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun only rank 0 logs progress; the other ranks log warnings and errors.
    rank = os.environ.get("RANK", "0")
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == "0" else max(level, logging.WARNING),
        format=("" if rank == "0" else f"rank {rank} ")
        + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The terminal shows an error once, as the one-line message below; the run's log file
    # also records it.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not getattr(record, "file_only", False))
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as error:
        logger.debug("details", exc_info=True)
        logger.error("%s failed: %s", args.command, error, extra={"file_only": True})
        print(f"cartformer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"cartformer {args.command}: interrupted; rerun it with --resume to continue "
            "training from the last finished epoch",
            file=sys.stderr,
        )
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from cartformer import pipeline
    from cartformer.data.demo import write_demo
    from cartformer.evaluation.report import format_table
    from cartformer.training import distributed
    from cartformer.training.loop import resolve_device

    if args.command == "demo-data":
        data_path, oracle_path = write_demo(args.output, size=args.size, seed=args.demo_seed)
        print(f"wrote {data_path}\nwrote {oracle_path}")
        return 0
    if args.command in ("score", "submit", "catboost"):
        from cartformer.inference.commands import run_command

        return run_command(args, _log_to_file)

    args.out.mkdir(parents=True, exist_ok=True)
    _log_to_file(args.out / "cartformer.log")
    logger.info("command: cartformer %s", " ".join(sys.argv[1:]))
    cfg = resolve_config(args)
    if distributed.env_world_size() > 1:
        distributed.init_process_group(
            resolve_device(cfg.pretrain.device), resolve_device(cfg.finetune.device)
        )
        # Every rank has read config.json before rank 0 writes it again.
        distributed.barrier()
    started = time.perf_counter()

    if args.command in ("run", "ablation") and not cfg.data_path:
        demo_path = args.out / DEMO_DATA_FILE
        if not demo_path.is_file() and distributed.is_main_process():
            logger.info(
                "%s: no --data given, generating the %s demo into %s",
                args.command,
                args.size,
                demo_path,
            )
            demo_path.parent.mkdir(parents=True, exist_ok=True)
            write_demo(demo_path, size=args.size, seed=args.demo_seed)
        distributed.barrier()
        cfg.data_path = str(demo_path.resolve())
        _apply_demo_defaults(cfg, args)
    _check_options(cfg)
    if distributed.is_main_process():
        cfg.save(args.out / "config.json")

    if args.command == "ablation":
        return _run_ablation(args, cfg, started)
    variants = tuple(getattr(args, "variants", None) or pipeline.FINETUNE_VARIANTS)
    if args.command in ("prepare", "run"):
        if distributed.is_main_process():
            pipeline.run_prepare(cfg)
        distributed.barrier()
    if args.command in ("pretrain", "run") and _needs_pretrain(args.command, variants):
        pipeline.run_pretrain(cfg, resume=args.resume)
    if args.command in ("finetune", "run"):
        pipeline.run_finetune(cfg, variants, resume=args.resume)
    if distributed.is_main_process():
        cfg.save(args.out / "config.json")
    if args.command in ("evaluate", "run"):
        results = pipeline.run_evaluate(cfg)
        if distributed.is_main_process():
            print(format_table(results))
            print(f"report: {args.out / 'report.md'}")
    # Every rank returns only after rank 0 has written its files.
    distributed.barrier()
    logger.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return 0


def _run_ablation(args: argparse.Namespace, cfg: RunConfig, started: float) -> int:
    from cartformer.ablation import DEFAULT_VARIANTS, run_ablation
    from cartformer.evaluation.report import ablation_conclusion, format_ablation_table
    from cartformer.training import distributed

    arms = run_ablation(
        cfg,
        arms=tuple(args.arms or ABLATION_ARM_NAMES),
        variants=tuple(args.variants or DEFAULT_VARIANTS),
        resume=args.resume,
    )
    if distributed.is_main_process() and arms:
        print(format_ablation_table(arms))
        print(ablation_conclusion(arms))
        print(f"report: {args.out / 'ablation.md'}")
    distributed.barrier()
    logger.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return 0


def _check_options(cfg: RunConfig) -> None:
    """Reject invalid options before they are saved to config.json or any training starts."""
    from cartformer.data.samples import check_data_config
    from cartformer.training.loop import resolve_device

    check_data_config(cfg.data)
    if cfg.data.valid_days <= 0 or cfg.data.gap_days < 0:
        raise ValueError(
            f"--valid-days must be positive and --gap-days non-negative, got "
            f"{cfg.data.valid_days} and {cfg.data.gap_days}"
        )
    resolve_device(cfg.finetune.device)
    resolve_device(cfg.pretrain.device)
    if cfg.oracle_path and not Path(cfg.oracle_path).is_file():
        raise FileNotFoundError(f"oracle file not found: {cfg.oracle_path}; fix --oracle")
    for train_cfg in (cfg.pretrain, cfg.finetune):
        if train_cfg.max_epochs < 1 or train_cfg.batch_size < 1 or train_cfg.lr <= 0:
            raise ValueError(
                "--epochs and --batch-size must be at least 1 and --lr positive, got "
                f"{train_cfg.max_epochs}, {train_cfg.batch_size} and {train_cfg.lr}"
            )
        if train_cfg.warmup_epochs < 0:
            raise ValueError(f"--warmup-epochs must be 0 or more, got {train_cfg.warmup_epochs}")
        if train_cfg.batch_tokens < 0:
            raise ValueError(
                f"--batch-tokens must be 0 (batch by users) or positive, got {train_cfg.batch_tokens}"
            )
        if train_cfg.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {train_cfg.amp!r}")
    if cfg.model.softmax not in ("full", "sampled") or cfg.model.num_negatives < 1:
        raise ValueError(
            "--softmax must be full or sampled and --num-negatives at least 1, got "
            f"{cfg.model.softmax!r} and {cfg.model.num_negatives}"
        )
    if cfg.model.cross_layers < 0 or not -24 < cfg.model.utc_offset_hours < 24:
        raise ValueError(
            "--cross-layers must be 0 or more and --utc-offset-hours inside (-24, 24), got "
            f"{cfg.model.cross_layers} and {cfg.model.utc_offset_hours}"
        )
    if cfg.data.text_vocab_size < 1:
        raise ValueError(f"--text-vocab-size must be at least 1, got {cfg.data.text_vocab_size}")


def _needs_pretrain(command: str, variants: tuple[str, ...]) -> bool:
    return command == "pretrain" or any(v != "scratch" for v in variants)


def _log_to_file(path: Path) -> None:
    # Under torchrun only rank 0 writes the run's log file.
    if os.environ.get("RANK", "0") != "0":
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


if __name__ == "__main__":
    raise SystemExit(main())
