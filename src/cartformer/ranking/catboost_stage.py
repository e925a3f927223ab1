"""The CatBoost stage: a CatBoostRanker on counter features plus the transformer score.

The stage splits one Lavka-schema file into three consecutive periods (see `Periods`):

1. A: the transformer is trained on the rows up to the end of A with the usual pipeline stages
   (prepare, pretrain when the variant needs it, finetune, evaluate) in OUT/transformer.
2. B: the requests of B train two CatBoostRankers (YetiRank, eval metric NDCG:top=10), one
   with and one without the transformer score. The last `eval_fraction` of B's requests by
   time is held out for early stopping.
3. C: the requests of C evaluate both rankers, the transformer score alone and two baselines.

Requests and their candidates are built as in `prepare` (views and cart updates outside
ST_Catalog, at least 10 products, a cart and a view). The transformer scores each request from
the state before its time, with histories from the whole file, and the features count only
events before the request (see `cartformer.ranking.features`). Before scoring,
`check_transformer_periods` stops the stage when the transformer saw an event after A.

catboost is an optional dependency (`pip install "cartformer[catboost]"`), imported only
when a ranker is trained.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cartformer.config import DataConfig, RunConfig
from cartformer.data.encoding import NO_SURFACE, IdMapping
from cartformer.data.schema import REQUIRED_COLUMNS, validate_events
from cartformer.data.split import SplitBoundaries, build_requests, encode_events
from cartformer.evaluation.metrics import ndcg_at_k
from cartformer.evaluation.report import MethodResult, paired_difference
from cartformer.inference.inputs import scan_parquet_file
from cartformer.ranking.features import FEATURE_NAMES, compute_features
from cartformer.ranking.periods import (
    Periods,
    check_transformer_periods,
    iso_time,
    write_period_a,
)

logger = logging.getLogger(__name__)

TRANSFORMER_FEATURE = "transformer_score"
WITH_TRANSFORMER = "catboost with the transformer score"
WITHOUT_TRANSFORMER = "catboost without the transformer score"


@dataclass
class StageSettings:
    """Settings of the CatBoost stage."""

    period_days: float = 30.0
    """Length of periods B and C in days; A is everything before them."""
    variant: str = "scratch"
    """Finetune variant of the transformer."""
    transformer_run: str = ""
    """An existing transformer run to use instead of training one on A; it must pass the leak
    check."""
    iterations: int = 1000
    learning_rate: float = 0.05
    depth: int = 6
    early_stopping_rounds: int = 100
    eval_fraction: float = 0.2
    """Share of B's requests, the latest by time, held out for early stopping."""
    seed: int = 0
    thread_count: int = -1
    """CatBoost threads; -1 uses every core."""
    device: str = "auto"
    """Torch device of the transformer."""


def run_catboost_stage(
    data_path: str | Path,
    out_dir: str | Path,
    settings: StageSettings | None = None,
    transformer_config: RunConfig | None = None,
) -> dict[str, Any]:
    """Run the whole stage and write OUT/catboost/report.md and OUT/catboost/summary.json.

    Args:
        data_path: Lavka-schema parquet file.
        out_dir: stage directory. The transformer run goes to OUT/transformer.
        settings: stage settings; None takes the defaults.
        transformer_config: base config of the transformer run (model size, epochs); its data
            and output paths are replaced. None takes the defaults.

    Returns:
        The summary written to summary.json.
    """
    started = time.perf_counter()
    settings = settings or StageSettings()
    _check_settings(settings)
    data_path = Path(data_path).resolve()
    out = Path(out_dir)
    stage_dir = out / "catboost"

    lazy = scan_parquet_file(data_path, "input file")
    validate_events(lazy)
    bounds = lazy.select(pl.col("timestamp").min().alias("t_min"), pl.col("timestamp").max())
    t_min, t_max = bounds.collect().row(0)
    periods = Periods.from_max_timestamp(t_max, settings.period_days)
    if t_min > periods.a_end:
        raise ValueError(
            f"{data_path} spans {iso_time(t_min)} to {iso_time(t_max)}, which leaves no period A "
            f"before the two {settings.period_days}-day periods; lower --period-days"
        )
    logger.info("catboost periods: %s", periods.to_dict())

    if settings.transformer_run:
        run_dir = Path(settings.transformer_run)
    else:
        run_dir = train_transformer(data_path, out, periods, settings, transformer_config)
    seen = check_transformer_periods(run_dir, periods.a_end)

    table, counts = build_candidates(lazy, periods)
    scores, score_counts, variant = _transformer_scores(run_dir, settings, table, data_path)
    table = table.with_columns(pl.Series(TRANSFORMER_FEATURE, scores, dtype=pl.Float64))
    counts.update({f"scoring_{key}": value for key, value in score_counts.items()})

    evaluation = train_and_evaluate(table, settings, stage_dir)
    summary = {
        "data": str(data_path),
        "periods": periods.to_dict(),
        "transformer": {
            "run": str(run_dir),
            "variant": variant,
            "latest_event_seen": seen,
            "latest_event_seen_iso": iso_time(seen),
        },
        "settings": asdict(settings),
        "counts": counts,
        **evaluation,
        "seconds": round(time.perf_counter() - started, 1),
    }
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    )
    from cartformer.ranking.report import render_report

    (stage_dir / "report.md").write_text(render_report(summary))
    logger.info("catboost: wrote %s", stage_dir / "report.md")
    return summary


def _check_settings(settings: StageSettings) -> None:
    if settings.period_days <= 0:
        raise ValueError(f"--period-days must be positive, got {settings.period_days}")
    if not 0 < settings.eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {settings.eval_fraction}")
    if settings.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {settings.iterations}")


# --- transformer ---------------------------------------------------------------------------------


def train_transformer(
    data_path: Path,
    out: Path,
    periods: Periods,
    settings: StageSettings,
    base_config: RunConfig | None,
) -> Path:
    """Train the transformer on period A in OUT/transformer with the pipeline stages.

    Each stage reuses its earlier result when its inputs are unchanged, as in `cartformer run`.
    """
    from cartformer import pipeline

    run_dir = out / "transformer"
    a_path = run_dir / "data" / "period_a.parquet"
    write_period_a(data_path, a_path, periods.a_end)
    cfg = copy.deepcopy(base_config) if base_config is not None else RunConfig()
    cfg.data_path = str(a_path.resolve())
    cfg.out_dir = str(run_dir)
    cfg.oracle_path = ""
    if settings.device:
        cfg.pretrain.device = cfg.finetune.device = settings.device
    cfg.save(run_dir / pipeline.CONFIG_FILE)

    pipeline.run_prepare(cfg)
    if settings.variant != "scratch":
        pipeline.run_pretrain(cfg)
    pipeline.run_finetune(cfg, (settings.variant,))
    cfg.save(run_dir / pipeline.CONFIG_FILE)
    pipeline.run_evaluate(cfg)
    return run_dir


def _transformer_scores(
    run_dir: Path, settings: StageSettings, table: pl.DataFrame, data_path: Path
) -> tuple[np.ndarray, dict[str, int], str]:
    """Score every candidate of `table` with the transformer; return (K,) scores, the scoring
    counts and the variant used."""
    from cartformer.inference.score import load_scorer, score_frame

    variant = None if settings.transformer_run else settings.variant
    scorer = load_scorer(run_dir, variant, settings.device)
    requests = table.select(
        "user_id",
        "request_id",
        "product_id",
        "timestamp",
        pl.when(pl.col("source_type") == NO_SURFACE)
        .then(None)
        .otherwise(pl.col("source_type"))
        .alias("source_type"),
    )
    result = score_frame(scorer, requests, data_path)
    return result.scores["score"].to_numpy(), result.counts, scorer.variant


# --- candidates ----------------------------------------------------------------------------------


def build_candidates(lazy: pl.LazyFrame, periods: Periods) -> tuple[pl.DataFrame, dict[str, int]]:
    """Build the request candidates of periods B and C with their features.

    Returns one row per candidate, grouped by request in the order (period, request time,
    user, request_id), candidates by product index: `group` (request number), `period`,
    `user`, `product`, `source` (indices), `user_id`, `request_id`, `product_id` (raw ids),
    `source_type` (surface value), `timestamp` (request time), `target` (1 = cart, 0 = view)
    and the columns of `FEATURE_NAMES`. Also returns the counts of requests and candidates.
    """
    raw = lazy.select(REQUIRED_COLUMNS)
    mappings = {
        name: IdMapping.fit(
            name, raw.select(pl.col(column).unique()).collect(engine="streaming")[column]
        )
        for name, column in (
            ("user", "user_id"),
            ("product", "product_id"),
            ("source", "source_type"),
        )
    }
    encoded = encode_events(raw, mappings["user"], mappings["product"], mappings["source"])
    encoded = encoded.collect()
    boundaries = SplitBoundaries(
        train_end=periods.a_end, valid_start=periods.a_end, valid_end=periods.c_end
    )
    requests, request_counts = build_requests(
        encoded.lazy(), boundaries, mappings["source"], DataConfig()
    )
    requests = (
        requests.filter(pl.col("timestamp") > periods.a_end)
        .with_columns(periods.period_expr().alias("period"))
        .sort(["period", "timestamp", "user", "request_id"])
        .with_row_index("group")
    )
    candidates = requests.explode(["product", "target"]).select(
        "group",
        "period",
        "user",
        "product",
        "source",
        "request_id",
        "timestamp",
        pl.col("target").cast(pl.Int8),
    )
    candidates = candidates.with_columns(
        mappings["user"].decode(candidates["user"]).alias("user_id"),
        mappings["product"].decode(candidates["product"]).alias("product_id"),
        mappings["source"].decode(candidates["source"]).alias("source_type"),
    )
    candidates = _add_positions(candidates, lazy, periods.a_end)
    features = compute_features(
        encoded.select("user", "product", "source", "action", "timestamp"), candidates
    )
    table = pl.concat([candidates.drop("position_in_request"), features], how="horizontal")

    counts: dict[str, int] = {}
    for period in ("B", "C"):
        in_period = table.filter(pl.col("period") == period)
        counts[f"requests_{period}"] = in_period["group"].n_unique()
        counts[f"candidates_{period}"] = in_period.height
    dropped = {
        key: value
        for key, value in request_counts.items()
        if key.startswith(("requests_too", "requests_without"))
    }
    logger.info("catboost candidates: %s; requests left out in the whole file: %s", counts, dropped)
    for period in ("B", "C"):
        if counts[f"requests_{period}"] < 2:
            raise ValueError(
                f"period {period} has {counts[f'requests_{period}']} requests, too few to train "
                "or evaluate a ranker; use a longer file or a larger --period-days"
            )
    return table, counts


def _add_positions(candidates: pl.DataFrame, lazy: pl.LazyFrame, after: int) -> pl.DataFrame:
    """Add `position_in_request`: the smallest position of the candidate's view rows in its
    request, or null when the file has no such column."""
    if "position_in_request" not in lazy.collect_schema().names():
        logger.info("the input has no position_in_request column; the feature is left empty")
        return candidates.with_columns(pl.lit(None, dtype=pl.Int64).alias("position_in_request"))
    keys = ["user_id", "request_id", "product_id"]
    positions = (
        lazy.filter(
            (pl.col("timestamp") > after)
            & pl.col("request_id").is_not_null()
            & (pl.col("action_type").cast(pl.String) == "AT_View")
        )
        .group_by(keys)
        .agg(pl.col("position_in_request").cast(pl.Int64).min())
        .with_columns(pl.col(keys).cast(pl.UInt64))
        .collect()
    )
    return candidates.join(positions, on=keys, how="left", maintain_order="left")


# --- rankers and evaluation ----------------------------------------------------------------------


def train_and_evaluate(
    table: pl.DataFrame, settings: StageSettings, stage_dir: Path
) -> dict[str, Any]:
    """Train the two rankers on B and evaluate them and the baselines on C.

    Writes the rankers (CatBoost's own .cbm format) and per_request_ndcg10.parquet into
    `stage_dir`. Returns the `methods` (mean NDCG@10 on C), the paired difference of the two
    rankers, the feature importances and the transformer score's importance rank.
    """
    train, early_stop, evaluation = _split_groups(table, settings.eval_fraction)
    with_features = [*FEATURE_NAMES, TRANSFORMER_FEATURE]
    without_features = list(FEATURE_NAMES)
    stage_dir.mkdir(parents=True, exist_ok=True)

    rankers = {}
    for name, features, file_name in (
        (WITH_TRANSFORMER, with_features, "with_transformer.cbm"),
        (WITHOUT_TRANSFORMER, without_features, "without_transformer.cbm"),
    ):
        rankers[name] = train_ranker(train, early_stop, features, settings)
        rankers[name].save_model(str(stage_dir / file_name))

    targets = evaluation["target"].to_numpy()
    lengths = _group_lengths(evaluation)
    scores = {
        WITH_TRANSFORMER: rankers[WITH_TRANSFORMER].predict(_matrix(evaluation, with_features)),
        WITHOUT_TRANSFORMER: rankers[WITHOUT_TRANSFORMER].predict(
            _matrix(evaluation, without_features)
        ),
        "transformer score alone": evaluation[TRANSFORMER_FEATURE].to_numpy(),
        "own count of the product (ties by popularity)": own_count_scores(evaluation),
        "product cart popularity before the request": evaluation["product_cart_all"].to_numpy(),
    }
    results = [
        MethodResult(name, "model" if "catboost" in name else "baseline", per_request)
        for name, per_request in (
            (name, ndcg_at_k(values, targets, lengths, k=10)) for name, values in scores.items()
        )
    ]
    table_out = {"group": np.unique(evaluation["group"].to_numpy())}
    table_out.update({result.name: result.per_request for result in results})
    pl.DataFrame(table_out).write_parquet(stage_dir / "per_request_ndcg10.parquet")

    by_name = {result.name: result for result in results}
    difference, half_width = paired_difference(
        by_name[WITH_TRANSFORMER], by_name[WITHOUT_TRANSFORMER]
    )
    importance = rankers[WITH_TRANSFORMER].get_feature_importance(type="PredictionValuesChange")
    order = np.argsort(-importance, kind="stable")
    ranked = [(with_features[i], float(importance[i])) for i in order]
    rank = 1 + [name for name, _ in ranked].index(TRANSFORMER_FEATURE)
    logger.info(
        "catboost NDCG@10 on C: %s",
        {result.name: round(result.mean, 4) for result in results},
    )
    return {
        "requests_evaluated": int(lengths.size),
        "methods": {
            result.name: {"kind": result.kind, "ndcg10": result.mean} for result in results
        },
        "difference_with_minus_without": {"mean": difference, "half_width_95": half_width},
        "feature_importance": {
            "type": "PredictionValuesChange",
            "ranking": [{"feature": name, "importance": value} for name, value in ranked],
            "transformer_score_rank": rank,
            "features": len(with_features),
        },
        "rankers": {
            name: {
                "best_iteration": int(ranker.get_best_iteration() or 0),
                "trees": int(ranker.tree_count_),
            }
            for name, ranker in rankers.items()
        },
        "groups": {
            "train_requests": int(train["group"].n_unique()),
            "early_stopping_requests": int(early_stop["group"].n_unique()),
            "evaluation_requests": int(lengths.size),
        },
    }


def train_ranker(
    train: pl.DataFrame, early_stop: pl.DataFrame, features: list[str], settings: StageSettings
) -> Any:
    """Fit a CatBoostRanker with YetiRank, early stopping on NDCG:top=10 of `early_stop`."""
    from catboost import CatBoostRanker, Pool

    def pool(frame: pl.DataFrame) -> Pool:
        return Pool(
            data=_matrix(frame, features),
            label=frame["target"].to_numpy().astype(np.float64),
            group_id=frame["group"].to_numpy(),
            feature_names=list(features),
        )

    ranker = CatBoostRanker(
        loss_function="YetiRank",
        eval_metric="NDCG:top=10",
        iterations=settings.iterations,
        learning_rate=settings.learning_rate,
        depth=settings.depth,
        random_seed=settings.seed,
        thread_count=settings.thread_count,
        early_stopping_rounds=settings.early_stopping_rounds,
        use_best_model=True,
        allow_writing_files=False,
        verbose=False,
    )
    started = time.perf_counter()
    ranker.fit(pool(train), eval_set=pool(early_stop))
    logger.info(
        "trained a CatBoostRanker on %d features in %.1f s: best iteration %d of %d",
        len(features),
        time.perf_counter() - started,
        ranker.get_best_iteration() or 0,
        ranker.tree_count_,
    )
    return ranker


def own_count_scores(frame: pl.DataFrame) -> np.ndarray:
    """(K,) the user's positive count of the product plus a popularity fraction in [0, 1):
    the dense rank of `product_cart_all` among the frame's values over their number."""
    popularity = frame["product_cart_all"].to_numpy()
    distinct, rank = np.unique(popularity, return_inverse=True)
    return frame["user_product_positive_all"].to_numpy() + rank / distinct.size


def _split_groups(
    table: pl.DataFrame, eval_fraction: float
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Split into B's training requests, B's latest requests for early stopping, and C."""
    period_b = table.filter(pl.col("period") == "B")
    groups_b = np.unique(period_b["group"].to_numpy())
    held_out = max(1, round(groups_b.size * eval_fraction))
    first_held_out = groups_b[-held_out]
    return (
        period_b.filter(pl.col("group") < first_held_out),
        period_b.filter(pl.col("group") >= first_held_out),
        table.filter(pl.col("period") == "C"),
    )


def _group_lengths(frame: pl.DataFrame) -> np.ndarray:
    """(R,) candidates per request of a frame whose rows are grouped by ascending `group`."""
    _, lengths = np.unique(frame["group"].to_numpy(), return_counts=True)
    return lengths.astype(np.int64)


def _matrix(frame: pl.DataFrame, features: list[str]) -> np.ndarray:
    return frame.select(features).to_numpy().astype(np.float64)
