import numpy as np

from cartformer.evaluation.report import (
    MethodResult,
    conclusion,
    format_table,
    paired_difference,
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
