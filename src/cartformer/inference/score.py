"""Score a requests file with a trained run: one transformer score per input row.

Every (user, request) of the requests file is scored from the user's state at the latest
positive event of the event log before the request time, or at least `lag_days` before it. The
request time is the earliest timestamp among its rows, and the request's surface is its most
common `source_type`, ties going to the smallest surface index, as in the prepared requests.
Product and surface ids go through the run's mappings, so indices match the trained model.

A model with side features also gets them here. Every history event has the city and store of
its row in the event log (`city_name`, `store_id`), and every request the most common among its
rows, ties going to the smallest index. Event and request times feed the time features. A
requests file or event log without those columns gets the unknown index 0 for them, with one
logged line.

Two kinds of rows cannot get a model score and get the fallback score instead:

- rows of a request whose user has no positive event before the cutoff (no history), and
- rows whose product is not in the run's product mapping (unseen product).

The fallback score is `lowest - 1 + popularity_fraction`. Here `lowest` is the smallest logit
the finetune head can output, computed from its weights. `popularity_fraction` lies in [0, 1):
the dense rank of the product's cart count in the event log divided by the number of distinct
counts, where only carts up to the earliest cutoff of the file count. Fallback rows therefore
rank below every model-scored row, and among themselves by popularity. Their counts go to the log and to the
output's parquet metadata.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from cartformer.config import DAY_SECONDS, RunConfig
from cartformer.data.encoding import INDEX_DTYPE, UNKNOWN_INDEX, IdMapping
from cartformer.data.schema import ACTION_CODES, POSITIVE_ACTIONS
from cartformer.data.side_features import CONTEXT_SOURCE_COLUMNS
from cartformer.inference.inputs import INDEX_COLUMN, read_event_log, read_requests
from cartformer.inference.windows import (
    HistoryWindows,
    assign_windows,
    latest_positions,
    plan_batches,
)
from cartformer.model import FinetuneModel
from cartformer.model.layers import side_features

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 8192
"""Padded history events per scoring batch: 16 full windows of 512 events. On 2 CPU cores,
batches of 4096 to 8192 events scored the small demo faster than batches of 65536."""
METADATA_KEY = "cartformer"
"""Parquet key-value metadata key of the scores file; the value is a JSON object."""
SCORE_COLUMNS: tuple[str, ...] = ("request_id", "product_id", INDEX_COLUMN, "score")
CONTEXT_COLUMNS = tuple(CONTEXT_SOURCE_COLUMNS)
"""Categorical side features of a scored batch: "city" and "store"."""


@dataclass
class Scorer:
    """A finetuned model with the run's mappings, ready to score requests."""

    model: FinetuneModel
    variant: str
    run_dir: Path
    products: IdMapping
    sources: IdMapping
    max_history: int
    """Maximum window length: the run's `max_history`, capped at the model's `max_seq_len`."""
    training_data: str
    """Path of the run's input file, the default event log."""
    device: torch.device
    context: dict[str, IdMapping] = field(default_factory=dict)
    """Mappings of the categorical side features the model reads: "city" and/or "store"."""
    side_features: tuple[str, ...] = ()
    """Per-event and per-request batch tensors beyond the id-only contract, see
    `cartformer.model.layers.side_features`."""


@dataclass
class ScoreResult:
    """Scores of a requests file and what happened on the way."""

    scores: pl.DataFrame
    """One row per input row, in input order: `request_id`, `product_id` (UInt64), `index`
    (Int64, only when the input has it) and `score` (Float64)."""
    counts: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


# --- loading -------------------------------------------------------------------------------------


def best_variant(run_dir: str | Path) -> str:
    """Return the finished finetune variant with the highest validation NDCG@10.

    The value comes from RUN/evaluation/summary.json when it lists the variant, and otherwise
    from the best epoch recorded in the variant's trainer_state.json.
    """
    from cartformer.pipeline import FINETUNE_VARIANTS, RunLayout

    layout = RunLayout(run_dir)
    finished = [v for v in FINETUNE_VARIANTS if (layout.finetune(v) / "best.safetensors").is_file()]
    if not finished:
        raise FileNotFoundError(
            f"no finetuned model in {layout.checkpoints}; run `cartformer finetune --out "
            f"{layout.root}` first"
        )
    summary_path = layout.evaluation / "summary.json"
    summary = (
        json.loads(summary_path.read_text()).get("methods", {}) if summary_path.is_file() else {}
    )
    values: dict[str, float] = {}
    for variant in finished:
        entry = summary.get(f"finetune: {variant}")
        if entry is not None:
            values[variant] = float(entry["ndcg10"])
            continue
        state_path = layout.finetune(variant) / "trainer_state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        best = state.get("best_metric")
        values[variant] = float(best) if best is not None else -math.inf
    chosen = max(finished, key=lambda v: values[v])
    logger.info("score: variant %s has the best validation NDCG@10 (%s)", chosen, values)
    return chosen


def load_scorer(
    run_dir: str | Path, variant: str | None = None, device: str | None = None
) -> Scorer:
    """Load a finished finetune variant of a run and the run's id mappings.

    `variant=None` takes `best_variant(run_dir)`, and `device=None` the run's finetune device.
    """
    from cartformer.pipeline import FINETUNE_VARIANTS, RunLayout, load_finetuned
    from cartformer.training.loop import resolve_device

    layout = RunLayout(run_dir)
    if not layout.config.is_file():
        raise FileNotFoundError(
            f"{layout.config} not found; pass --run a directory that `cartformer run` or "
            "`cartformer finetune` wrote"
        )
    cfg = RunConfig.load(layout.config)
    cfg.out_dir = str(layout.root)
    if variant is None:
        variant = best_variant(layout.root)
    if variant not in FINETUNE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(FINETUNE_VARIANTS)}")
    checkpoint_path = layout.finetune(variant) / "best.safetensors"
    if not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_path} not found; finetune variant {variant} first or pick another "
            "with --variant"
        )
    torch_device = resolve_device(device or cfg.finetune.device)
    model = load_finetuned(cfg, variant).to(torch_device).eval()
    mappings = layout.prepared / "mappings"
    features = side_features(model.config)
    return Scorer(
        model=model,
        variant=variant,
        run_dir=layout.root,
        products=IdMapping.load(mappings, "product"),
        sources=IdMapping.load(mappings, "source"),
        max_history=min(cfg.data.max_history, model.config.max_seq_len),
        training_data=cfg.data_path,
        device=torch_device,
        context={
            name: IdMapping.load(mappings, name) for name in CONTEXT_COLUMNS if name in features
        },
        side_features=features,
    )


# --- scoring -------------------------------------------------------------------------------------


def score_requests(
    run_dir: str | Path,
    requests_path: str | Path,
    events_path: str | Path | None = None,
    *,
    variant: str | None = None,
    lag_days: float = 0.0,
    device: str | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> ScoreResult:
    """Score every row of a requests file with a run's finetuned model.

    `events_path=None` takes the histories from the run's own input file. See `score_frame`.
    """
    scorer = load_scorer(run_dir, variant, device)
    if events_path is None:
        if not scorer.training_data or not Path(scorer.training_data).is_file():
            raise FileNotFoundError(
                f"the run's input file {scorer.training_data!r} is not found; pass the event log "
                "with --events"
            )
        events_path = scorer.training_data
    requests = read_requests(requests_path)
    requests = _with_raw_context(requests, requests_path, scorer)
    result = score_frame(
        scorer, requests, events_path, lag_days=lag_days, batch_tokens=batch_tokens
    )
    result.metadata["requests_file"] = str(Path(requests_path).resolve())
    return result


def score_frame(
    scorer: Scorer,
    requests: pl.DataFrame,
    events_path: str | Path,
    *,
    lag_days: float = 0.0,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    window_step: int | None = None,
) -> ScoreResult:
    """Score request rows against histories from an event log.

    Args:
        scorer: the model and mappings of `load_scorer`.
        requests: rows as `read_requests` returns them, (N,) rows, plus the raw `city_name`
            and `store_id` columns when the model reads them.
        events_path: Lavka-schema event log whose positive events form the histories.
        lag_days: with 0, the state is the latest positive event strictly before the request
            time. With a positive value, it is the latest one at least `lag_days` days before.
        batch_tokens: padded history events per model batch.
        window_step: see `assign_windows`; None takes half the history length.

    Returns:
        ScoreResult with (N,) scores in input order.
    """
    if lag_days < 0 or not math.isfinite(lag_days):
        raise ValueError(f"--lag-days must be a non-negative number of days, got {lag_days}")
    started = time.perf_counter()
    step = window_step if window_step is not None else max(scorer.max_history // 2, 1)

    groups, candidates, row_candidate = _group_requests(requests, scorer.sources, scorer.context)
    cutoff = _cutoffs(groups["timestamp"].to_numpy(), lag_days)
    events, popularity = read_event_log(
        events_path,
        groups["user_id"],
        history_end=int(cutoff.max()),
        popularity_end=int(cutoff.min()),
        products=scorer.products,
        sources=scorer.sources,
    )
    if scorer.context:
        events = _with_event_context(
            events, events_path, groups["user_id"], int(cutoff.max()), scorer
        )
    candidate_product_id = candidates["product_id"].to_numpy()
    candidate_index = candidates.select(scorer.products.encode_expr("product_id")).to_series()
    candidate_index = candidate_index.to_numpy().astype(np.int64)
    candidate_request = candidates["request"].to_numpy().astype(np.int64)

    state, user_start = _request_states(events, groups["user_id"], cutoff)
    # NOTE: a product outside the run's mapping gets the fallback even with text features. Its
    # product_name could place it, but scoring does not tokenize new texts.
    model_candidate = (state[candidate_request] >= 0) & (candidate_index != UNKNOWN_INDEX)
    request_features = {name: groups[name].to_numpy().astype(np.int64) for name in scorer.context}
    if "timestamp" in scorer.side_features:
        request_features["timestamp"] = groups["timestamp"].to_numpy().astype(np.int64)
    inputs = _ModelInputs(
        request_source=groups["source"].to_numpy().astype(np.int64),
        request_features=request_features,
        request_state=state,
        request_user_start=user_start,
        candidate_request=candidate_request,
        candidate_product=candidate_index,
    )
    model_started = time.perf_counter()
    scores = np.empty(candidates.height, dtype=np.float64)
    scores[model_candidate], windows = _model_scores(
        scorer, events, inputs, np.flatnonzero(model_candidate), batch_tokens, step
    )
    model_seconds = time.perf_counter() - model_started

    lowest = lowest_logit(scorer.model)
    fraction = _popularity_fraction(candidate_product_id, popularity)
    scores[~model_candidate] = lowest - 1.0 + fraction[~model_candidate]

    output = requests.select(
        "request_id", "product_id", *([INDEX_COLUMN] if INDEX_COLUMN in requests.columns else [])
    ).with_columns(pl.Series("score", scores[row_candidate], dtype=pl.Float64))
    counts = _counts(
        groups, state, candidate_request, candidate_index, row_candidate, model_candidate
    )
    counts.update(_event_counts(events, windows))
    seconds = time.perf_counter() - started
    _log_counts(counts, seconds, model_seconds)
    metadata = {
        "run": str(scorer.run_dir),
        "variant": scorer.variant,
        "event_log": str(Path(events_path).resolve()),
        "lag_days": lag_days,
        "max_history": scorer.max_history,
        "window_step": step,
        "fallback_below": lowest,
        "fallback": "lowest model logit - 1 + product popularity rank fraction in [0, 1)",
        "counts": counts,
        "seconds": round(seconds, 3),
        "model_seconds": round(model_seconds, 3),
    }
    return ScoreResult(scores=output, counts=counts, metadata=metadata)


def _group_requests(
    requests: pl.DataFrame, sources: IdMapping, context: dict[str, IdMapping] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray]:
    """Group request rows into requests and distinct candidates.

    Returns:
        groups: one row per (user_id, request_id), numbered by row position, with `timestamp`
            (the earliest row time) and `source` (the most common surface index, ties to the
            smallest). Every name of `context` adds the most common "city" or "store" index,
            chosen the same way, or 0 when `requests` lacks the raw column.
        candidates: one row per distinct (user_id, request_id, product_id), with `request`, the
            row number of its request in `groups`.
        row_candidate: (N,) int64 candidate of every input row.
    """
    context = context or {}
    keys = ["user_id", "request_id"]
    rows = requests.select(
        *keys,
        "product_id",
        "timestamp",
        sources.encode_expr("source_type").alias("source"),
        *[_context_expr(requests, name, mapping) for name, mapping in context.items()],
    )
    groups = rows.group_by(keys).agg(pl.col("timestamp").min())
    for name in ("source", *context):
        groups = groups.join(_most_common(rows, keys, name), on=keys, how="left")
    groups = groups.sort(["user_id", "timestamp", "request_id"]).with_row_index("request")
    candidate_keys = [*keys, "product_id"]
    candidates = (
        rows.select(candidate_keys)
        .unique(maintain_order=True)
        .join(groups.select(*keys, "request"), on=keys, how="left", maintain_order="left")
        .with_row_index("candidate")
    )
    row_candidate = rows.join(
        candidates.select(*candidate_keys, "candidate"),
        on=candidate_keys,
        how="left",
        maintain_order="left",
    )["candidate"]
    if row_candidate.len() != requests.height or row_candidate.null_count():
        raise RuntimeError("request rows and their candidates do not match one to one")
    return groups, candidates, row_candidate.to_numpy().astype(np.int64)


def _most_common(rows: pl.DataFrame, keys: list[str], value: str) -> pl.DataFrame:
    """Return `keys` and the most common `value` of their rows, ties to the smallest value."""
    return (
        rows.group_by(*keys, value)
        .agg(pl.len().alias("rows"))
        .sort([*keys, "rows", value], descending=[False, False, True, False])
        .unique(keys, keep="first", maintain_order=True)
        .select(*keys, value)
    )


def _context_expr(frame: pl.DataFrame, name: str, mapping: IdMapping) -> pl.Expr:
    """Return the index expression of context feature `name`, or UNKNOWN_INDEX when `frame`
    lacks its raw column."""
    column = CONTEXT_SOURCE_COLUMNS[name]
    if column not in frame.columns:
        return pl.lit(UNKNOWN_INDEX, dtype=INDEX_DTYPE).alias(name)
    return mapping.encode_expr(column).alias(name)


def _with_raw_context(
    requests: pl.DataFrame, requests_path: str | Path, scorer: Scorer
) -> pl.DataFrame:
    """Add the raw `city_name` and `store_id` columns of the requests file that the model reads.

    `read_requests` keeps the file's row order, so the columns are read in that order too. A
    missing column is logged once, and its requests get the unknown index 0.
    """
    required = [CONTEXT_SOURCE_COLUMNS[name] for name in scorer.context]
    if not required:
        return requests
    schema = pl.read_parquet_schema(requests_path)
    present = [column for column in required if column in schema]
    missing = [column for column in required if column not in schema]
    if missing:
        logger.warning(
            "requests file %s has no column(s) %s; the model gets the unknown index 0 for them",
            requests_path,
            missing,
        )
    if not present:
        return requests
    raw = pl.read_parquet(requests_path, columns=present)
    return requests.with_columns(raw.get_columns())


def _with_event_context(
    events: pl.DataFrame, path: str | Path, users: pl.Series, history_end: int, scorer: Scorer
) -> pl.DataFrame:
    """Add the `city` and `store` index of every history event of `read_event_log`.

    The columns are read with the same filters and the same stable sort as `read_event_log`,
    so row i is the same event. The timestamps and products of both reads are compared, and a
    mismatch raises RuntimeError. An event log without the raw column gets the unknown index 0,
    with one logged line.
    """
    schema = pl.read_parquet_schema(path)
    present = {
        name: mapping
        for name, mapping in scorer.context.items()
        if CONTEXT_SOURCE_COLUMNS[name] in schema
    }
    missing = [CONTEXT_SOURCE_COLUMNS[name] for name in scorer.context if name not in present]
    if missing:
        logger.warning(
            "event log %s has no column(s) %s; history events get the unknown index 0 for them",
            path,
            missing,
        )
    unknown = {
        name: pl.lit(UNKNOWN_INDEX, dtype=INDEX_DTYPE).alias(name)
        for name in scorer.context
        if name not in present
    }
    if not present:
        return events.with_columns(*unknown.values())
    action = (
        pl.col("action_type").cast(pl.String).replace_strict(ACTION_CODES, return_dtype=pl.Int8)
    )
    request_users = pl.DataFrame({"user_id": users.cast(pl.UInt64).unique()}).lazy()
    context = (
        pl.scan_parquet(path)
        .select(
            pl.col("user_id").cast(pl.UInt64),
            scorer.products.encode_expr("product_id").alias("product"),
            scorer.sources.encode_expr("source_type").alias("source"),
            pl.col("timestamp").cast(pl.Int64),
            action.alias("action"),
            *[
                mapping.encode_expr(CONTEXT_SOURCE_COLUMNS[name]).alias(name)
                for name, mapping in present.items()
            ],
        )
        .filter(pl.col("action").is_in(POSITIVE_ACTIONS), pl.col("timestamp") <= history_end)
        .join(request_users, on="user_id", how="semi")
        .sort(["user_id", "timestamp", "action", "product", "source"], maintain_order=True)
        .collect()
    )
    aligned = context.height == events.height and all(
        context[name].cast(pl.Int64).equals(events[name].cast(pl.Int64))
        for name in ("timestamp", "product")
    )
    if not aligned:
        raise RuntimeError(
            "the city and store columns of the event log do not line up with its history "
            "events; read_event_log and the side-feature read must filter and sort alike"
        )
    return events.with_columns(context.select(list(present)).get_columns(), *unknown.values())


def _cutoffs(request_time: np.ndarray, lag_days: float) -> np.ndarray:
    """(R,) latest history event time per request: time - 1 without a lag, else time - lag."""
    request_time = request_time.astype(np.int64)
    if lag_days == 0:
        return request_time - 1
    # An integer timestamp t satisfies t <= x exactly when t <= floor(x).
    return np.floor(request_time - lag_days * DAY_SECONDS).astype(np.int64)


def _request_states(
    events: pl.DataFrame, request_user: pl.Series, cutoff: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return (R,) global event positions of the request states (-1: no history) and (R,)
    positions of the first event of each request's user."""
    users = (
        events.select("user_id")
        .with_row_index("position")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("position").first().alias("first"))
        .with_row_index("code")
    )
    matched = pl.DataFrame({"user_id": request_user}).join(
        users, on="user_id", how="left", maintain_order="left"
    )
    code = matched["code"].fill_null(-1).cast(pl.Int64).to_numpy()
    first = matched["first"].fill_null(0).cast(pl.Int64).to_numpy()
    event_code = np.repeat(
        np.arange(users.height, dtype=np.int64),
        np.diff(np.append(users["first"].to_numpy().astype(np.int64), events.height)),
    )
    state = latest_positions(
        event_code, events["timestamp"].to_numpy().astype(np.int64), code, cutoff
    )
    return state, first


@dataclass(frozen=True)
class _ModelInputs:
    """Requests and candidates in the arrays that model batches are cut from."""

    request_source: np.ndarray
    """(G,) int64 surface index of each request."""
    request_features: dict[str, np.ndarray]
    """(G,) int64 side features of each request by batch name ("city", "store", "timestamp")."""
    request_state: np.ndarray
    """(G,) int64 global event position of each request's state, -1 without history."""
    request_user_start: np.ndarray
    """(G,) int64 global position of the first event of each request's user."""
    candidate_request: np.ndarray
    """(K,) int64 request of each candidate."""
    candidate_product: np.ndarray
    """(K,) int64 product index of each candidate."""


def _model_scores(
    scorer: Scorer,
    events: pl.DataFrame,
    inputs: _ModelInputs,
    chosen: np.ndarray,
    batch_tokens: int,
    step: int,
) -> tuple[np.ndarray, HistoryWindows]:
    """Score the `chosen` (M,) candidates with the model, batch by batch.

    Windows are sorted by descending length so that each batch pads little, and requests and
    candidates follow the order of their windows, so a batch is a contiguous range of each.

    Returns:
        (M,) float64 logits in the order of `chosen`, and the windows fed to the model.
    """
    model_requests, chosen_request = np.unique(
        inputs.candidate_request[chosen], return_inverse=True
    )
    windows = assign_windows(
        inputs.request_state[model_requests],
        inputs.request_user_start[model_requests],
        scorer.max_history,
        step,
    )
    logits = np.empty(chosen.size, dtype=np.float64)
    if chosen.size == 0:
        return logits, windows

    window_order = np.argsort(-windows.length, kind="stable")
    window_rank = np.empty_like(window_order)
    window_rank[window_order] = np.arange(window_order.size)
    request_order = np.argsort(window_rank[windows.request_window], kind="stable")
    request_rank = np.empty_like(request_order)
    request_rank[request_order] = np.arange(request_order.size)
    candidate_order = np.argsort(request_rank[chosen_request], kind="stable")

    window_start = windows.start[window_order]
    window_length = windows.length[window_order]
    requests_per_window = np.bincount(
        window_rank[windows.request_window], minlength=window_order.size
    )
    candidates_per_request = np.bincount(request_rank[chosen_request], minlength=request_order.size)
    request_bounds = np.concatenate([[0], np.cumsum(requests_per_window)])
    candidate_bounds = np.concatenate([[0], np.cumsum(candidates_per_request)])
    sorted_requests = model_requests[request_order]
    history = {
        name: torch.from_numpy(events[name].to_numpy().astype(np.int64))
        for name in ("product", "source", "action", *scorer.side_features)
    }

    for first, last in plan_batches(window_length, batch_tokens):
        request_first, request_last = request_bounds[first], request_bounds[last]
        batch_candidates = candidate_order[
            candidate_bounds[request_first] : candidate_bounds[request_last]
        ]
        batch_requests = sorted_requests[request_first:request_last]
        batch = _model_batch(
            history,
            window_start[first:last],
            window_length[first:last],
            requests_per_window[first:last],
            inputs.request_source[batch_requests],
            windows.request_state[request_order[request_first:request_last]],
            candidates_per_request[request_first:request_last],
            inputs.candidate_product[chosen[batch_candidates]],
            {name: values[batch_requests] for name, values in inputs.request_features.items()},
        )
        with torch.inference_mode():
            batch_logits = scorer.model.score(_to_device(batch, scorer.device))
        logits[batch_candidates] = batch_logits.float().cpu().numpy()
    return logits, windows


def _model_batch(
    history: dict[str, torch.Tensor],
    window_start: np.ndarray,
    window_length: np.ndarray,
    requests_per_window: np.ndarray,
    request_source: np.ndarray,
    request_state: np.ndarray,
    candidates_per_request: np.ndarray,
    candidate_product: np.ndarray,
    request_features: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Build one finetune batch (the layout of `collate`) without targets.

    Shapes: B windows, N = sum(window_length) events, R requests, C candidates. The history
    tensors gather the windows' events from every (E,) array of `history`: product, source,
    action and the model's side features (city, store, timestamp). `request_features` maps
    the same names to the (R,) side features of the requests.
    """
    offsets = np.cumsum(window_length) - window_length
    within = np.arange(int(window_length.sum()), dtype=np.int64) - np.repeat(offsets, window_length)
    gather = torch.from_numpy(np.repeat(window_start, window_length) + within)

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))

    history_batch = {name: values[gather] for name, values in history.items()}
    history_batch.update(position=tensor(within), lengths=tensor(window_length))
    requests_batch = {
        "source": tensor(request_source),
        "state_index": tensor(request_state),
        "lengths": tensor(candidates_per_request),
        "num_requests": tensor(requests_per_window),
    }
    for name, values in (request_features or {}).items():
        requests_batch[name] = tensor(values)
    return {
        "history": history_batch,
        "requests": requests_batch,
        "candidates": {"product": tensor(candidate_product)},
    }


def _to_device(
    batch: dict[str, dict[str, torch.Tensor]], device: torch.device
) -> dict[str, dict[str, torch.Tensor]]:
    return {
        part: {name: value.to(device) for name, value in tensors.items()}
        for part, tensors in batch.items()
    }


def lowest_logit(model: FinetuneModel) -> float:
    """Return the smallest logit `model.score` can output.

    The cosine term <u, v> lies in [-1, 1], so the logit is at least
    bias - 1 / exp(scale), plus the smallest history-match offsets when the model has them.
    """
    with torch.no_grad():
        lowest = float(model.bias) - 1.0 / math.exp(float(model.scale))
        if model.config.history_match:
            lowest += float(model.match_count_logit.weight.min())
            lowest += float(model.match_recency_logit.weight.min())
    return lowest


def _popularity_fraction(product_id: np.ndarray, popularity: pl.DataFrame) -> np.ndarray:
    """(K,) dense rank of each product's cart count divided by the number of distinct counts,
    in [0, 1); a product without carts gets 0."""
    carts = (
        pl.DataFrame({"product_id": product_id})
        .join(popularity, on="product_id", how="left", maintain_order="left")["carts"]
        .fill_null(0)
        .to_numpy()
        .astype(np.int64)
    )
    distinct = np.unique(np.concatenate([[0], popularity["carts"].to_numpy().astype(np.int64)]))
    return np.searchsorted(distinct, carts) / distinct.size


# --- counts and output ---------------------------------------------------------------------------


def _counts(
    groups: pl.DataFrame,
    state: np.ndarray,
    candidate_request: np.ndarray,
    candidate_index: np.ndarray,
    row_candidate: np.ndarray,
    model_candidate: np.ndarray,
) -> dict[str, int]:
    """Count rows, requests, candidates and users, and those that got the fallback score."""
    no_history = state < 0
    row_request = candidate_request[row_candidate]
    users = groups["user_id"].to_numpy()
    users_without = np.setdiff1d(users[no_history], users[~no_history])
    return {
        "rows": int(row_candidate.size),
        "requests": groups.height,
        "candidates": int(candidate_index.size),
        "users": int(np.unique(users).size),
        "users_no_history": int(users_without.size),
        "requests_no_history": int(no_history.sum()),
        "rows_no_history": int(no_history[row_request].sum()),
        "candidates_unseen_product": int((candidate_index == UNKNOWN_INDEX).sum()),
        "rows_unseen_product": int((candidate_index[row_candidate] == UNKNOWN_INDEX).sum()),
        "requests_unseen_source": int((groups["source"].to_numpy() == UNKNOWN_INDEX).sum()),
        "rows_fallback": int((~model_candidate[row_candidate]).sum()),
        "rows_model": int(model_candidate[row_candidate].sum()),
    }


def _event_counts(events: pl.DataFrame, windows: HistoryWindows) -> dict[str, int]:
    return {
        "history_events": events.height,
        "history_events_unseen_product": int((events["product"] == UNKNOWN_INDEX).sum()),
        "history_events_unseen_source": int((events["source"] == UNKNOWN_INDEX).sum()),
        "windows": int(windows.start.size),
        "window_events": int(windows.length.sum()),
    }


def _log_counts(counts: dict[str, int], seconds: float, model_seconds: float) -> None:
    logger.info(
        "scored %d rows (%d requests, %d distinct candidates) in %.1f s, %.0f rows/s; the model "
        "took %.1f s over %d windows of %d events",
        counts["rows"],
        counts["requests"],
        counts["candidates"],
        seconds,
        counts["rows"] / max(seconds, 1e-9),
        model_seconds,
        counts["windows"],
        counts["window_events"],
    )
    if counts["rows_fallback"]:
        logger.info(
            "%d rows got the fallback score: %d rows of %d requests (%d users) without a "
            "positive event before the cutoff, %d rows of %d products the run has not seen",
            counts["rows_fallback"],
            counts["rows_no_history"],
            counts["requests_no_history"],
            counts["users_no_history"],
            counts["rows_unseen_product"],
            counts["candidates_unseen_product"],
        )
    if counts["requests_unseen_source"] or counts["history_events_unseen_source"]:
        logger.info(
            "%d requests and %d history events have a surface the run has not seen; they use "
            "the reserved index 0",
            counts["requests_unseen_source"],
            counts["history_events_unseen_source"],
        )
    if counts["history_events_unseen_product"]:
        logger.info(
            "%d history events have a product the run has not seen; they use the reserved index 0",
            counts["history_events_unseen_product"],
        )


def write_scores(result: ScoreResult, path: str | Path) -> Path:
    """Write the scores to parquet with `result.metadata` as JSON under `METADATA_KEY`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = json.dumps(result.metadata, ensure_ascii=False)
    result.scores.write_parquet(path, metadata={METADATA_KEY: metadata})
    logger.info("wrote %d scores to %s", result.scores.height, path)
    return path


def read_score_metadata(path: str | Path) -> dict[str, Any]:
    """Return the JSON metadata `write_scores` stored in a scores file, or {} when it has none."""
    stored = pl.read_parquet_metadata(path)
    return json.loads(stored[METADATA_KEY]) if METADATA_KEY in stored else {}
