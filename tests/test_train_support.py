"""Shared helpers of the training tests, plus tests of the helpers themselves.

The loop is tested against synthetic tokenized datasets with exactly the columns that
``agenttune.data.pipeline.build_datasets`` produces, so these tests pin the loop's
behaviour independently of the readers and templates. ``LAUNCHER`` runs the real
``train.py`` (also under ``accelerate launch``) with that synthetic data swapped in.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
CONF_DIR = ROOT / "conf"
TESTS_DIR = Path(__file__).resolve().parent
COLUMNS = ("input_ids", "labels", "weights", "source", "length", "group")

# Settings that keep a tiny-model run to seconds; eval and save are set per test.
FAST = [
    "model=tiny",
    "hardware=cpu",
    "wandb.mode=disabled",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
]


def env() -> dict[str, str]:
    """Subprocess environment: offline, no W&B, a shared model cache, CPU only."""
    e = dict(os.environ)
    e.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        AGENTTUNE_CACHE=os.environ.get("AGENTTUNE_CACHE", "/tmp/atcache"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    return e


# ----------------------------------------------------------------------------- synthetic data


def synthetic_rows(n: int, seed: int, vocab: int, min_len: int = 6, max_len: int = 40) -> dict[str, list]:
    """Variable-length rows, agent and general mixed, prompt tokens untrained, weights 1 or 2.

    Each row: a prompt (label -100, weight 0), then a response whose tokens are trained with
    weight 1.0, except every fifth one with 2.0 (like ms-swift's loss_scale=react on actions).
    """
    rng = random.Random(seed)
    rows = {c: [] for c in COLUMNS}
    for i in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        labels = [-100] * prompt + ids[prompt:]
        weights = [0.0] * prompt + [2.0 if j % 5 == 0 else 1.0 for j in range(length - prompt)]
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["weights"].append(weights)
        rows["source"].append(i % 3 % 2)  # agent, general, agent, agent, general, agent, ...: a 2:1 mix
        rows["length"].append(length)
        rows["group"].append(("agent", "general")[i % 3 % 2])  # no balance_by: the group is the source
    return rows


def synthetic_dataset(n: int, seed: int, vocab: int = 700, **kw) -> datasets.Dataset:
    return datasets.Dataset.from_dict(synthetic_rows(n, seed, vocab, **kw))


@dataclass
class FakeBundle:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: dict


def fake_build_datasets(data, template: str, tokenizer):
    """Stands in for agenttune.data.pipeline.build_datasets; sizes from $AGENTTUNE_TEST_DATA."""
    spec = json.loads(os.environ.get("AGENTTUNE_TEST_DATA", "{}"))
    vocab = min(len(tokenizer), 2000)
    n_train, n_eval = spec.get("train", 24), spec.get("eval", 6)
    max_len = spec.get("max_len", 40)
    rows = synthetic_rows(n_train, seed=spec.get("seed", 0), vocab=vocab, max_len=max_len)
    for i in spec.get("poison_rows", []):  # an infinite token weight makes that step's loss NaN
        rows["weights"][i] = [w * float("inf") if w else 0.0 for w in rows["weights"][i]]
    train = datasets.Dataset.from_dict(rows)
    evaluation = synthetic_dataset(n_eval, seed=spec.get("seed", 0) + 1, vocab=vocab, max_len=max_len) if n_eval else None
    return FakeBundle(train, evaluation, {"synthetic": True, "train": n_train, "eval": n_eval})


def install_fake_pipeline() -> None:
    module = types.ModuleType("agenttune.data.pipeline")
    module.build_datasets = fake_build_datasets
    sys.modules["agenttune.data.pipeline"] = module


def load_train_module():
    """Import train.py as a module, whether or not the real data pipeline has landed.
    Tests then replace its ``build_datasets`` with ``fake_build_datasets``."""
    saved = sys.modules.get("agenttune.data.pipeline")
    if importlib.util.find_spec("agenttune.data.pipeline") is None:
        install_fake_pipeline()
    try:
        spec = importlib.util.spec_from_file_location("agenttune_train_script", TRAIN_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("agenttune.data.pipeline", None)
    return module


def compose(overrides: list[str]):
    """The typed Config that ``python train.py <overrides>`` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from agenttune.config import to_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose("train", overrides=overrides))


def train_in_process(overrides: list[str], monkeypatch, data: dict | None = None, replace: dict | None = None):
    """Run train.train() here, on synthetic data (and with ``replace``'s functions swapped
    into train.py). Returns (state, output_dir)."""
    module = load_train_module()
    monkeypatch.setattr(module, "build_datasets", fake_build_datasets)
    for name, value in (replace or {}).items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setenv("AGENTTUNE_TEST_DATA", json.dumps(data or {}))
    cfg = compose(FAST + overrides)
    return module.train(cfg), Path(cfg.output_dir)


# ----------------------------------------------------------------------------- subprocess runs

LAUNCHER = f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(TESTS_DIR)!r})
import test_train_support as support
support.install_fake_pipeline()
if os.environ.get("KILL_AFTER_CHECKPOINT"):
    support.install_kill_after_checkpoint(int(os.environ["KILL_AFTER_CHECKPOINT"]))
if os.environ.get("STEP_DELAY"):
    support.install_step_delay(float(os.environ["STEP_DELAY"]))
if os.environ.get("FILE_SIZE_LIMIT"):  # "RANK:BYTES" or "*:BYTES": larger writes fail as on a full disk
    support.limit_file_size(os.environ["FILE_SIZE_LIMIT"])
if os.environ.get("PID_DIR"):  # lets a test signal one chosen rank
    open(os.path.join(os.environ["PID_DIR"], "pid-" + os.environ.get("RANK", "0")), "w").write(str(os.getpid()))
sys.argv = [{str(TRAIN_PY)!r}] + sys.argv[1:]
runpy.run_path({str(TRAIN_PY)!r}, run_name="__main__")
"""


def install_kill_after_checkpoint(step: int) -> None:
    """SIGKILL this process right after it logs the first step past checkpoint ``step``: the
    metrics file then holds a step the checkpoint does not, as after a real crash."""
    import agenttune.training as training

    save, log = training.save_checkpoint, training.log_metrics
    saved = {"done": False}

    def save_then_arm(*args, **kwargs):
        path = save(*args, **kwargs)
        saved["done"] = saved["done"] or path.name == f"step-{step}"
        return path

    def log_then_kill(path, entry, run=None):
        log(path, entry, run)
        if saved["done"] and entry["step"] > step:
            os.kill(os.getpid(), signal.SIGKILL)

    training.save_checkpoint, training.log_metrics = save_then_arm, log_then_kill


def limit_file_size(spec: str) -> None:
    """Make every write past ``BYTES`` fail with EFBIG in this process (on rank ``RANK``, or all
    ranks for ``*``): the kernel refuses the write itself, as it refuses one on a full disk."""
    import resource

    rank, limit = spec.split(":")
    if rank in ("*", os.environ.get("RANK", "0")):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))


def install_step_delay(seconds: float) -> None:
    """Sleep after each logged step, so a test has time to signal a run between steps."""
    import time

    import agenttune.training as training

    log = training.log_metrics

    def log_then_sleep(path, entry, run=None):
        log(path, entry, run)
        time.sleep(seconds)

    training.log_metrics = log_then_sleep


def launch_command(tmp_path: Path, processes: int = 1) -> list[str]:
    """The command line that runs train.py on synthetic data, under accelerate launch if processes > 1."""
    launcher = tmp_path / "launch_train.py"
    launcher.write_text(LAUNCHER)
    if processes == 1:
        return [sys.executable, str(launcher)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(29500 + os.getpid() % 1000), str(launcher)]


def train_env(processes: int = 1, data: dict | None = None, extra_env: dict | None = None) -> dict[str, str]:
    e = env()
    e["AGENTTUNE_TEST_DATA"] = json.dumps(data or {})
    if processes > 1:
        e["ACCELERATE_USE_CPU"] = "1"
    e.update(extra_env or {})
    return e


def run_train(tmp_path: Path, args: list[str], *, processes: int = 1, data: dict | None = None,
              extra_env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py in a fresh process (or ``processes`` under accelerate launch) on synthetic data."""
    command = launch_command(tmp_path, processes)
    e = train_env(processes, data, extra_env)
    proc = subprocess.run(command + args, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(output_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train entries, eval entries) of metrics.jsonl."""
    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in entries if "loss" in e], [e for e in entries if "eval/loss" in e]


# ----------------------------------------------------------------------------- tests of the helpers


def test_synthetic_rows_follow_the_pipeline_contract():
    rows = synthetic_rows(30, seed=3, vocab=100)
    assert set(rows) == set(COLUMNS)
    assert {0, 1} == set(rows["source"])
    assert len(set(rows["length"])) > 5, "lengths must vary for the accumulation tests to mean anything"
    for ids, labels, weights, length in zip(rows["input_ids"], rows["labels"], rows["weights"], rows["length"]):
        assert len(ids) == len(labels) == len(weights) == length
        assert all((lab == -100) == (w == 0.0) for lab, w in zip(labels, weights))
        assert any(w > 0 for w in weights[1:]), "every row must train at least one shifted token"


def test_collate_shifts_supervision_and_pads():
    from agenttune.training import collate

    rows = {"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [-100, 9]],
            "weights": [[0.0, 1.0, 2.0], [0.0, 1.0]], "source": [0, 1]}
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # position t predicts input t+1
    assert batch["targets"].tolist() == [[6, 7, -100], [9, -100, -100]]
    assert batch["target_weights"].tolist() == [[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]]
    assert batch["source"].tolist() == [0, 1]


def test_collate_rejects_weight_on_an_untrained_token():
    from agenttune.training import collate

    rows = {"input_ids": [[5, 6, 7]], "labels": [[-100, -100, 7]], "weights": [[0.0, 1.0, 1.0]], "source": [0]}
    with pytest.raises(ValueError, match="label -100 has a non-zero weight"):
        collate(rows, pad_id=0)


def test_step_rows_cover_each_epoch_once_and_ignore_batch_layout():
    from agenttune.training import sample_order, step_rows

    n, batch = 10, 4
    stream = [r for step in range(5) for r in step_rows(n, step, batch, seed=1)]  # 20 rows = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:], "each epoch is reshuffled"
    assert step_rows(n, 3, batch, seed=1) == step_rows(n, 3, batch, seed=1)
    assert step_rows(n, 0, batch, seed=1) != step_rows(n, 0, batch, seed=2)
    # a step longer than an epoch: 3 steps of 8 over 3 rows are epochs 0-7 back to back
    assert sum((step_rows(3, step, 8, seed=1) for step in range(3)), []) == \
        [r for epoch in range(8) for r in sample_order(3, epoch, 1)]


def largest_drift(order, groups, level):
    """Over every prefix of ``order``, the largest gap between a group's count (its path cut to
    ``level`` parts) and its share of the prefix."""
    labels = ["/".join(groups[row].split("/")[:level]) for row in order]
    drift = 0.0
    for label in set(labels):
        share, count = labels.count(label) / len(labels), 0
        for k, other in enumerate(labels, 1):
            count += other == label
            drift = max(drift, abs(count - k * share))
    return drift


def test_balanced_sampler_spreads_sources_then_tasks_then_languages_evenly():
    from agenttune.training import step_rows

    names = ["agent/a/en"] * 18 + ["agent/a/zh"] * 12 + ["agent/b/en"] * 10 + ["agent/b/zh"] * 10 + \
            ["agent/c/en"] * 10 + ["general"] * 60
    for seed in range(10):
        groups = tuple(random.Random(seed).sample(names, len(names)))  # the rows of a group are scattered
        n = len(groups)
        stream = [r for step in range(2 * n // 8) for r in step_rows(n, step, 8, seed, groups)]  # 2 epochs
        shuffled = [r for step in range(n // 8) for r in step_rows(n, step, 8, seed)]
        for epoch in (stream[:n], stream[n:]):
            assert sorted(epoch) == list(range(n)), "each epoch visits every row once"
            for step in range(0, n, 8):  # sources 1:1, so every step holds exactly 4 of each
                assert sum(groups[r] == "general" for r in epoch[step : step + 8]) == 4
            agent = [r for r in epoch if groups[r] != "general"]
            assert largest_drift(agent, groups, 2) <= 1.0  # tasks a:b:c = 3:2:1 over every stretch
            assert largest_drift(agent, groups, 3) <= 1.5  # and each task's languages
        assert stream[:n] != stream[n:], "each epoch is ordered afresh"
        assert largest_drift(shuffled, groups, 1) >= 2.0  # what a plain shuffle does to the sources
    groups = tuple(names)
    assert step_rows(len(names), 2, 8, 0, groups) == step_rows(len(names), 2, 8, 0, groups)
    assert step_rows(len(names), 2, 8, 0, groups) != step_rows(len(names), 2, 8, 1, groups)
    with pytest.raises(ValueError, match="3 sampling groups for 4 rows"):
        step_rows(4, 0, 2, 0, ("agent", "agent", "general"))


def test_sampling_groups_reads_the_group_column_only_for_the_balanced_sampler():
    from agenttune.training import sampling_groups

    table = datasets.Dataset.from_dict({"length": [3, 4], "group": ["agent/x", "general"]})
    assert sampling_groups(table, "shuffle") is None
    assert sampling_groups(table, "balanced") == ("agent/x", "general")
    with pytest.raises(ValueError, match="group column"):
        sampling_groups(table.remove_columns("group"), "balanced")
