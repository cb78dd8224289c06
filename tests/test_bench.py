"""The throughput benchmark: its CLI on the tiny model (ours always; against TRL where TRL is
installed, pip install -r requirements-bench.txt), and the counts its figures rest on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_train_support import ROOT, env

from agenttune.bench.__main__ import ratios
from agenttune.bench.throughput import ARCHS, Meter, arch_dir, matmul_params

SMALL = ["--steps", "3", "--warmup", "1", "--global-batch", "4", "--micro-batch", "2", "--max-tokens", "1200"]


def bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "agenttune.bench", *SMALL, *args, "--json", str(out)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "trained tok/s" in proc.stdout
    return json.loads(out.read_text())


def check_counts(result: dict) -> None:
    assert result["timed_steps"] == 2 and result["seconds"] > 0
    assert 0 < result["trained_tokens"] < result["tokens"] <= result["positions"]
    assert result["mfu"] is None and result["peak_tflops"] is None, "no peak is known for a CPU"
    assert result["peak_mem_gib"] > 0


def test_bench_cli_runs_our_loop_padded_and_packed(tmp_path):
    report = bench(tmp_path, "--loops", "ours", "--layouts", "padded,packed")
    padded, packed = report["results"]
    assert (padded["layout"], packed["layout"]) == ("padded", "packed")
    for result in (padded, packed):
        check_counts(result)
    assert packed["padding_fraction"] == 0.0 < padded["padding_fraction"]
    # 2 timed steps see the same 8 rows of the demo data whatever the layout
    assert packed["tokens"] == padded["tokens"] and packed["trained_tokens"] == padded["trained_tokens"]
    assert set(report["ratios"]) == {"ours: packed/padded"}


def test_bench_cli_compares_with_trl(tmp_path):
    pytest.importorskip("trl")
    report = bench(tmp_path, "--loops", "ours,trl", "--layouts", "packed", "--in-process")  # one start-up, not two
    ours, trl = report["results"]
    assert (ours["loop"], trl["loop"]) == ("ours", "trl")
    for result in (ours, trl):
        check_counts(result)
    assert trl["padding_fraction"] == 0.0, "TRL's bfd packing is padding-free too"
    assert report["ratios"]["packed: ours/trl"] == pytest.approx(ours["trained_tokens_per_s"] / trl["trained_tokens_per_s"])


def test_meter_counts_padding_and_packed_samples():
    model = torch.nn.Module()
    model.forward = lambda **kwargs: None
    meter = Meter(model, torch.device("cpu"))
    meter.start()
    model(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))
    model(input_ids=torch.zeros(1, 6, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 0, 1, 0]]),
          labels=torch.tensor([[-100, 7, 7, -100, 7, -100]]))
    meter.stop()
    assert (meter.positions, meter.tokens, meter.trained) == (16, 14, 3)
    assert meter.squares == 3**2 + 5**2 + 3**2 + 2**2 + 1**2


def test_matmul_params_count_the_tied_head_once_as_a_matmul():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    tied = Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True))
    untied = Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=False))
    total_tied = sum(p.numel() for p in tied.parameters())
    assert matmul_params(tied) == total_tied  # embedding out, the same matrix back in as lm_head
    assert matmul_params(untied) == sum(p.numel() for p in untied.parameters()) - 100 * 16


def test_arch_dirs_hold_the_real_sizes_and_no_weights():
    from transformers import AutoConfig

    path = arch_dir("qwen2.5-7b")
    config = AutoConfig.from_pretrained(path)
    for key, value in ARCHS["qwen2.5-7b"].items():
        assert getattr(config, key) == value, key
    assert (path / "model.safetensors").stat().st_size < 100_000  # from_pretrained initialises the rest


def test_ratios_compare_like_with_like():
    results = [{"layout": "padded", "loop": "ours", "trained_tokens_per_s": 30.0},
               {"layout": "padded", "loop": "trl", "trained_tokens_per_s": 20.0},
               {"layout": "packed", "loop": "ours", "trained_tokens_per_s": 60.0}]
    assert ratios(results) == {"padded: ours/trl": 1.5, "ours: packed/padded": 2.0}
