"""Training throughput: our loop against TRL's SFTTrainer on the same workload, side by side.

    python -m agenttune.bench train.global_batch_size=8 train.micro_batch_size=4   # tiny model, demo data, CPU
    python -m agenttune.bench --arch qwen2.5-7b --data synthetic --seq-len 2048 --bf16 --grad-ckpt \\
        --lora-r 8 --micro-batch 2 --global-batch 16 --max-tokens 8192 hardware=1gpu

Positional arguments are train.py's config overrides (model=, tuner=, hardware=, train.*,
loss.*); the flags below add a few of them by name. Each (loop, layout) pair runs in a fresh
process, one after the other, so every run has the device, and its peak memory, to itself.
Layouts: padded (micro_batch_size samples, padded to the longest), grouped (the same, sorted
by length; TRL: train_sampling_strategy=group_by_length), packed (rows of at most
train.max_tokens_per_batch tokens, padding-free; TRL: packing_strategy=bfd).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace

from .throughput import ARCHS, LAYOUTS, RESULT_PREFIX, Workload, workload_json


def parse(argv=None) -> tuple[Workload, list[str], str | None]:
    p = argparse.ArgumentParser(prog="python -m agenttune.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("overrides", nargs="*", help="train.py config overrides, e.g. model=qwen7b train.micro_batch_size=4")
    p.add_argument("--arch", choices=sorted(ARCHS), help="a real architecture's sizes with random weights (overrides model.path)")
    p.add_argument("--data", choices=("config", "synthetic"), default="config",
                   help="config: the config's data group through the real pipeline (default: demo); synthetic: random tokens")
    p.add_argument("--samples", type=int, default=512, help="synthetic rows")
    p.add_argument("--seq-len", type=int,
                   help="synthetic: longest sample (default 2048); config data: data.supervision.max_length")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warmup included")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over all runs; each run's fastest round is kept (a shared machine's noise only slows runs down)")
    p.add_argument("--layouts", default="padded,packed", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--loops", default="ours,trl", help="ours, trl or both; trl needs pip install -r requirements-bench.txt")
    p.add_argument("--bf16", action="store_true", help="= hardware.mixed_precision=bf16")
    p.add_argument("--grad-ckpt", action="store_true", help="= hardware.gradient_checkpointing=true")
    p.add_argument("--lora-r", type=int, help="= tuner.r")
    p.add_argument("--micro-batch", type=int, help="= train.micro_batch_size")
    p.add_argument("--global-batch", type=int, help="= train.global_batch_size")
    p.add_argument("--max-tokens", type=int, help="= train.max_tokens_per_batch (packed)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU where no table entry applies (e.g. a CPU)")
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process: quicker to start, but the runs share a peak RSS (smoke tests, debugging)")
    args = p.parse_args(argv)

    overrides = list(args.overrides)
    for flag, key in (("lora_r", "tuner.r"), ("micro_batch", "train.micro_batch_size"),
                      ("global_batch", "train.global_batch_size"), ("max_tokens", "train.max_tokens_per_batch")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.bf16:
        overrides.append("hardware.mixed_precision=bf16")
    if args.grad_ckpt:
        overrides.append("hardware.gradient_checkpointing=true")
    if args.seq_len is not None and args.data == "config":
        overrides.append(f"data.supervision.max_length={args.seq_len}")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - set(LAYOUTS):
        p.error(f"--layouts: {args.layouts!r}; choose from {', '.join(LAYOUTS)}")
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    if not loops or set(loops) - {"ours", "trl"}:
        p.error(f"--loops: {args.loops!r}; choose ours, trl or ours,trl")
    if "trl" in loops and importlib.util.find_spec("trl") is None:
        p.error("--loops includes trl, which is not installed: pip install -r requirements-bench.txt (or --loops ours)")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup ({args.warmup}) must be in [0, --steps={args.steps})")
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    work = Workload(overrides=overrides, arch=args.arch, data=args.data, samples=args.samples,
                    seq_len=args.seq_len or 2048, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops)
    return work, [(layout, loop) for layout in layouts for loop in loops], args.repeat, args.json, args.in_process


def run_here(loop: str, work: Workload) -> dict:
    from transformers.utils import logging as hf_logging

    from .throughput import run_ours, run_trl

    print(f"running {loop} / {work.layout} (in process) ...", file=sys.stderr, flush=True)
    hf_logging.set_verbosity_error()
    return (run_ours if loop == "ours" else run_trl)(work)


def run_child(loop: str, work: Workload) -> dict:
    command = [sys.executable, "-m", "agenttune.bench.throughput", loop, workload_json(work)]
    print(f"running {loop} / {work.layout} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"the {loop} / {work.layout} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def table(results: list[dict]) -> str:
    columns = (("layout", "layout", "{}"), ("loop", "loop", "{}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
               ("trained_tokens_per_s", "trained tok/s", "{:,.0f}"), ("padding_fraction", "padding", "{:.1%}"),
               ("micro_batches_per_step", "micro/step", "{:g}"), ("peak_mem_gib", "peak GiB", "{:.2f}"),
               ("mfu", "MFU", "{:.1%}"))
    rows = [[label for _, label, _ in columns]]
    for r in results:
        rows.append(["n/a" if r[key] is None else fmt.format(r[key]) for key, _, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def ratios(results: list[dict]) -> dict[str, float]:
    """ours/TRL per layout, on trained tokens/s (the work both loops exist to do)."""
    by = {(r["layout"], r["loop"]): r for r in results}
    out = {}
    for layout in LAYOUTS:
        if (layout, "ours") in by and (layout, "trl") in by:
            out[f"{layout}: ours/trl"] = by[layout, "ours"]["trained_tokens_per_s"] / by[layout, "trl"]["trained_tokens_per_s"]
    for layout in ("grouped", "packed"):
        if (layout, "ours") in by and ("padded", "ours") in by:
            padded = by["padded", "ours"]["trained_tokens_per_s"]
            out[f"ours: {layout}/padded"] = by[layout, "ours"]["trained_tokens_per_s"] / padded
    return out


def main(argv=None) -> None:
    work, runs, repeat, json_path, in_process = parse(argv)
    run_one = run_here if in_process else run_child
    rounds: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for _ in range(repeat):  # rounds interleave the runs, so a burst of outside load hits one round of each
        for layout, loop in runs:
            run = replace(work, layout=layout)
            if loop == "trl" and layout == "packed" and rounds.get(("packed", "ours")):
                # TRL accumulates a fixed number of packed rows per step; match our mean micro-batch count
                run = replace(run, trl_accumulation=max(1, round(rounds["packed", "ours"][0]["micro_batches_per_step"])))
            rounds[layout, loop].append(run_one(loop, run))
    results = []
    for run in runs:
        best = dict(max(rounds[run], key=lambda r: r["trained_tokens_per_s"]))
        best["rounds_trained_tokens_per_s"] = [r["trained_tokens_per_s"] for r in rounds[run]]
        results.append(best)
    print(f"device: {results[0]['device']}; model: {results[0]['model']}; timed steps: {results[0]['timed_steps']}; "
          f"best of {repeat} round(s)")
    print(table(results))
    summary = ratios(results)
    for name, value in summary.items():
        print(f"{name}: {value:.2f}x")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"workload": json.loads(workload_json(work)), "results": results, "ratios": summary}, f, indent=1)


if __name__ == "__main__":
    main()
