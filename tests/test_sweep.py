"""conf/sweep/: the local sweep really runs its 4 grid points, each in its own directory with its
own metrics; the Slurm sweep composes into one multi-task Slurm job per grid point."""

from __future__ import annotations

import json
import os

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from agenttune.config import on_rank_zero  # also registers train_schema
from test_train_support import CONF_DIR, FAST, metrics, run_train

GRID = {f"r{r}-lr{lr}": (r, lr) for r in (8, 16) for lr in (5e-5, 1e-4)}


@pytest.mark.slow
def test_local_sweep_runs_four_jobs_in_their_own_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(tmp_path, ["-m", "sweep=local", f"hydra.sweep.dir={sweep}", *FAST, "train.max_steps=2",
                                "train.eval_steps=2", "train.save_steps=2"], data={"train": 8, "eval": 2})
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == set(GRID), proc.stdout[-2000:]
    peaks = []
    for name, (r, lr) in GRID.items():
        job = sweep / name
        run = json.loads((job / "run.json").read_text())
        train_entries, eval_entries = metrics(job)
        assert [e["step"] for e in train_entries] == [1, 2] and len(eval_entries) == 1, "one writer per job"
        assert (job / "checkpoints" / "step-2").is_dir() and (job / "final" / "adapter_config.json").is_file()
        adapter = json.loads((job / "final" / "adapter_config.json").read_text())
        assert adapter["r"] == r and run["start_step"] == 0
        resolved = (job / "checkpoints" / "step-2" / "config.yaml").read_text()
        assert f"output_dir: {job}\n" in resolved, "the job's output_dir is Hydra's job dir"
        assert f"tuner.r={r}" in (job / ".hydra" / "overrides.yaml").read_text()
        peaks.append(max(e["lr"] for e in train_entries) / lr)
    assert peaks[0] > 0 and peaks == pytest.approx([peaks[0]] * 4), "each job ran its own train.lr on one schedule shape"


def test_slurm_sweep_asks_for_one_task_per_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for hardware, gpus in (("8gpu", 8), ("zero3", 8), ("multinode", 16)):
            cfg = hydra_compose("train", overrides=["sweep=slurm", f"hardware={hardware}"], return_hydra_config=True)
            launcher = cfg.hydra.launcher
            assert launcher._target_.endswith("SlurmLauncher")
            assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (gpus, gpus, 1)
            assert dict(cfg.hydra.sweeper.params) == {"tuner.r": "8,16", "train.lr": "5e-5,1e-4"}
            assert cfg.resume == "auto" and cfg.hydra.job_logging.root.handlers == ["console"]
            HydraConfig.instance().set_config(cfg)
            try:  # what each task resolves: the job's own sweep subdir
                assert cfg.output_dir == f"{cfg.hydra.sweep.dir}/r8-lr5e-05"
            finally:
                HydraConfig.instance().cfg = None


def test_on_rank_zero_keeps_hydra_files_to_the_first_task(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert on_rank_zero(".hydra") is None
    monkeypatch.setenv("RANK", "0")  # torchrun's rank wins over the srun task id
    assert on_rank_zero(".hydra") == ".hydra"


def test_submitit_tasks_get_the_torch_distributed_env(monkeypatch):
    """sweep=slurm: task 3 of a 1-node, 8-task submitit job becomes rank 3 of 8, all GPUs visible."""
    pytest.importorskip("submitit", reason="pip install -e .[slurm]")
    from agenttune.training import export_submitit_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(key, "")  # records the original state, so teardown also undoes export's writes
        monkeypatch.delenv(key)
    export_submitit_env()
    assert "RANK" not in os.environ, "a no-op outside submitit"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[001]",
                       "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "3",
                       "SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(key, value)
    export_submitit_env()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == ["3", "8", "3", "gpu001"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7", "Accelerate picks cuda:LOCAL_RANK itself"
