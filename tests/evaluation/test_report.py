import numpy as np
import pytest

from cartformer.evaluation.report import (
    AblationArm,
    MethodResult,
    ablation_conclusion,
    ablation_rows,
    conclusion,
    format_ablation_table,
    format_table,
    paired_difference,
    render_ablation,
    render_report,
    results_table,
)


def make_results() -> list[MethodResult]:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, size=500)
    return [
        MethodResult("finetune: scratch", "model", base + 0.05),
        MethodResult("finetune: pretrained-backbone", "model", base + 0.10),
        MethodResult("popularity", "baseline", base),
        MethodResult("random", "baseline", base - 0.1),
        MethodResult("oracle", "oracle", base + 0.3),
    ]


def test_table_sorted_and_relative_to_best_baseline():
    rows = results_table(make_results())
    assert [name for name, *_ in rows][0] == "oracle"
    deltas = {name: delta for name, _, _, delta in rows}
    assert np.isclose(deltas["popularity"], 0.0)
    assert np.isclose(deltas["finetune: pretrained-backbone"], 0.10)


def test_paired_difference_of_constant_shift():
    results = make_results()
    diff, half = paired_difference(results[1], results[0])
    assert np.isclose(diff, 0.05)
    assert half < 1e-9


def test_conclusion_states_winner_and_pretraining():
    sentences = conclusion(make_results())
    text = " ".join(sentences)
    assert "`finetune: pretrained-backbone`, beats the best baseline `popularity`" in text
    assert "Pretraining helped" in text
    assert "closes 50%" in text


def test_conclusion_reports_loss_to_baseline():
    results = make_results()
    results[2] = MethodResult("popularity", "baseline", results[2].per_request + 0.5)
    text = " ".join(conclusion(results))
    assert "is below the best baseline" in text


def test_report_and_table_render(tmp_path):
    results = make_results()
    history = [
        {"epoch": 1, "valid_loss": 9.0, "valid_retrieval_loss": 8.0, "valid_feedback_loss": 0.1},
    ]
    text = render_report(results, {"data_path": "x"}, history, {}, [], tmp_path, {"a": 1})
    assert "| oracle | oracle |" in text
    assert "best validation loss 9.0000" in text
    assert "oracle" in format_table(results)


def make_arms() -> list[AblationArm]:
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.6, size=400)
    common = {"variant": "pretrained-backbone", "parameters": 1000}
    return [
        AblationArm(
            "id-only",
            (),
            per_request=base,
            pretrain_valid_loss=9.0,
            pretrain_epoch_seconds=10.0,
            finetune_epoch_seconds=5.0,
            **common,
        ),
        AblationArm(
            "time",
            ("time",),
            per_request=base + rng.normal(0, 0.05, 400),
            pretrain_valid_loss=8.9,
            pretrain_epoch_seconds=11.0,
            finetune_epoch_seconds=5.5,
            **common,
        ),
        AblationArm(
            "all",
            ("categorical", "text", "time"),
            per_request=base + 0.02,
            pretrain_valid_loss=None,
            pretrain_epoch_seconds=None,
            finetune_epoch_seconds=7.0,
            **common,
        ),
    ]


def test_ablation_rows_paired_to_id_only():
    rows = {row["arm"]: row for row in ablation_rows(make_arms())}
    assert np.isnan(rows["id-only"]["diff_vs_reference"])
    assert np.isclose(rows["all"]["diff_vs_reference"], 0.02)
    assert rows["all"]["diff_half_width"] < 1e-9
    assert rows["time"]["diff_half_width"] > 0


def test_ablation_rows_reject_other_groups():
    arms = make_arms()
    arms[1].per_request = arms[1].per_request[:10]
    with pytest.raises(ValueError, match="share the validation groups"):
        ablation_rows(arms)


def test_ablation_conclusion_beats():
    sentence = ablation_conclusion(make_arms())
    assert sentence.startswith("The model with all side features beats the id-only model")
    assert "+0.0200" in sentence


def test_ablation_conclusion_says_not():
    arms = make_arms()
    arms[2].per_request = arms[0].per_request + np.random.default_rng(2).normal(0, 0.05, 400)
    sentence = ablation_conclusion(arms)
    assert "does not beat" in sentence or "is below" in sentence


def test_render_ablation_table():
    text = render_ablation(
        make_arms(),
        {"data_path": "demo.parquet", "timings": {"tokenize": 0.5}, "tokenizer": "wordpiece"},
        {"variants": ["pretrained-backbone"]},
    )
    assert "| all | categorical, text, time | pretrained-backbone | " in text
    assert "| id-only | none | pretrained-backbone | " in text
    assert "tokenizing every product: 0.50 s" in text
    assert "## Conclusion" in text
    assert "—" in format_ablation_table(make_arms())
