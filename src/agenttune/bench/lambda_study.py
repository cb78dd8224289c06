"""The λ study: how the agent/general loss weight trades tool use against general skills.

    python train.py experiment=general_base                    # 1. a model that knows the general data
    python train.py -m experiment=lambda_sweep                 # 2. fine-tune it at λ = 1.0, 0.5, 0.2
    python -m agenttune.bench.lambda_study outputs/lambda_sweep --base outputs/general_base

For each run of the sweep this scores the held-out agent split with ``infer.py mode=predict``
(reusing ``RUN/predict`` when present), reads the held-out general loss the run evaluated last
(``eval/loss_general`` in metrics.jsonl), and writes a table (``lambda_study.md``), the numbers
(``lambda_study.json``) and a plot (``lambda_study.png``) into ``--out``. The base run's own
held-out general loss is the line forgetting is measured from: AgentTuning's finding is that
training on agent data alone (λ = 1) pays for tool use with general ability, and that mixing
general data back in (λ < 1) keeps most of both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from agenttune.merging import find_run_config

ROOT = Path(__file__).resolve().parents[3]
AGENT_METRICS = ("tool_name_accuracy", "argument_exact_match", "final_answer_exact_match", "format_validity")


def last_eval(run: Path) -> dict:
    evals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in e]
    if not evals:
        raise SystemExit(f"{run}/metrics.jsonl has no eval entries: train with data.eval_datasets set")
    return evals[-1]


def run_lambda(run: Path) -> float:
    config = OmegaConf.load(find_run_config(run / "final"))  # .hydra/ or a checkpoint's config.yaml
    return float(config.loss.lambda_agent)


def predict(run: Path, heldout: list[str], batch_size: int, max_new_tokens: int) -> dict:
    out = run / "predict"
    if not (out / "metrics.json").is_file():
        # Quoted: a path may hold '=' (Hydra's sweep subdirs do), which the override grammar splits on.
        cmd = [sys.executable, str(ROOT / "infer.py"), "mode=predict", f"adapter='{run / 'final'}'",
               f"predict.input=[{','.join(heldout)}]", f"predict.output_dir='{out}'",
               f"predict.batch_size={batch_size}", f"generation.max_new_tokens={max_new_tokens}"]
        subprocess.run(cmd, check=True)
    return json.loads((out / "metrics.json").read_text())


def plot(rows: list[dict], base_general: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["lambda"])
    lams = [r["lambda"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in AGENT_METRICS:
        left.plot(lams, [r[name] for r in rows], marker="o", label=name.replace("_", " "))
    left.set(xlabel="λ (agent loss weight)", ylabel="held-out agent score", ylim=(0, 1.05),
             title="tool use (held-out tasks)")
    left.legend(fontsize=8)
    right.plot(lams, [r["general_loss"] for r in rows], marker="o", color="tab:red", label="after agent tuning")
    if base_general is not None:
        right.axhline(base_general, color="gray", linestyle="--", label="before (general base)")
    right.set(xlabel="λ (agent loss weight)", ylabel="held-out general loss (lower is better)",
              title="general skills (forgetting)")
    right.legend(fontsize=8)
    fig.suptitle("L = λ·L_agent + (1-λ)·L_general")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agenttune.bench.lambda_study", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="the sweep dir: one run per λ, each with final/ and metrics.jsonl")
    p.add_argument("--base", type=Path, help="the run the sweep started from, for the before line")
    p.add_argument("--heldout", nargs="+", default=["synth://agent_heldout.sharegpt.jsonl"])
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    runs = sorted(d for d in args.sweep.iterdir() if (d / "final").is_dir())
    if not runs:
        print(f"error: no finished runs (with final/) under {args.sweep}", file=sys.stderr)
        return 1
    rows = []
    for run in runs:
        metrics, evaluation = predict(run, args.heldout, args.batch_size, args.max_new_tokens), last_eval(run)
        rows.append({"run": str(run), "lambda": run_lambda(run), "general_loss": evaluation["eval/loss_general"],
                     "agent_loss": evaluation["eval/loss_agent"], **{k: metrics[k] for k in AGENT_METRICS}})
    base_general = last_eval(args.base)["eval/loss_general"] if args.base else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lambda_study.json").write_text(json.dumps({"base_general_loss": base_general, "runs": rows}, indent=1))
    header = ["λ", *AGENT_METRICS, "held-out general loss", "held-out agent loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if base_general is not None:
        lines.append("| base (before) | " + " | ".join(["-"] * len(AGENT_METRICS)) + f" | {base_general:.3f} | - |")
    for r in sorted(rows, key=lambda r: -r["lambda"]):
        lines.append(f"| {r['lambda']} | " + " | ".join(f"{r[k]:.3f}" for k in AGENT_METRICS)
                     + f" | {r['general_loss']:.3f} | {r['agent_loss']:.3f} |")
    (args.out / "lambda_study.md").write_text("\n".join(lines) + "\n")
    plot(rows, base_general, args.out / "lambda_study.png")
    print("\n".join(lines))
    print(f"wrote {args.out / 'lambda_study.md'}, {args.out / 'lambda_study.json'}, {args.out / 'lambda_study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
