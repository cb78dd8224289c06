"""SIGUSR1 requeue: a signalled run finishes its optimizer step, saves a checkpoint and exits
with REQUEUE_EXIT_CODE; resume=auto then ends exactly where an uninterrupted run ends. With two
ranks, a signal that reaches only one of them stops both at the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agenttune.training import REQUEUE_EXIT_CODE, REQUEUE_MARKER_ENV
from test_train_resume import ARGS, DATA
from test_train_support import launch_command, metrics, run_train, train_env


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until metrics.jsonl has logged ``step`` (the handler is installed by then)."""
    deadline = time.monotonic() + timeout
    path = output_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-3000:]}"
        if path.exists() and any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not logged in {timeout}s")


def start(tmp_path: Path, args: list[str], processes: int = 1, extra_env: dict | None = None) -> subprocess.Popen:
    e = train_env(processes, DATA, {"STEP_DELAY": "0.5", **(extra_env or {})})
    return subprocess.Popen(launch_command(tmp_path, processes) + args, cwd=tmp_path, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_for_requeue_and_resumes_to_the_same_result(tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    run_train(tmp_path, ARGS + [f"output_dir={straight}"], data=DATA)

    proc = start(tmp_path, ARGS + [f"output_dir={preempted}"])
    wait_for_step(preempted, 1, proc)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    stopped = [e["step"] for e in metrics(preempted)[0]][-1]
    assert 1 <= stopped < 6, "the run stopped at a step boundary before the end"
    assert (preempted / "checkpoints" / f"step-{stopped}" / "state.json").exists(), "the last finished step is saved"
    assert not (preempted / "final").exists()

    run_train(tmp_path, ARGS + [f"output_dir={preempted}", "resume=auto"], data=DATA)
    assert json.loads((preempted / "run.json").read_text())["start_step"] == stopped
    keys = ("step", "loss", "lr", "grad_norm", "trained_tokens")
    assert [{k: e[k] for k in keys} for e in metrics(straight)[0]] == [{k: e[k] for k in keys} for e in metrics(preempted)[0]]
    assert metrics(straight)[1] == metrics(preempted)[1]
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(preempted / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights must be bitwise identical"


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out, pids, marker = tmp_path / "run", tmp_path / "pids", tmp_path / "requeue-marker"
    pids.mkdir()
    proc = start(tmp_path, ARGS + [f"output_dir={out}", "train.global_batch_size=8", "train.max_steps=20"],
                 processes=2, extra_env={"PID_DIR": str(pids), REQUEUE_MARKER_ENV: str(marker)})
    wait_for_step(out, 1, proc)
    os.kill(int((pids / "pid-1").read_text()), signal.SIGUSR1)  # rank 1 only; rank 0 writes the files
    _, stderr = proc.communicate(timeout=120)
    # torchrun reports any failed worker as its own exit 1, so the marker carries the requeue request
    assert proc.returncode == 1, stderr[-3000:]
    # (the first worker to exit 85 is reported; torchrun then stops the other, already past its save)
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in stderr, stderr[-3000:]
    stopped = [e["step"] for e in metrics(out)[0]][-1]
    checkpoint = out / "checkpoints" / f"step-{stopped}"
    assert stopped < 20 and marker.read_text().strip() == str(checkpoint)
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"], "both ranks saved"
