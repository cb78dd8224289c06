"""agenttune.cpu: freed memory kept for reuse on glibc; the bf16-or-fp32 probe behind
hardware.mixed_precision=auto (and model.dtype=auto at inference)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

import yaml

from agenttune import cpu
from agenttune.config import HardwareConfig
from agenttune.training import resolve_mixed_precision
from test_train_support import FAST, ROOT, env, run_train

# A training step's pattern of allocations: large buffers (above glibc's 32 MiB mmap ceiling and
# below it) alive together, then all freed; the page faults of 20 such steps after 2 warm-up ones.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from agenttune.cpu import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def step():
        held = [torch.ones(n) for n in (30 * 2**20, 9 * 2**20, 2 * 2**20, 30 * 2**20, 500_000)]
        return sum(float(t[0]) for t in held)
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_memory_is_reused_without_page_faults():
    """With glibc's defaults every step maps its large buffers afresh and faults each page in
    again (about 70,000 pages a step here); with keep_freed_memory the heap's blocks are reused."""
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 20 * 30_000, default
    assert kept * 10 < default, (kept, default)


def test_matmul_speeds_are_measured_in_both_precisions():
    speeds = cpu.matmul_speeds(tokens=64, width=64, out=128, repeats=2)
    assert set(speeds) == {"fp32", "bf16"} and all(v > 0 for v in speeds.values()), speeds


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [
    (150.0, 363.0, True),   # oneDNN with AMX / AVX-512 BF16 kernels: the demo VM on 12-06's morning
    (265.0, 157.0, False),  # the same VM type without them, that afternoon
    (100.0, 115.0, False),  # within the margin: bf16's rounding is not worth 15%
])
def test_bf16_is_chosen_only_by_a_clear_margin(monkeypatch, fp32, bf16, chosen):
    monkeypatch.setattr(cpu, "matmul_speeds", lambda: {"fp32": fp32, "bf16": bf16})
    cpu.bf16_is_faster.cache_clear()
    try:
        assert cpu.bf16_is_faster() == (chosen, {"fp32": fp32, "bf16": bf16})
    finally:
        cpu.bf16_is_faster.cache_clear()


def test_auto_mixed_precision_follows_the_probe_and_leaves_explicit_values(monkeypatch):
    for faster, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(cpu, "bf16_is_faster", lambda faster=faster: (faster, {"bf16": 1.0, "fp32": 1.0}))
        assert resolve_mixed_precision(HardwareConfig(mixed_precision="auto")).mixed_precision == expected
    monkeypatch.setattr(cpu, "bf16_is_faster", lambda: pytest.fail("an explicit value must not be probed"))
    for value in ("no", "bf16"):
        assert resolve_mixed_precision(HardwareConfig(mixed_precision=value)).mixed_precision == value


AGREE = textwrap.dedent("""
    import os, sys
    import torch
    import agenttune.cpu as cpu
    from agenttune.config import HardwareConfig
    from agenttune.training import resolve_mixed_precision
    rank = int(os.environ["RANK"])
    rank0_says = sys.argv[1] == "bf16"
    # each rank's own probe would answer differently (2 ranks timing matmuls on 2 shared cores can)
    cpu.bf16_is_faster = lambda: (rank0_says if rank == 0 else not rank0_says, {"bf16": 1.0, "fp32": 1.0})
    # the line and its newline in one write (print makes two), flushed before the group is torn down
    sys.stdout.write(f"rank {rank}: {resolve_mixed_precision(HardwareConfig(mixed_precision='auto')).mixed_precision}\\n")
    sys.stdout.flush()
    torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit
""")


def test_auto_mixed_precision_is_rank_zeros_choice_on_every_rank(tmp_path):
    """Two CPU processes (real DDP over gloo): rank 0 measures and the other ranks take its answer;
    ranks training with different autocast dtypes would still all-reduce, silently."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    e = env()
    e["ACCELERATE_USE_CPU"] = "1"
    for rank0_says, expected in (("bf16", "bf16"), ("no", "no")):
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "--main_process_port", str(29700 + os.getpid() % 1000), str(script), rank0_says],
                              env=e, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # read as pairs, not lines: CI once saw "rank 1: norank 0: no", the ranks' writes interleaved
        assert sorted(re.findall(r"rank (\d): (bf16|no)\b", proc.stdout.replace("rank", " rank"))) == [
            ("0", expected), ("1", expected)], proc.stdout


def test_train_records_what_auto_resolved_to(tmp_path):
    """The run's config.yaml holds the precision it trained in, which inference and a resume read;
    the log says what was measured."""
    proc = run_train(tmp_path, FAST + ["hardware.mixed_precision=auto", "train.max_steps=1",
                                       f"output_dir={tmp_path / 'o'}"])
    saved = yaml.safe_load((tmp_path / "o" / "checkpoints" / "step-1" / "config.yaml").read_text())
    chosen = saved["hardware"]["mixed_precision"]
    assert chosen in ("bf16", "no")
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "hardware.mixed_precision=auto" in line)
    assert f"auto: {'no (fp32)' if chosen == 'no' else chosen} (this CPU multiplies bf16 at " in line, line
