"""The run report: a results table, learning curves and a conclusion computed from the numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class MethodResult:
    """Per-request NDCG@10 of one model or baseline on the validation requests."""

    name: str
    kind: str  # "model", "baseline" or "oracle"
    per_request: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.per_request.mean())


def paired_difference(a: MethodResult, b: MethodResult) -> tuple[float, float]:
    """Mean of ``a - b`` over the same requests and the half-width of its 95% normal interval."""
    diff = a.per_request - b.per_request
    if diff.size < 2:
        return float(diff.mean()), math.nan
    half_width = 1.96 * float(diff.std(ddof=1)) / math.sqrt(diff.size)
    return float(diff.mean()), half_width


def results_table(results: Sequence[MethodResult]) -> list[tuple[str, str, float, float]]:
    """Rows (name, kind, NDCG@10, difference to the best baseline), best first."""
    baselines = [r for r in results if r.kind == "baseline"]
    best_baseline = max(baselines, key=lambda r: r.mean) if baselines else None
    rows = []
    for result in sorted(results, key=lambda r: r.mean, reverse=True):
        delta = result.mean - best_baseline.mean if best_baseline else math.nan
        rows.append((result.name, result.kind, result.mean, delta))
    return rows


def format_table(results: Sequence[MethodResult]) -> str:
    """Format the results as a plain-text table for the terminal."""
    rows = results_table(results)
    width = max(len(name) for name, *_ in rows) + 2
    lines = [f"{'method':<{width}}{'kind':<10}{'NDCG@10':>9}{'vs best baseline':>18}"]
    for name, kind, value, delta in rows:
        lines.append(f"{name:<{width}}{kind:<10}{value:>9.4f}{delta:>+18.4f}")
    return "\n".join(lines)


def conclusion(results: Sequence[MethodResult]) -> list[str]:
    """Sentences that state what the numbers show: the best model against the baselines,
    the effect of pretraining and the distance to the oracle."""
    by_name = {r.name: r for r in results}
    models = [r for r in results if r.kind == "model"]
    baselines = [r for r in results if r.kind == "baseline"]
    oracle = next((r for r in results if r.kind == "oracle"), None)
    sentences: list[str] = []
    if not models:
        return ["No finetuned model was evaluated, so there is nothing to compare yet."]

    best = max(models, key=lambda r: r.mean)
    if baselines:
        best_baseline = max(baselines, key=lambda r: r.mean)
        diff, half = paired_difference(best, best_baseline)
        if diff - half > 0:
            verdict = "beats"
        elif diff + half < 0:
            verdict = "is below"
        else:
            verdict = "ties"
        sentences.append(
            f"The best model, `{best.name}`, {verdict} the best baseline `{best_baseline.name}`: "
            f"NDCG@10 {best.mean:.4f} against {best_baseline.mean:.4f}, a paired difference of "
            f"{diff:+.4f} ± {half:.4f} (95% interval over {best.per_request.size} requests)."
        )

    scratch = by_name.get("finetune: scratch")
    for name in ("finetune: pretrained-backbone", "finetune: pretrained-backbone-heads"):
        pretrained = by_name.get(name)
        if scratch is None or pretrained is None:
            continue
        diff, half = paired_difference(pretrained, scratch)
        effect = (
            "helped"
            if diff - half > 0
            else ("hurt" if diff + half < 0 else "made no clear difference")
        )
        init = name.removeprefix("finetune: ")
        sentences.append(
            f"Pretraining {effect} with initialization `{init}`: {diff:+.4f} ± {half:.4f} NDCG@10 "
            f"relative to finetuning from scratch."
        )

    random_result = by_name.get("random")
    if oracle is not None and random_result is not None and oracle.mean > random_result.mean:
        closed = (best.mean - random_result.mean) / (oracle.mean - random_result.mean)
        sentences.append(
            f"The oracle (the generator's true cart probabilities) reaches {oracle.mean:.4f}; the "
            f"best model closes {closed:.0%} of the gap between random ranking and the oracle."
        )
    return sentences


def plot_learning_curves(
    pretrain_history: list[dict[str, Any]],
    finetune_histories: dict[str, list[dict[str, Any]]],
    figures_dir: Path,
) -> list[Path]:
    """Draw the pretrain loss and the finetune validation NDCG@10 per epoch as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if pretrain_history:
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [r["epoch"] for r in pretrain_history]
        ax.plot(epochs, [r["train_loss"] for r in pretrain_history], marker="o", label="train")
        ax.plot(epochs, [r["valid_loss"] for r in pretrain_history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("retrieval + 10 × feedback loss")
        ax.set_title("Pretraining")
        ax.legend()
        fig.tight_layout()
        path = figures_dir / "pretrain_loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if finetune_histories:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, history in finetune_histories.items():
            if history:
                epochs = [r["epoch"] for r in history]
                ax.plot(epochs, [r["valid_ndcg10"] for r in history], marker="o", label=variant)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation NDCG@10")
        ax.set_title("Finetuning")
        ax.legend()
        fig.tight_layout()
        path = figures_dir / "finetune_ndcg.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def render_report(
    results: Sequence[MethodResult],
    meta: dict[str, Any],
    pretrain_history: list[dict[str, Any]],
    finetune_histories: dict[str, list[dict[str, Any]]],
    figures: Sequence[Path],
    report_dir: Path,
    config: dict[str, Any],
) -> str:
    """Return the Markdown text of ``report.md``."""
    lines = ["# cartformer report", ""]
    lines += [
        f"Data: `{meta.get('data_path', '?')}`. Validation requests scored: "
        f"{results[0].per_request.size if results else 0} (requests with more than one product, "
        "the same for every row).",
        "",
        "## NDCG@10 on the validation requests",
        "",
        "| method | kind | NDCG@10 | vs best baseline |",
        "|---|---|---:|---:|",
    ]
    for name, kind, value, delta in results_table(results):
        lines.append(f"| {name} | {kind} | {value:.4f} | {delta:+.4f} |")
    lines += ["", "## Conclusion", ""]
    lines += [f"- {sentence}" for sentence in conclusion(results)]

    lines += ["", "## Training", ""]
    history_match = config.get("model", {}).get("history_match", False)
    lines.append(
        "- Finetune head: calibrated logit <u, v> / exp(s) + b"
        + (
            " plus learned offsets for the candidate's count and recency in the shopper's "
            "history up to the scoring state (`history_match`)."
            if history_match
            else " only (the plain method, `history_match` off)."
        )
    )
    lines.append(
        "- Each finetune variant keeps the epoch with the best NDCG@10 on these same validation "
        "requests, so its figure is slightly optimistic; the baselines have no such choice."
    )
    if pretrain_history:
        best = min(pretrain_history, key=lambda r: r["valid_loss"])
        lines.append(
            f"- Pretrain: best validation loss {best['valid_loss']:.4f} (retrieval "
            f"{best['valid_retrieval_loss']:.4f}, feedback {best['valid_feedback_loss']:.4f}) at "
            f"epoch {best['epoch']} of {len(pretrain_history)}."
        )
    for variant, history in finetune_histories.items():
        if history:
            best = max(history, key=lambda r: r["valid_ndcg10"])
            seconds = sum(r["seconds"] for r in history)
            lines.append(
                f"- Finetune `{variant}`: best validation NDCG@10 {best['valid_ndcg10']:.4f} at "
                f"epoch {best['epoch']} of {len(history)} ({seconds:.0f} s)."
            )
    for path in figures:
        lines += ["", f"![{path.stem}]({path.relative_to(report_dir).as_posix()})"]

    lines += ["", "## Data", ""]
    split = meta.get("split", {})
    for key in ("train_end_iso", "valid_start_iso", "valid_end_iso"):
        if key in split:
            lines.append(f"- {key.removesuffix('_iso').replace('_', ' ')}: {split[key]}")
    for key in ("counts", "vocab_sizes", "dropped"):
        if key in meta:
            lines.append(
                f"- {key.replace('_', ' ')}: `{json.dumps(meta[key], ensure_ascii=False)}`"
            )
    lines += _json_section("Configuration", config)
    return "\n".join(lines)


# --- ablation ------------------------------------------------------------------------------------


@dataclass
class AblationArm:
    """One model of the side-feature ablation, evaluated on the shared validation requests."""

    name: str
    """Arm name, e.g. "id-only", "categorical", "text", "time" or "all"."""
    features: tuple[str, ...]
    """Side-feature groups that are on: a subset of ("categorical", "text", "time")."""
    variant: str
    """Finetune variant whose NDCG@10 the arm reports."""
    per_request: np.ndarray
    """(R,) NDCG@10 per validation request, in the order shared by all arms."""
    pretrain_valid_loss: float | None
    """Best pretrain validation loss (retrieval + weighted feedback), None without pretraining."""
    parameters: int
    """Trainable parameters of the finetune model."""
    pretrain_epoch_seconds: float | None
    """Mean wall time of one pretrain epoch, training plus validation."""
    finetune_epoch_seconds: float | None
    """Mean wall time of one finetune epoch of `variant`, training plus validation."""

    @property
    def mean(self) -> float:
        return float(self.per_request.mean())


def ablation_rows(arms: Sequence[AblationArm], reference: str = "id-only") -> list[dict[str, Any]]:
    """Return one row per arm with NDCG@10 and its paired difference to the `reference` arm."""
    by_name = {arm.name: arm for arm in arms}
    base = by_name.get(reference)
    rows = []
    for arm in arms:
        if base is not None and arm.per_request.shape != base.per_request.shape:
            raise ValueError(
                f"arm {arm.name!r} has {arm.per_request.size} scored requests but "
                f"{reference!r} has {base.per_request.size}; arms must share the validation groups"
            )
        diff, half = (
            paired_difference(_as_result(arm), _as_result(base))
            if base is not None and arm is not base
            else (math.nan, math.nan)
        )
        rows.append(
            {
                "arm": arm.name,
                "features": list(arm.features),
                "variant": arm.variant,
                "ndcg10": arm.mean,
                "diff_vs_reference": diff,
                "diff_half_width": half,
                "pretrain_valid_loss": arm.pretrain_valid_loss,
                "parameters": arm.parameters,
                "pretrain_epoch_seconds": arm.pretrain_epoch_seconds,
                "finetune_epoch_seconds": arm.finetune_epoch_seconds,
                "requests": int(arm.per_request.size),
            }
        )
    return rows


def _as_result(arm: AblationArm) -> MethodResult:
    return MethodResult(arm.name, "model", arm.per_request)


def ablation_conclusion(
    arms: Sequence[AblationArm], full: str = "all", reference: str = "id-only"
) -> str:
    """State whether the `full` arm beats the `reference` arm, with the paired interval."""
    by_name = {arm.name: arm for arm in arms}
    if full not in by_name or reference not in by_name:
        return f"The ablation has no `{full}` and `{reference}` pair to compare."
    best, base = by_name[full], by_name[reference]
    diff, half = paired_difference(_as_result(best), _as_result(base))
    if diff - half > 0:
        verdict = "beats"
    elif diff + half < 0:
        verdict = "is below"
    else:
        verdict = "does not beat"
    sentence = (
        f"The model with all side features {verdict} the id-only model: NDCG@10 "
        f"{best.mean:.4f} against {base.mean:.4f}, a paired difference of {diff:+.4f} ± "
        f"{half:.4f} (95% interval over {best.per_request.size} requests)."
    )
    if verdict == "does not beat":
        sentence += " The difference is within the noise of these requests."
    return sentence


def format_ablation_table(arms: Sequence[AblationArm]) -> str:
    """Format the ablation as a plain-text table for the terminal."""
    lines = [
        f"{'arm':<13}{'NDCG@10':>9}{'vs id-only':>20}{'pretrain loss':>15}{'parameters':>12}"
        f"{'s/epoch pre':>13}{'s/epoch fine':>14}"
    ]
    for row in ablation_rows(arms):
        lines.append(
            f"{row['arm']:<13}{row['ndcg10']:>9.4f}{_format_diff(row):>20}"
            f"{_format_optional(row['pretrain_valid_loss'], '.4f'):>15}{row['parameters']:>12,}"
            f"{_format_optional(row['pretrain_epoch_seconds'], '.1f'):>13}"
            f"{_format_optional(row['finetune_epoch_seconds'], '.1f'):>14}"
        )
    return "\n".join(lines)


def render_ablation(
    arms: Sequence[AblationArm],
    preparation: dict[str, Any],
    settings: dict[str, Any],
) -> str:
    """Return the Markdown text of ``ablation.md``.

    Args:
        arms: the evaluated arms, id-only first.
        preparation: `meta.json`'s "features" section plus "timings" (seconds per step of the
            side-feature preparation, from features/timings.json) and "data_path".
        settings: the shared run settings shown at the end (epochs, variant, seed).
    """
    requests = arms[0].per_request.size if arms else 0
    lines = [
        "# Side-feature ablation",
        "",
        f"Data: `{preparation.get('data_path', '?')}`. Every arm is scored on the same "
        f"{requests} validation requests (those with more than one product). NDCG@10 is that "
        "of the finetune variant named in the table, at its best validation epoch.",
        "",
        "| arm | features | variant | NDCG@10 | vs id-only (95% interval) | pretrain valid loss "
        "| parameters | pretrain s/epoch | finetune s/epoch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ablation_rows(arms):
        features = ", ".join(row["features"]) or "none"
        lines.append(
            f"| {row['arm']} | {features} | {row['variant']} | {row['ndcg10']:.4f} | "
            f"{_format_diff(row)} | {_format_optional(row['pretrain_valid_loss'], '.4f')} | "
            f"{row['parameters']:,} | {_format_optional(row['pretrain_epoch_seconds'], '.1f')} | "
            f"{_format_optional(row['finetune_epoch_seconds'], '.1f')} |"
        )
    lines += ["", "## Conclusion", "", f"- {ablation_conclusion(arms)}"]
    lines += [
        "- Pretrain validation losses of arms with text features include the catalogue softmax "
        "over text-aware item vectors, so lower is better across arms as well.",
        "- Seconds per epoch are wall times of training plus validation on this machine, "
        "measured while other processes may have shared it.",
        "",
        "## Preparation of the side features",
        "",
    ]
    timings = preparation.get("timings", {})
    for key, label in (
        ("context", "city and store of events and requests"),
        ("text_read", "reading one text per product"),
        ("tokenizer", "training or loading the tokenizer"),
        ("tokenize", "tokenizing every product"),
    ):
        if key in timings:
            lines.append(f"- {label}: {timings[key]:.2f} s")
    lines.append(
        f"- tokenizer: `{preparation.get('tokenizer') or 'none'}`, vocabulary sizes "
        f"`{json.dumps(preparation.get('vocab_sizes', {}))}`"
    )
    lines += _json_section("Settings", settings)
    return "\n".join(lines)


def _json_section(title: str, value: Any) -> list[str]:
    """Return the markdown lines of a section that shows ``value`` as a JSON block."""
    return [
        "",
        f"## {title}",
        "",
        "```json",
        json.dumps(value, indent=2, ensure_ascii=False),
        "```",
        "",
    ]


def _format_diff(row: dict[str, Any]) -> str:
    if math.isnan(row["diff_vs_reference"]):
        return "—"
    return f"{row['diff_vs_reference']:+.4f} ± {row['diff_half_width']:.4f}"


def _format_optional(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)
