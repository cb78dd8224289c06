"""Acceptance 6: model=tiny trains end to end with every tuner that runs on CPU, the final
directory loads with stock APIs in a fresh process, and qlora says clearly why it cannot
run here. Also: the default command on the real demo data, the non-finite guard, and the
optimizer's parameter groups."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import agenttune.training as training
from agenttune.config import ConfigError, TrainConfig
from agenttune.modeling import build_model
from test_train_support import FAST, ROOT, TRAIN_PY, compose, env, launch_command, metrics, train_env, train_in_process

RUN = ["train.max_steps=2", "train.eval_steps=1", "train.save_steps=2", "train.lr=1e-3", "train.warmup_ratio=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model=tiny trained for 2 steps with each CPU tuner: {tuner: output_dir}."""
    monkeypatch = pytest.MonkeyPatch()
    out = {}
    try:
        for tuner in ("lora", "dora", "full"):
            path = tmp_path_factory.mktemp(tuner)
            state, _ = train_in_process([f"tuner={tuner}", f"output_dir={path}", *RUN], monkeypatch)
            assert state.step == 2
            out[tuner] = path
    finally:
        monkeypatch.undo()
    return out


@pytest.mark.parametrize("tuner", ["lora", "dora", "full"])
def test_every_cpu_tuner_trains_end_to_end(trained, tuner):
    out = trained[tuner]
    train, evals = metrics(out)
    assert [e["step"] for e in train] == [1, 2] and [e["step"] for e in evals] == [1, 2]
    for entry in train:
        assert {"loss", "loss_agent", "loss_general", "lr", "grad_norm", "tokens_per_s", "trained_tokens"} <= entry.keys()
        assert entry["loss_agent"] is not None and entry["loss_general"] is not None
    assert all(e["eval/loss_agent"] is not None and e["eval/loss_general"] is not None for e in evals)
    trained_weights = load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")
    if tuner == "full":
        from agenttune.tiny import tiny_model_dir

        base = load_file(tiny_model_dir() / "model.safetensors")
        moved = [k for k in base if not torch.equal(base[k], trained_weights[k])]
    else:  # LoRA B starts at zero
        moved = [k for k, v in trained_weights.items() if "lora_B" in k and v.abs().sum() > 0]
    assert moved, "two steps at lr 1e-3 must change the weights"
    assert (out / "loss.png").stat().st_size > 1000
    checkpoint = out / "checkpoints" / "step-2"
    assert training.is_loadable(checkpoint) and "config.yaml" in {p.name for p in checkpoint.iterdir()}
    final = {p.name for p in (out / "final").iterdir()}
    weights = "model.safetensors" if tuner == "full" else "adapter_model.safetensors"
    assert {weights, "tokenizer.json", "tokenizer_config.json"} <= final
    info = json.loads((out / "run.json").read_text())
    if tuner == "full":
        assert info["trainable_params"] == info["total_params"]
    else:
        assert 0 < info["trainable_params"] < info["total_params"] / 2


LOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from agenttune.tiny import tiny_model_dir
ids = torch.tensor([[5, 17, 33, 2, 99, 41, 7]])
out = {}
for tuner, path in json.loads(sys.argv[1]).items():
    if tuner == "full":
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir()), path)
    model.eval()
    with torch.no_grad():
        out[tuner] = {"logits": model(input_ids=ids).logits[0, -1, :20].tolist(),
                      "template": AutoTokenizer.from_pretrained(path).chat_template}
print(json.dumps(out))
"""


def test_final_dirs_load_with_stock_apis_in_a_fresh_process(trained):
    paths = {tuner: str(out / "final") for tuner, out in trained.items()}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(paths)], env=env(),
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    from agenttune.data.templates import get_template

    ids = torch.tensor([[5, 17, 33, 2, 99, 41, 7]])
    for tuner, out in trained.items():
        # the trained weights, rebuilt here from the last checkpoint
        cfg = compose(FAST + [f"tuner={tuner}"])
        model = build_model(cfg.model, cfg.tuner, cfg.hardware).eval()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(out / "checkpoints" / "step-2" / "trainable.safetensors").items():
                params[name].copy_(value)
            want = model(input_ids=ids).logits[0, -1, :20]
        torch.testing.assert_close(torch.tensor(loaded[tuner]["logits"]), want, rtol=1e-5, atol=1e-5)
        assert loaded[tuner]["template"] == get_template("qwen").chat_template


def test_qlora_on_cpu_fails_clearly(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="tuner=qlora needs a CUDA GPU.*Use tuner=lora on CPU"):
        train_in_process(["tuner=qlora", f"output_dir={tmp_path}", "train.max_steps=1"], monkeypatch)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_the_loop_trains_the_rows_of_train_sampler(sampler, monkeypatch, tmp_path):
    """24 synthetic rows, agent:general = 2:1, in steps of 3 rows: balanced gives every step 2 + 1."""
    seen = []  # per step: (agent rows, general rows)

    def spy(*args, **kwargs):
        batches = training.micro_batches(*args, **kwargs)
        sources = torch.cat([b["source"] for b in batches]).tolist()
        seen.append((sources.count(training.AGENT), len(sources) - sources.count(training.AGENT)))
        return batches

    args = [f"output_dir={tmp_path}", "train.max_steps=8", "train.micro_batch_size=1", "train.global_batch_size=3",
            "train.eval_steps=8", "train.save_steps=8", f"train.sampler={sampler}"]
    train_in_process(args, monkeypatch, data={"train": 24, "eval": 0}, replace={"micro_batches": spy})
    assert len(seen) == 8 and sum(a for a, _ in seen) == 16  # one epoch: every row once
    if sampler == "balanced":
        assert seen == [(2, 1)] * 8
    else:  # the seed's shuffle draws steps off the mix
        assert (2, 1) in seen and set(seen) != {(2, 1)}


# ----------------------------------------------------------------------------- non-finite guard


def poisoned_second_step(n: int = 12, global_batch: int = 4, seed: int = 42) -> list[int]:
    """Rows that are in the second step's batch but not the first's."""
    first = set(training.step_rows(n, 0, global_batch, seed))
    return [r for r in training.step_rows(n, 1, global_batch, seed) if r not in first][:1]


def test_nonfinite_loss_stops_before_the_update(monkeypatch, tmp_path):
    data = {"train": 12, "eval": 0, "poison_rows": poisoned_second_step()}
    with pytest.raises(FloatingPointError, match="step 2: non-finite loss=nan.*train.on_nonfinite=skip"):
        train_in_process([f"output_dir={tmp_path}", "train.max_steps=3", "train.save_steps=1"], monkeypatch, data)
    assert [p.name for p in training.checkpoint_dirs(tmp_path)] == ["step-1"]
    assert training.is_loadable(tmp_path / "checkpoints" / "step-1")
    assert not (tmp_path / "final").exists()


def test_nonfinite_step_is_skipped_when_configured(monkeypatch, tmp_path):
    data = {"train": 12, "eval": 0, "poison_rows": poisoned_second_step()}
    state, _ = train_in_process([f"output_dir={tmp_path}", "train.max_steps=3", "train.save_steps=1",
                                 "train.save_total_limit=3", "train.on_nonfinite=skip", "train.lr=1e-3",
                                 "train.warmup_ratio=0"], monkeypatch, data)
    assert state.step == 3 and state.skipped_steps == 1
    train, _ = metrics(tmp_path)
    assert [e["skipped_steps"] for e in train] == [0, 1, 1]
    step = {n: load_file(tmp_path / "checkpoints" / f"step-{n}" / "trainable.safetensors") for n in (1, 2, 3)}
    assert all(torch.equal(step[1][k], step[2][k]) for k in step[1]), "the skipped update changed nothing"
    assert any(not torch.equal(step[2][k], step[3][k]) for k in step[2]), "training went on after it"
    assert all(torch.isfinite(v).all() for v in step[3].values())


# ----------------------------------------------------------------------------- optimizer


def test_param_groups_decay_matrices_only_and_apply_loraplus():
    cfg = compose(FAST + ["tuner=full"])
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    groups = training.param_groups(model, TrainConfig(weight_decay=0.1), None)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        is_bias_or_norm = name.endswith(".bias") or "norm" in name
        assert (id(p) in decayed) != is_bias_or_norm, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    cfg = compose(FAST + ["tuner=lora", "tuner.loraplus_lr_ratio=16"])
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    groups = training.param_groups(model, TrainConfig(lr=1e-4), 16.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(1.6e-3 if ".lora_B." in name else 1e-4), name


@pytest.mark.parametrize("impl, strategy, flags", [
    ("auto", "ddp", {"fused": True, "foreach": None}),
    ("auto", "fsdp", {"fused": None, "foreach": None}),
    ("auto", "deepspeed", {"fused": None, "foreach": None}),
    ("fused", "fsdp", {"fused": True, "foreach": None}),
    ("foreach", "ddp", {"fused": None, "foreach": True}),
    ("for_loop", "ddp", {"fused": None, "foreach": False}),
])
def test_optimizer_impl_picks_torchs_update_path(impl, strategy, flags):
    model = torch.nn.Linear(4, 3)
    optimizer = training.build_optimizer(model, TrainConfig(optimizer_impl=impl), None, strategy)
    assert {k: optimizer.defaults[k] for k in flags} == flags


def test_auto_leaves_devices_without_a_fused_kernel_to_torch():
    assert training.optimizer_impl_flags("auto", "ddp", {"cpu", "cuda"}) == {"fused": True}
    assert training.optimizer_impl_flags("auto", "ddp", {"mps"}) == {}
    assert training.optimizer_impl_flags("fused", "ddp", {"mps"}) == {"fused": True}  # asked for: torch decides


def test_fused_update_matches_the_per_parameter_one():
    """The fused kernel is the same AdamW: five steps of real gradients through the tiny model
    (matrices decayed, biases and norms not) land on the for-loop path's weights, and a run
    with another weight decay does not, so the tolerance can tell the two apart."""
    cfg = compose(FAST + ["tuner=full"])

    def train(impl: str, weight_decay: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.tuner, cfg.hardware)
        train_cfg = TrainConfig(lr=1e-2, weight_decay=weight_decay, optimizer_impl=impl)
        optimizer = training.build_optimizer(model, train_cfg, None)
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    fused, for_loop, other_decay = train("fused", 0.5), train("for_loop", 0.5), train("for_loop", 0.4)
    close = dict(rtol=1e-4, atol=2e-5)
    for name, weight in fused.items():
        torch.testing.assert_close(weight, for_loop[name], **close, msg=name)
    assert any(not torch.allclose(other_decay[n], for_loop[n], **close) for n in for_loop)


def test_include_embeddings_adapts_embeddings_and_lm_head():
    cfg = compose(FAST + ["tuner.include_embeddings=true"])
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.lora_embedding_A" in n for n in trainable)
    assert any("lm_head.lora_A" in n for n in trainable)
    plain = compose(FAST)
    names = [n for n, p in build_model(plain.model, plain.tuner, plain.hardware).named_parameters() if p.requires_grad]
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)


def test_top_layers_adapts_only_the_last_layers_and_backward_stops_there():
    cfg = compose(FAST + ["tuner.top_layers=1"])
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    adapted = {n.split(".lora_")[0].split(".")[4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}, adapted  # model=tiny has 2 layers
    ids = torch.randint(0, 100, (1, 8))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    # Layer 0's output is outside the autograd graph: backward has nothing to do below layer 1.
    assert not out.hidden_states[1].requires_grad and out.hidden_states[2].requires_grad
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match=r"^tuner.top_layers: 3 is more than the model's 2 layers"):
        cfg = compose(FAST + ["tuner.top_layers=3"])
        build_model(cfg.model, cfg.tuner, cfg.hardware)


def test_full_tuner_freezes_the_named_parameters(tmp_path, monkeypatch):
    """tuner.freeze keeps the named parameters at their loaded values through training (the
    demo freezes its random embeddings so that copying any token works alike)."""
    from agenttune.tiny import tiny_model_dir

    state, out = train_in_process(["tuner=full", "tuner.freeze=[model.embed_tokens]", f"output_dir={tmp_path}", *RUN],
                                  monkeypatch)
    assert state.step == 2
    base = load_file(tiny_model_dir() / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], final["model.embed_tokens.weight"])
    moved = [k for k in base if not torch.equal(base[k], final[k])]
    assert moved and all(k.startswith("model.layers.") or k == "model.norm.weight" for k in moved), moved
    checkpoint = load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")
    assert "model.embed_tokens.weight" not in checkpoint and checkpoint.keys() >= set(moved)


def test_full_tuner_top_layers_trains_only_the_last_layers(tmp_path, monkeypatch):
    """tuner=full with tuner.top_layers=1 (freeze tuning): the last decoder layer's full weights
    train, and nothing else moves: not layer 0, the embeddings, the final norm or the head."""
    from agenttune.tiny import tiny_model_dir

    cfg = compose(FAST + ["tuner=full", "tuner.top_layers=1"])
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layer_1 = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    assert trainable == layer_1 and len(layer_1) >= 9  # q k v o, gate up down, two norms (+ biases)
    state, out = train_in_process(["tuner=full", "tuner.top_layers=1", f"output_dir={tmp_path}", *RUN], monkeypatch)
    assert state.step == 2
    base = load_file(tiny_model_dir() / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    moved = {k for k in base if not torch.equal(base[k], final[k])}
    assert moved and all(k.startswith("model.layers.1.") for k in moved), moved
    checkpoint = load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")
    assert set(checkpoint) == layer_1


def test_freeze_tuning_under_bf16_keeps_the_frozen_part_in_bf16(tmp_path, monkeypatch):
    """tuner=full tuner.top_layers=1 under bf16 autocast: the frozen weights load in bf16 (else
    autocast copies each to bf16 at every forward), the trained layer keeps fp32 masters, the
    checkpoint holds those, and final/ is written all in bf16, the dtype the model loaded in."""
    from agenttune.tiny import tiny_model_dir

    bf16 = ["tuner=full", "tuner.top_layers=1", "hardware.mixed_precision=bf16"]
    cfg = compose(FAST + bf16)
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert (trained, frozen) == ({torch.float32}, {torch.bfloat16})
    # The trained layer's norms hand their projections bf16, the values autocast would have cast
    # for each projection; the frozen layer's norms are bf16 throughout and need no hook.
    layers = model.model.layers
    hidden = torch.randn(1, 3, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for norm in (layers[1].input_layernorm, layers[1].post_attention_layernorm):
            unhooked, hooked = type(norm).forward(norm, hidden), norm(hidden)
            assert (unhooked.dtype, hooked.dtype) == (torch.float32, torch.bfloat16)
            assert torch.equal(hooked, unhooked.bfloat16())
    assert not layers[0].input_layernorm._forward_hooks
    # Everything trained, no autocast, or a dtype asked for: the model stays in one dtype.
    for extra, dtype in ((["tuner=full", "hardware.mixed_precision=bf16"], torch.float32),
                         (["tuner=full", "tuner.top_layers=1"], torch.float32),
                         ([*bf16, "model.dtype=float32"], torch.float32)):
        cfg = compose(FAST + extra)
        assert {p.dtype for p in build_model(cfg.model, cfg.tuner, cfg.hardware).parameters()} == {dtype}, extra

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the process's earlier runs had no autocast
    try:
        state, out = train_in_process([*bf16, f"output_dir={tmp_path}", *RUN], monkeypatch)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert state.step == 2
    checkpoint = load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")
    assert {v.dtype for v in checkpoint.values()} == {torch.float32}
    norms = [k for k in checkpoint if k.endswith("layernorm.weight")]
    assert len(norms) == 2 and all(not torch.all(checkpoint[k] == 1) for k in norms), norms  # they learn
    final = load_file(out / "final" / "model.safetensors")
    assert {v.dtype for v in final.values()} == {torch.bfloat16}
    base = load_file(tiny_model_dir() / "model.safetensors")
    moved = {k for k in base if not torch.equal(base[k].bfloat16(), final[k])}
    assert moved and all(k.startswith("model.layers.1.") for k in moved), moved
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert reloaded.dtype == torch.bfloat16


def test_tuner_freeze_errors_name_the_key():
    cfg = compose(FAST + ["tuner=full", "tuner.freeze=[model.embedding]"])
    with pytest.raises(ConfigError, match=r"^tuner.freeze: 'model.embedding' is the prefix of no parameter"):
        build_model(cfg.model, cfg.tuner, cfg.hardware)
    with pytest.raises(ConfigError, match=r"^tuner.freeze: applies to tuner=full"):
        compose(FAST + ["tuner=lora", "tuner.freeze=[model.embed_tokens]"])


# ----------------------------------------------------------------------------- the default command


@pytest.mark.slow
def test_default_command_trains_on_the_demo_data(tmp_path):
    """`python train.py` as a user types it (real data pipeline, demo files, W&B offline),
    shrunk to 2 steps."""
    out = tmp_path / "run"
    e = env()
    e.pop("WANDB_MODE")  # let wandb.mode=offline decide
    proc = subprocess.run([sys.executable, str(TRAIN_PY), f"output_dir={out}", "train.max_steps=2",
                           "train.global_batch_size=4", "wandb.mode=offline"],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "run.json").read_text())
    assert info["train_samples"] > 0 and info["eval_samples"] > 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["train_samples"] == info["train_samples"]
    train, evals = metrics(out)
    assert [e["step"] for e in train] == [1, 2] and evals
    from agenttune.data.templates import get_template

    assert json.loads((out / "final" / "tokenizer_config.json").read_text()).get("chat_template", None) in (
        None, get_template("qwen").chat_template)
    assert (out / "final" / "chat_template.jinja").read_text() == get_template("qwen").chat_template
    assert (out / ".hydra" / "config.yaml").exists() and (out / "loss.png").exists()
    assert list((out / "wandb").glob("offline-run-*")), "W&B ran offline into the output dir"
    assert "train:" in proc.stderr  # the tqdm progress bar


def test_a_lambda_that_weighs_none_of_the_data_stops_train_py(tmp_path):
    """General-only data at λ=1 has loss 0 at every step (the loss tests pin that a source of weight
    0 never contributes); train.py refuses the run instead of training nothing for hours."""
    data = tmp_path / "general.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"}) + "\n")
    common = ["model=tiny", "hardware=cpu", "wandb.mode=disabled", "train.max_steps=1", "data.eval_ratio=0",
              f"data.datasets=[{{path:{data},source:general}}]"]
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *common, "loss.lambda_agent=1", f"output_dir={tmp_path / 'a'}"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "train.py: error: loss.lambda_agent: 1 gives general data no weight, and the training data holds only general "
        "samples, so the loss would be 0 and nothing would train. Set loss.lambda_agent below 1, or add agent data")

    from agenttune.training import check_sources_weighted

    check_sources_weighted({1}, 0.0)  # general-only data at λ=0, or at any λ < 1, trains it at full weight
    check_sources_weighted({0, 1}, 1.0)  # both present: λ=1 simply ignores the general data, by request
    with pytest.raises(ConfigError, match="0 gives agent data no weight.*Set loss.lambda_agent above 0, or add general"):
        check_sources_weighted({0}, 0.0)


def test_wandb_online_without_a_key_is_one_message_naming_wandb_mode(tmp_path):
    """wandb.init raises UsageError with no API key; that is a setting to fix, before any step."""
    args = [a for a in FAST if not a.startswith("wandb.")] + ["wandb.mode=online", "train.max_steps=1",
                                                              f"output_dir={tmp_path / 'run'}"]
    e = train_env(extra_env={"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")})
    e.pop("WANDB_API_KEY", None)  # and no ~/.netrc: HOME is empty
    proc = subprocess.run(launch_command(tmp_path) + args, cwd=tmp_path, env=e, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train.py: error: wandb.mode: W&B could not start the online run (No API key configured" in proc.stderr
    assert "wandb.mode=offline" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "it stops before the first step"


def test_a_bad_record_stops_train_py_with_its_line_and_no_traceback(tmp_path):
    bad = tmp_path / "agent.jsonl"
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    wrong = {"conversations": [{"from": "wizard", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(wrong) + "\n")
    proc = subprocess.run([sys.executable, str(TRAIN_PY), f"output_dir={tmp_path / 'o'}", "train.max_steps=1",
                           f"data.datasets=[{{path:{bad},format:sharegpt,source:agent}}]"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "train.py: error: 1 bad record(s) in the training data:" in proc.stderr, proc.stderr[-3000:]
    assert f"{bad}:2: " in proc.stderr and "wizard" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_building_the_tiny_model_leaves_the_rng_alone(monkeypatch, tmp_path):
    """A run that builds the tiny model cache must start exactly like one that finds it."""
    from agenttune.modeling import resolve_model_path

    monkeypatch.setenv("AGENTTUNE_CACHE", str(tmp_path))  # empty: forces a build
    torch.manual_seed(123)
    resolve_model_path("tiny")
    after_build = torch.rand(3)
    torch.manual_seed(123)
    resolve_model_path("tiny")  # cached now
    assert torch.equal(torch.rand(3), after_build)


def test_early_stopping_keeps_the_best_checkpoint(monkeypatch, tmp_path):
    """Scripted eval losses: best at step 2, then two evals without improvement -> stop at
    step 4 with patience 2. save_steps is never reached, yet the best checkpoint exists."""
    scripted = iter([3.0, 2.0, 2.5, 2.1, 1.0, 1.0])

    def fake_evaluate(*args, **kwargs):
        loss = next(scripted)
        return {"eval/loss": loss, "eval/loss_agent": loss, "eval/loss_general": loss}

    state, _ = train_in_process([f"output_dir={tmp_path}", "train.max_steps=6", "train.eval_steps=1",
                                 "train.early_stopping_patience=2", "train.save_total_limit=1"],
                                monkeypatch, replace={"evaluate": fake_evaluate})
    assert (state.step, state.best_step, state.best_eval_loss) == (4, 2, 2.0)
    assert [p.name for p in training.checkpoint_dirs(tmp_path)] == ["step-2"]
    assert (tmp_path / "final").is_dir()
    assert [e["eval/loss"] for e in metrics(tmp_path)[1]] == [3.0, 2.0, 2.5, 2.1]


def test_time_budget_stops_in_time_and_fits_the_schedule_to_it(monkeypatch, tmp_path):
    """train.max_minutes with a scripted clock (one second a step): 0.1 min = 6 s holds 6 steps
    of a 50-step limit; the cosine decay runs over those 6 steps, not over 50; the last step gets
    the final evaluation; a resumed run whose budget is spent trains no further."""
    ticks = itertools.count()

    def one_second_a_call():
        return float(next(ticks))

    overrides = [f"output_dir={tmp_path}", "train.max_steps=50", "train.max_minutes=0.1", "train.warmup_ratio=0",
                 "train.lr=1e-3", "train.eval_steps=1000", "train.save_steps=3"]
    state, _ = train_in_process(overrides, monkeypatch, replace={"clock": one_second_a_call})
    assert (state.step, state.train_seconds) == (6, 6.0)
    train, evals = metrics(tmp_path)
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]  # progress k/6 at step k+1
    assert [e["lr"] for e in train] == pytest.approx(expected)
    assert [e["step"] for e in evals] == [6]
    assert (tmp_path / "final").is_dir()
    assert json.loads((tmp_path / "checkpoints" / "step-6" / "state.json").read_text())["state"]["train_seconds"] == 6.0

    ticks = itertools.count()
    resumed, _ = train_in_process(overrides + ["resume=auto"], monkeypatch, replace={"clock": one_second_a_call})
    assert resumed.step == 6


def test_time_budget_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.max_minutes"):
        TrainConfig(max_minutes=-1)


@pytest.mark.parametrize("kind, expected", [
    ("cosine", [0.0, 0.5, 1.0, 0.5, 0.0]),
    ("linear", [0.0, 0.5, 1.0, 0.5, 0.0]),
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0]),
])
def test_progress_schedule_shapes(kind, expected):
    """Warm-up over the first 20% of progress, then the decay over the rest (cosine: 0.5 at the middle)."""
    schedule = training.ProgressSchedule(kind, warmup_ratio=0.2)
    values = []
    for progress in (0.0, 0.1, 0.2, 0.6, 1.0):
        schedule.progress = progress
        values.append(schedule(12345))  # the tick count LambdaLR passes is ignored
    assert values == pytest.approx(expected)
