"""A save that cannot be written (full disk, quota, file size limit) stops the run with one
message naming what failed, the free space and the last good checkpoint; it leaves no partial
save behind, and under DDP every rank stops instead of waiting in a barrier.

The writes fail for real: the launcher sets RLIMIT_FSIZE, so the kernel refuses any write past
the limit (EFBIG), the way it refuses one on a full disk (ENOSPC). The tiny model's files: rng
14 KB, trainable.safetensors / adapter_model.safetensors 69 KB, optimizer.pt 154 KB."""

from __future__ import annotations

import json
import logging
import socket
import subprocess

import pytest

from test_train_support import FAST, compose, launch_command, run_train, train_env, train_in_process

CANNOT_WRITE_WEIGHTS = {"FILE_SIZE_LIMIT": "*:50000"}  # everything small still gets written


def checkpoint_names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_a_checkpoint_that_does_not_fit_stops_the_run_and_keeps_the_last_one(tmp_path):
    from agenttune.training import is_loadable

    out = tmp_path / "run"
    args = FAST + ["train.save_steps=1", "train.eval_steps=100", f"output_dir={out}"]
    run_train(tmp_path, args + ["train.max_steps=1"], data={"eval": 0})
    proc = run_train(tmp_path, args + ["train.max_steps=3", "resume=auto"], data={"eval": 0},
                     extra_env=CANNOT_WRITE_WEIGHTS, check=False)

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("train.py: error:"):]
    assert proc.stderr[proc.stderr.index(message) - 1] in "\r\n", "the message starts a line, not the bar's tail"
    assert f"could not write checkpoint {out / 'checkpoints' / 'step-2'}" in message
    assert "File too large" in message and f"free on the disk of {out}." in message
    assert f"The last complete checkpoint is {out / 'checkpoints' / 'step-1'} (resume=auto" in message
    assert checkpoint_names(out) == ["step-1"], "the partial step-2 must be removed"
    assert is_loadable(out / "checkpoints" / "step-1")

    # with room again, resume=auto goes on from step 1, as the message says
    run_train(tmp_path, args + ["train.max_steps=3", "resume=auto"], data={"eval": 0})
    assert json.loads((out / "run.json").read_text())["start_step"] == 1
    assert checkpoint_names(out) == ["step-2", "step-3"] and (out / "final" / "adapter_model.safetensors").exists()


def test_a_final_model_that_does_not_fit_stops_the_run_with_one_message(tmp_path):
    out = tmp_path / "run"
    proc = run_train(tmp_path, FAST + ["train.max_steps=1", "train.save_steps=100", f"output_dir={out}"],
                     data={"eval": 0}, extra_env=CANNOT_WRITE_WEIGHTS, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"train.py: error: could not write the final model {out / 'final'}: " in proc.stderr
    assert "File too large" in proc.stderr
    assert not [p.name for p in out.iterdir() if "final" in p.name], "neither final/ nor its temp dir may remain"


@pytest.mark.slow
def test_when_one_rank_cannot_write_every_rank_stops(tmp_path):
    """Two ranks started the way srun (and sweep=slurm's submitit) starts them: each process on
    its own, with no torchrun agent to kill the others when one fails. Rank 1 fails on its RNG
    file while rank 0 writes everything else. Without the agreement rank 0 goes on to the next
    barrier, where gloo fails with a traceback once rank 1 has gone (NCCL would wait there until
    its timeout, 10 minutes or more); the test gives up after 4 minutes."""
    out = tmp_path / "run"
    command = launch_command(tmp_path) + FAST + ["train.max_steps=2", "train.save_steps=1", "train.eval_steps=100",
                                                 f"output_dir={out}"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=train_env(2, {"eval": 0}, {
                                  "FILE_SIZE_LIMIT": "1:8000", "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
             for r in range(2)]
    try:
        errors = [rank.communicate(timeout=240)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    # Each rank exits 1 by itself. Once in a few dozen runs a rank's gloo threads still abort the
    # interpreter's teardown after its message (-6, "terminate called without an active exception";
    # 1 run in 6 before train.py destroyed the process group on errors, 1 in 44 after).
    assert all(rank.returncode in (1, -6) for rank in ranks), [rank.returncode for rank in ranks]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert not any("Traceback" in e for e in errors)
    step1 = out / "checkpoints" / "step-1"
    assert f"train.py: error: writing checkpoint {step1} failed on another rank" in errors[0]
    assert f"train.py: error: could not write checkpoint {step1}: a write by torch.save failed" in errors[1]
    assert checkpoint_names(out) == []


def test_the_free_space_check_sizes_checkpoints_and_final(tmp_path, monkeypatch):
    import agenttune.training as training
    from agenttune.modeling import build_model

    lora = compose(FAST)
    model = build_model(lora.model, lora.tuner, lora.hardware)
    adapter = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32 LoRA weights
    checkpoint, final, most = training.save_footprint(model, keep=2)
    assert (checkpoint, final, most) == (3 * adapter, adapter, 4 * 3 * adapter + adapter)

    full = compose(FAST + ["tuner=full", "model.dtype=bfloat16"])
    model = build_model(full.model, full.tuner, full.hardware)
    n = sum(p.numel() for p in model.parameters())
    _, final, _ = training.save_footprint(model, keep=2)
    assert final == 2 * n  # final/ holds every weight in bf16, whatever the trained copies' dtype

    assert training.check_free_space(model, tmp_path, keep=2) is None  # this disk holds a tiny model
    monkeypatch.setattr(training, "free_bytes", lambda path: 1000)
    warning = training.check_free_space(model, tmp_path / "new" / "run", keep=3)
    assert warning.startswith(f"{tmp_path / 'new' / 'run'} has 0.0 MiB free")
    assert "up to 5 checkpoints" in warning and "train.save_total_limit=3" in warning


def test_train_warns_before_the_first_step_when_the_disk_is_short(tmp_path, monkeypatch, caplog):
    import agenttune.training as training

    monkeypatch.setattr(training, "free_bytes", lambda path: 10_000)
    warned_by_step = []

    def log_metrics(path, entry, run=None):
        warned_by_step.append((entry["step"], sum("this run writes about" in r.getMessage() for r in caplog.records)))

    with caplog.at_level(logging.WARNING):
        state, out = train_in_process(["train.max_steps=1", "train.eval_steps=100", f"output_dir={tmp_path / 'run'}"],
                                      monkeypatch, data={"eval": 0}, replace={"log_metrics": log_metrics})
    assert state.step == 1 and (out / "final" / "adapter_model.safetensors").exists()  # a warning, not a stop
    assert warned_by_step == [(1, 1)], "the warning comes once, before step 1 is logged"
    warning = next(r.getMessage() for r in caplog.records if "this run writes about" in r.getMessage())
    assert f"{out} has 0.0 MiB free, and this run writes about " in warning  # accelerate prefixes "[RANK 0] "


def test_free_bytes_looks_at_the_nearest_existing_directory(tmp_path):
    from agenttune.storage import free_bytes

    assert free_bytes(tmp_path / "not" / "yet") == pytest.approx(free_bytes(tmp_path), rel=0.01)


def test_write_errors_are_told_apart_from_bugs():
    from safetensors import SafetensorError

    from agenttune.storage import is_write_error

    assert is_write_error(OSError(28, "No space left on device"))
    assert is_write_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert is_write_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    assert not is_write_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_write_error(TypeError("cannot pickle 'generator' object"))
