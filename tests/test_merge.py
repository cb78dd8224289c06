"""merge.py on the tiny model: LoRA and DoRA runs merge into standalone models that load with
plain transformers in a fresh process, generate exactly what base + adapter generates, and
render tool-calling conversations exactly as training did. Plus the safety rails: refusal
without force, adapter-only exports, and clear errors for a missing or mismatched base."""

from __future__ import annotations

import importlib.util
import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from agenttune.config import ConfigError
from agenttune.data.schema import Conversation, Message, ToolCall
from agenttune.data.templates import get_template, to_hf_messages
from agenttune.merging import MergeError, load_run_config, parse_args
from agenttune.modeling import build_tokenizer
from agenttune.tiny import tiny_model_dir
from test_train_support import ROOT, env, train_in_process

RUN = ["train.max_steps=2", "train.save_steps=2", "train.eval_steps=100", "train.lr=1e-2", "train.warmup_ratio=0"]
TUNERS = ("lora", "dora")


def load_merge_module():
    spec = importlib.util.spec_from_file_location("agenttune_merge_script", ROOT / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


merge_script = load_merge_module()


def merge(*args: str):
    return merge_script.merge(parse_args(list(args)))


def tool_conv() -> Conversation:
    weather = {"name": "get_weather", "description": "Get the weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    return Conversation([
        Message("system", "You are a helpful assistant."),
        Message("user", "What is the weather in Hangzhou today?"),
        Message("assistant", "Let me check.", tool_calls=[
            ToolCall("get_weather", json.dumps({"city": "Hangzhou", "unit": "celsius"}))]),
        Message("tool", '{"temperature": 25, "sky": "cloudy"}'),
        Message("assistant", "It is cloudy and 25 degrees."),
    ], tools=[weather], origin="test_merge#0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{tuner: (run dir, fp32 merge of its final/)} for a 2-step tiny run of each tuner."""
    monkeypatch = pytest.MonkeyPatch()
    out = {}
    try:
        for tuner in TUNERS:
            run = tmp_path_factory.mktemp(tuner)
            state, _ = train_in_process([f"tuner={tuner}", f"output_dir={run}", *RUN], monkeypatch, data={"eval": 0})
            assert state.step == 2
            out[tuner] = (run, merge(f"adapter={run / 'final'}", f"output={run / 'merged'}", "dtype=fp32"))
    finally:
        monkeypatch.undo()
    return out


# Loads each merged dir with nothing but transformers: greedy generation from a rendered
# prompt, the logits of the whole tool conversation, and the tokenizer's own rendering of it.
FRESH_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
messages, tools, paths = json.loads(sys.argv[1])
out = {}
for tuner, path in paths.items():
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(messages[:2], tools=tools, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        logits = model(tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids).logits[0]
    out[tuner] = {"prompt_ids": ids[0].tolist(), "generated": generated.tolist(), "text": text,
                  "logits": logits[-8:].tolist(), "eos": model.generation_config.eos_token_id}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh(runs):
    messages, tools = to_hf_messages(tool_conv())
    paths = {tuner: str(merged) for tuner, (_, merged) in runs.items()}
    proc = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, json.dumps([messages, tools, paths])],
                          env=env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def base_plus_adapter(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    return PeftModel.from_pretrained(base, run / "final").eval()


@pytest.mark.parametrize("tuner", TUNERS)
def test_merged_model_generates_like_base_plus_adapter_in_a_fresh_process(runs, fresh, tuner):
    run, merged = runs[tuner]
    got = fresh[tuner]
    model = base_plus_adapter(run)
    model_cfg, _ = load_run_config(run / "checkpoints" / "step-2" / "config.yaml")
    tokenizer = build_tokenizer(model_cfg)
    prompt = torch.tensor([got["prompt_ids"]])
    full = torch.tensor([tokenizer(got["text"], add_special_tokens=False).input_ids])
    with torch.no_grad():
        want = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, eos_token_id=got["eos"])
        want = want[0, prompt.shape[1]:]
        want_logits = model(input_ids=full).logits[0, -8:]
        with model.disable_adapter():
            base_logits = model(input_ids=full).logits[0, -8:]
    assert got["generated"] == want.tolist()
    torch.testing.assert_close(torch.tensor(got["logits"]), want_logits, rtol=0, atol=1e-4)
    assert (want_logits - base_logits).abs().max() > 1e-2, "the adapter must matter, or the comparison proves nothing"
    assert got["eos"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    files = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any("lora" in key for key in load_file(merged / "model.safetensors")), "merged: no adapter tensors left"


@pytest.mark.parametrize("tuner", TUNERS)
def test_saved_chat_template_renders_like_the_training_renderer(fresh, tuner):
    assert fresh[tuner]["text"] == get_template("qwen").render_text(tool_conv())
    assert "<tool_call>" in fresh[tuner]["text"] and "get_weather" in fresh[tuner]["text"]


def test_checkpoint_merges_like_final(runs, tmp_path):
    """A checkpoint has no PEFT config: merging it rebuilds the adapter from the run config,
    which must give the merge of final/ (the same weights, saved by PEFT)."""
    run, merged = runs["dora"]
    from_checkpoint = merge(f"adapter={run / 'checkpoints' / 'step-2'}", f"output={tmp_path / 'm'}", "dtype=fp32")
    want, got = load_file(merged / "model.safetensors"), load_file(from_checkpoint / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_refuses_a_non_empty_output_without_force(runs, tmp_path, capsys):
    run, _ = runs["lora"]
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    assert merge_script.main([f"adapter={run / 'final'}", f"output={output}"]) == 1
    err = capsys.readouterr().err
    assert f"merge.py: error: output={output} exists and is not empty; pass force=true" in err
    assert "Traceback" not in err
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and (output / "keep.txt").read_text() == "precious"


def test_adapter_only_exports_adapter_tokenizer_and_template(runs, tmp_path):
    """Also: force=true replaces a non-empty output, and the default bf16 passes verification."""
    run, _ = runs["lora"]
    output = tmp_path / "serve"
    output.mkdir()
    (output / "old.txt").write_text("old")
    merge(f"adapter={run / 'final'}", f"output={output}", "adapter_only=true", "force=true")
    files = {p.name for p in output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert not {"model.safetensors", "config.json", "old.txt"} & files
    assert (output / "chat_template.jinja").read_text() == get_template("qwen").chat_template
    want, got = load_file(run / "final" / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_mismatched_base_names_the_layer_and_sizes(runs, tmp_path):
    run, _ = runs["lora"]
    other = tiny_model_dir(hidden=32)
    # hidden 32 vs 64: every layer differs; the message names one and both sizes
    with pytest.raises(MergeError, match=rf"does not fit base model {other}: layer model\.layers\.\d\.\S+ has "
                                         r"(32|64) (inputs|outputs) in the base, the adapter was trained on (64|128) "
                                         r"\(base hidden size 32\)"):
        merge(f"adapter={run / 'final'}", f"output={tmp_path / 'm'}", f"base={other}")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".tmp-*"))


def test_base_with_missing_weights_is_refused(runs, tmp_path):
    run, _ = runs["lora"]
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_model_dir(), broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=rf"base model {broken}: its weight files lack .*model\.layers\.1\.mlp\.up_proj"):
        merge(f"adapter={run / 'final'}", f"output={tmp_path / 'm'}", f"base={broken}")


def test_missing_base_is_one_clear_line_with_exit_status_1(runs, tmp_path, capsys):
    run, _ = runs["lora"]
    assert merge_script.main([f"adapter={run / 'final'}", f"output={tmp_path / 'm'}", f"base={tmp_path / 'gone'}"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"merge.py: error: base model {tmp_path / 'gone'} (base=) does not exist. "
                                    "If the base moved, pass base=DIR.")
    assert "Traceback" not in err


def test_arguments_are_checked_and_named():
    with pytest.raises(ConfigError, match=r"^dtpye: unknown key \(merge.py takes adapter, adapter_only, base"):
        parse_args(["adapter=a", "output=b", "dtpye=fp16"])
    with pytest.raises(ConfigError, match=r"^dtype: 'int8' is not one of bf16, fp16, fp32"):
        parse_args(["adapter=a", "output=b", "dtype=int8"])
    with pytest.raises(ConfigError, match=r"^force: expected true or false"):
        parse_args(["adapter=a", "output=b", "force=yes"])
    with pytest.raises(ConfigError, match=r"^output: required"):
        parse_args(["adapter=a"])
    cfg = parse_args(["adapter=a", "output=b", "adapter_only=true", "max_shard_size=500MB"])
    assert (cfg.adapter_only, cfg.force, cfg.dtype, cfg.max_shard_size) == (True, False, "bf16", "500MB")


def test_adapter_without_a_run_config_is_refused(tmp_path):
    lonely = tmp_path / "adapter"
    lonely.mkdir()
    with pytest.raises(MergeError, match="no training config found"):
        merge(f"adapter={lonely}", f"output={tmp_path / 'm'}")


def test_a_merge_that_drops_the_adapter_fails_verification(runs, tmp_path, monkeypatch):
    """Sabotage: 'merge' by unloading, which throws the adapter away. The fresh-process check
    must catch it and leave nothing behind."""
    from peft import PeftModel

    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self, *a, **k: self.unload(), raising=False)
    run, _ = runs["lora"]
    with pytest.raises(MergeError, match=r"verification failed: the export's logits differ from base\+adapter by"):
        merge(f"adapter={run / 'final'}", f"output={tmp_path / 'm'}", "dtype=fp32")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".tmp-*"))


def test_run_config_is_found_for_final_and_checkpoint_dirs(tmp_path):
    from agenttune.merging import find_run_config

    run = tmp_path / "run"
    for path in (run / "final", run / "checkpoints" / "step-2", run / "checkpoints" / "step-10", run / ".hydra"):
        path.mkdir(parents=True)
    for path in (run / "checkpoints" / "step-2", run / "checkpoints" / "step-10"):
        (path / "config.yaml").write_text("model: {}\n")
    assert find_run_config(run / "checkpoints" / "step-2") == run / "checkpoints" / "step-2" / "config.yaml"
    assert find_run_config(run / "final") == run / "checkpoints" / "step-10" / "config.yaml", "newest checkpoint"
    (run / ".hydra" / "config.yaml").write_text("model: {}\n")
    assert find_run_config(run / "final") == run / ".hydra" / "config.yaml", "Hydra's copy of the run comes first"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message; the QLoRA merge itself needs CUDA")
def test_qlora_merge_on_cpu_says_it_needs_cuda(runs, tmp_path):
    """The NF4 dequantize path cannot run here; a QLoRA checkpoint must say why and what to do."""
    run, _ = runs["lora"]
    checkpoint = tmp_path / "step-2"
    shutil.copytree(run / "checkpoints" / "step-2", checkpoint)
    config = checkpoint / "config.yaml"
    config.write_text(config.read_text().replace("name: lora", "name: qlora"))
    with pytest.raises(MergeError, match=r"tuner=qlora.*needs a CUDA GPU.*or pass adapter_only=true"):
        merge(f"adapter={checkpoint}", f"output={tmp_path / 'm'}")
    assert not (tmp_path / "m").exists()


def test_a_disk_that_cannot_take_the_export_is_one_message_and_leaves_nothing(runs, tmp_path):
    """The kernel refuses every write past 100 KB (RLIMIT_FSIZE, as a full disk refuses any):
    the merged tiny model's weights are larger, its configs are not."""
    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    run, merged = runs["lora"]
    assert (merged / "model.safetensors").stat().st_size > 100_000
    output = tmp_path / "m"
    proc = subprocess.run([sys.executable, str(ROOT / "merge.py"), f"adapter={run / 'final'}", f"output={output}"],
                          env=env(), capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          preexec_fn=small_files_only)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"merge.py: error: could not write {output}: ")
    assert "File too large" in proc.stderr and f"free on the disk of {tmp_path}; nothing was written there" in proc.stderr
    assert list(tmp_path.iterdir()) == []
