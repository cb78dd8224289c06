"""Acceptance 2: two CPU processes under ``accelerate launch --multi_gpu`` equal one process
at the same global batch: losses, learning rates, gradient norms, eval and final weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_train_support import FAST, metrics, run_train

ARGS = FAST + [
    "tuner.dropout=0",  # dropout streams differ per rank by design
    "train.max_steps=3",
    "train.global_batch_size=8",
    "train.warmup_ratio=0.4",  # 2 warmup steps: the schedule's sizing shows in the logged lr
    "train.lr=1e-3",
    "train.eval_steps=3",
    "train.save_steps=2",
]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    data = {"train": 24, "eval": 7, "max_len": 48}  # 7 eval rows: the ranks get uneven shards
    run_train(tmp_path, ARGS + [f"output_dir={tmp_path / 'one'}"], data=data)
    run_train(tmp_path, ARGS + [f"output_dir={tmp_path / 'two'}"], data=data, processes=2)

    one = json.loads((tmp_path / "one" / "run.json").read_text())
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (one["world_size"], one["accumulation_steps"]) == (1, 4)
    assert (two["world_size"], two["accumulation_steps"]) == (2, 2)  # really two ranks

    train1, eval1 = metrics(tmp_path / "one")
    train2, eval2 = metrics(tmp_path / "two")
    assert [e["step"] for e in train2] == [1, 2, 3], "only rank 0 writes metrics"
    for a, b in zip(train1, train2):
        for key in ("loss", "loss_agent", "loss_general", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["step"], key)
        assert a["trained_tokens"] == b["trained_tokens"]
    assert [e["lr"] for e in train1] == pytest.approx([0.0, 5e-4, 1e-3])  # warmup 2 steps, then cosine
    for key in ("eval/loss", "eval/loss_agent", "eval/loss_general"):
        assert eval2[0][key] == pytest.approx(eval1[0][key], rel=1e-5)

    w1 = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    moved = 0
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6)
        moved += int("lora_B" in name and w1[name].abs().sum() > 0)
    assert moved > 0, "training must have changed the adapters for the comparison to mean anything"
    # one RNG file per rank in the checkpoint; Hydra's own files exist once (rank 0's)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-2").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert (tmp_path / "two" / ".hydra" / "config.yaml").exists()


def test_non_zero_ranks_switch_hydra_output_off(monkeypatch):
    from test_train_support import load_train_module

    module = load_train_module()
    monkeypatch.setenv("RANK", "0")
    assert module.rank_zero_only_hydra(["train.py", "a=1"]) == ["train.py", "a=1"]
    monkeypatch.setenv("RANK", "3")
    assert module.rank_zero_only_hydra(["train.py"]) == ["train.py", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def test_leave_together_drops_accelerates_reference_to_the_model():
    """A prepared model (under DDP, the wrapper that holds the process group) is freed before
    end_training destroys the group, not in interpreter teardown."""
    import weakref

    from accelerate import Accelerator

    from agenttune.training import leave_together

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    ref = weakref.ref(model)
    del model
    assert ref() is not None  # accelerate keeps it until told otherwise
    leave_together(accelerator)
    assert ref() is None
