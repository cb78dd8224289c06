"""The λ study report: it pairs each sweep run's λ (from its saved config) with its held-out
agent metrics and its last held-out general loss, and writes the table, numbers and plot."""

from __future__ import annotations

import json

from agenttune.bench.lambda_study import main


def fake_run(root, lam: float, general_loss: float, name_acc: float):
    run = root / f"lambda={lam}"
    (run / "final").mkdir(parents=True)
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "checkpoints" / "step-10" / "config.yaml").write_text(f"loss:\n  lambda_agent: {lam}\n")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"step": 5, "eval/loss": 9.0, "eval/loss_agent": 9.0, "eval/loss_general": 9.0},
        {"step": 10, "loss": 1.0},
        {"step": 10, "eval/loss": 1.0, "eval/loss_agent": 0.5, "eval/loss_general": general_loss},
    ]) + "\n")
    (run / "predict").mkdir()  # predictions already made: the study reuses them
    (run / "predict" / "metrics.json").write_text(json.dumps({
        "tool_name_accuracy": name_acc, "argument_exact_match": name_acc / 2,
        "final_answer_exact_match": 0.1, "format_validity": 0.9}))
    return run


def test_lambda_study_tables_and_plots_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep, 1.0, 2.5, 0.8)
    fake_run(sweep, 0.2, 1.7, 0.6)
    base = tmp_path / "base"
    base.mkdir()
    (base / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/loss": 1.5, "eval/loss_general": 1.5}) + "\n")
    out = tmp_path / "docs"
    assert main([str(sweep), "--base", str(base), "--out", str(out)]) == 0
    data = json.loads((out / "lambda_study.json").read_text())
    assert data["base_general_loss"] == 1.5
    by_lambda = {r["lambda"]: r for r in data["runs"]}
    assert by_lambda[1.0]["general_loss"] == 2.5 and by_lambda[0.2]["tool_name_accuracy"] == 0.6
    table = (out / "lambda_study.md").read_text().splitlines()
    assert table[2].startswith("| base (before)") and table[3].startswith("| 1.0 |") and table[4].startswith("| 0.2 |")
    assert (out / "lambda_study.png").stat().st_size > 10_000
    assert main([str(tmp_path / "base"), "--out", str(out)]) == 1  # no finished runs there
