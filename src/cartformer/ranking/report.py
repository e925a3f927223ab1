"""The Markdown report of the CatBoost stage, rendered from its summary.json."""

from __future__ import annotations

import math
from typing import Any

from cartformer.ranking.catboost_stage import WITH_TRANSFORMER, WITHOUT_TRANSFORMER


def render_report(summary: dict[str, Any]) -> str:
    """Render the summary that `run_catboost_stage` writes as a Markdown page."""
    periods = summary["periods"]
    counts = summary["counts"]
    transformer = summary["transformer"]
    importance = summary["feature_importance"]
    groups = summary["groups"]
    methods = sorted(summary["methods"].items(), key=lambda item: item[1]["ndcg10"], reverse=True)
    difference = summary["difference_with_minus_without"]

    lines = [
        "# CatBoost with the transformer score",
        "",
        f"Data: `{summary['data']}`.",
        "",
        "| period | role | ends (UTC) |",
        "|---|---|---|",
        f"| A | trains the transformer | {periods['a_end_iso']} |",
        f"| B | trains CatBoost | {periods['b_end_iso']} |",
        f"| C | evaluates | {periods['c_end_iso']} |",
        "",
        f"The transformer (`{transformer['run']}`, variant `{transformer['variant']}`) saw events "
        f"up to {transformer['latest_event_seen_iso']}, inside period A, so the leak check "
        "passed.",
        "",
        f"## NDCG@10 on the {summary['requests_evaluated']} requests of period C",
        "",
        "| method | NDCG@10 |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {entry['ndcg10']:.4f} |" for name, entry in methods]
    half_width = difference["half_width_95"]
    interval = "" if math.isnan(half_width) else f" ± {half_width:.4f}"
    lines += [
        "",
        f"`{WITH_TRANSFORMER}` minus `{WITHOUT_TRANSFORMER}`: {difference['mean']:+.4f}"
        f"{interval} (mean over the same requests, 95% normal interval).",
        "",
        f"The transformer score ranks {importance['transformer_score_rank']} of "
        f"{importance['features']} features in the importance of the ranker that uses it "
        f"(CatBoost's {importance['type']}).",
        "",
        "## Feature importance",
        "",
        "| feature | importance |",
        "|---|---:|",
    ]
    lines += [
        f"| {entry['feature']} | {entry['importance']:.2f} |" for entry in importance["ranking"]
    ]
    lines += [
        "",
        "## Requests",
        "",
        f"- Period B: {counts['requests_B']} requests, {counts['candidates_B']} candidates. "
        f"The rankers train on the first {groups['train_requests']} and stop early on the "
        f"latest {groups['early_stopping_requests']}.",
        f"- Period C: {counts['requests_C']} requests, {counts['candidates_C']} candidates.",
        f"- Transformer scoring of B and C: {counts['scoring_rows_fallback']} candidates got the "
        f"fallback score ({counts['scoring_rows_no_history']} without a positive event before "
        f"the request, {counts['scoring_rows_unseen_product']} with a product the transformer "
        "has not seen).",
        "",
        "Every counter counts only events before the request time. Positive events are cart "
        "updates, clicks and purchases, `surface_product_*` counts the product's events on the "
        "request's surface, and the suffix gives the window (7 days, 30 days or all earlier "
        "events).",
        "",
    ]
    return "\n".join(lines)
