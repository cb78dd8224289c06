"""Acceptance 4 and 5: a SIGKILLed run resumed with resume=auto equals the uninterrupted
run bit for bit, and a SIGKILL at any point of a checkpoint save never leaves a checkpoint
that resume=auto would pick but cannot load."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import agenttune.training as training
from test_train_support import FAST, compose, metrics, run_train

ARGS = FAST + [
    "tuner.dropout=0.1",  # dropout draws from the RNG, so its state must be restored too
    "train.max_steps=6",
    "train.warmup_ratio=0.2",
    "train.lr=1e-3",
    "train.save_steps=2",
    "train.eval_steps=3",
    "train.save_total_limit=1",
]
DATA = {"train": 20, "eval": 6}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_train(tmp_path, ARGS + [f"output_dir={straight}"], data=DATA)

    killed = run_train(tmp_path, ARGS + [f"output_dir={crashed}"], data=DATA,
                       extra_env={"KILL_AFTER_CHECKPOINT": "4"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [e["step"] for e in metrics(crashed)[0]] == [1, 2, 3, 4, 5], "killed after logging step 5"
    assert not (crashed / "final").exists()

    run_train(tmp_path, ARGS + [f"output_dir={crashed}", "resume=auto"], data=DATA)
    info = json.loads((crashed / "run.json").read_text())
    assert info["start_step"] == 4 and info["resumed_from"].endswith("step-4")

    train_a, eval_a = metrics(straight)
    train_b, eval_b = metrics(crashed)
    assert [e["step"] for e in train_b] == [1, 2, 3, 4, 5, 6], "step 5 of the killed run was dropped and redone"
    keys = ("loss", "loss_agent", "loss_general", "lr", "grad_norm", "trained_tokens")
    assert [{k: e[k] for k in keys} for e in train_a] == [{k: e[k] for k in keys} for e in train_b]
    assert eval_a == eval_b
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(crashed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights must be bitwise identical"
    # keep 1 newest + the best (eval at 3 and 6); step-4 was rotated away
    assert {p.name for p in (crashed / "checkpoints").iterdir()} <= {"step-6", "step-3"}


# ----------------------------------------------------------------------------- kill during save


class Setup:
    """A tiny LoRA model, optimizer and scheduler that have taken one step, in this process."""

    def __init__(self, output_dir: Path):
        from accelerate import Accelerator

        from agenttune.modeling import build_model

        cfg = compose(FAST + ["tuner.dropout=0", "train.warmup_ratio=0"])
        torch.manual_seed(0)
        self.accelerator = Accelerator(cpu=True, gradient_accumulation_steps=1)
        model = build_model(cfg.model, cfg.tuner, cfg.hardware)
        optimizer = training.build_optimizer(model, cfg.train, None)
        scheduler = training.build_scheduler(optimizer, cfg.train, 10, 1)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.output_dir = output_dir
        self.cfg = cfg

    def step(self):
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def save(self, step: int):
        state = training.TrainState(step=step)
        return training.save_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, state,
                                        self.output_dir, "config: here\n", keep=1)

    def set_weights(self, weights: dict):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def weights(self):
        return {k: v.clone() for k, v in training.trainable_state(self.model).items()}


WRITES = [(torch, "save"), (training, "save_file"), (Path, "write_text"), (os, "rename"), (shutil, "rmtree")]


def kill_at(n: int, truncate: bool):
    """Patch every filesystem write the save makes: the n-th one SIGKILLs the process, either
    before it happens or (truncate) after writing a file and cutting it in half, as a crash
    can leave a file the kernel had only partly flushed."""
    calls = {"n": 0}

    def wrap(owner, name):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n and not truncate:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if calls["n"] == n and truncate:
                target = Path(args[1] if name in ("save", "save_file") else args[0])
                if target.is_file():
                    with open(target, "r+b") as f:
                        f.truncate(max(1, target.stat().st_size // 2))
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, patched)

    for owner, name in WRITES:
        wrap(owner, name)
    return calls


def count_writes(setup: Setup, step: int) -> int:
    pid = os.fork()
    if pid == 0:  # child: count, save, report through the exit code
        calls = kill_at(0, truncate=False)
        setup.save(step)
        os._exit(calls["n"])
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_sigkill_during_save_never_leaves_a_bad_checkpoint(tmp_path):
    setup = Setup(tmp_path / "run")
    setup.save(1)
    first = setup.weights()
    setup.step()
    second = setup.weights()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    pristine = tmp_path / "pristine"
    shutil.copytree(setup.output_dir, pristine)

    writes = count_writes(setup, 2)
    assert writes >= 8  # rmtree tmp, rng, weights, optimizer, scheduler, config, state, rename, rotation
    seen = set()
    for n in range(1, writes + 1):
        for truncate in (False, True):
            shutil.rmtree(setup.output_dir)
            shutil.copytree(pristine, setup.output_dir)
            setup.set_weights(second)  # the previous round's load put older weights in
            pid = os.fork()
            if pid == 0:
                kill_at(n, truncate)
                setup.save(2)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (n, truncate)

            chosen = training.find_checkpoint(setup.output_dir, "auto")
            assert chosen is not None, f"write {n}: no loadable checkpoint left"
            state = training.load_checkpoint(chosen, setup.accelerator, setup.model, setup.optimizer, setup.scheduler)
            expected = {1: first, 2: second}[state.step]
            assert all(torch.equal(v, expected[k]) for k, v in setup.weights().items()), (n, truncate, chosen)
            seen.add(chosen.name)
    assert seen == {"step-1", "step-2"}, "kills both before and after the rename were exercised"


def test_a_damaged_newest_checkpoint_is_skipped(tmp_path):
    setup = Setup(tmp_path / "run")
    setup.save(1)
    setup.step()
    newest = training.save_checkpoint(setup.accelerator, setup.model, setup.optimizer, setup.scheduler,
                                      training.TrainState(step=2), setup.output_dir, "", keep=5)
    assert training.find_checkpoint(setup.output_dir, "auto") == newest
    with open(newest / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    assert not training.is_loadable(newest)
    assert training.find_checkpoint(setup.output_dir, "auto").name == "step-1"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        training.find_checkpoint(setup.output_dir, str(newest))
    with pytest.raises(ValueError, match="resume=auto"):
        training.find_checkpoint(setup.output_dir, None)  # a fresh run refuses to mix with old checkpoints


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    setup = Setup(tmp_path / "run")
    for step in (1, 2, 3, 4, 5):
        state = training.TrainState(step=step, best_step=2)
        training.save_checkpoint(setup.accelerator, setup.model, setup.optimizer, setup.scheduler, state,
                                 setup.output_dir, "", keep=2)
    assert [p.name for p in training.checkpoint_dirs(setup.output_dir)] == ["step-5", "step-4", "step-2"]
    assert not [p for p in (setup.output_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_sharded_checkpoint_is_refused_by_an_unsharded_run(tmp_path):
    """DeepSpeed/FSDP checkpoints keep their shards in accelerate/ (accelerator.save_state);
    resuming one under DDP (or the reverse) must name the mismatch, not load half a state."""
    setup = Setup(tmp_path / "run")
    checkpoint = setup.save(1)
    (checkpoint / training.ACCELERATE_STATE).mkdir()
    with pytest.raises(ValueError, match="written with sharded state .* resume with the hardware= that wrote it"):
        training.load_checkpoint(checkpoint, setup.accelerator, setup.model, setup.optimizer, setup.scheduler)
