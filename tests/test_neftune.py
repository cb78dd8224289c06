"""NEFTune (train.neftune_alpha): noise on the input embeddings, sized per sample, in training only."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_loss import fresh_model
from test_train_support import metrics, synthetic_rows, train_in_process

from agenttune.modeling import add_neftune
from agenttune.training import IGNORE, collate, model_inputs, pack, pack_shared

ALPHA = 5.0


def embedding_noise(model, batch: dict) -> torch.Tensor:
    """(B, T, d): what the forward added to the plain embedding lookup of ``batch``."""
    seen = []
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    with torch.no_grad():
        model(**model_inputs(batch))
    handle.remove()
    return seen[0] - torch.nn.functional.embedding(batch["input_ids"], embed.weight.detach())


def noisy_model(tuner: str = "full"):
    model = fresh_model(tuner)
    add_neftune(model, ALPHA)
    return model


def assert_uniform_within(noise: torch.Tensor, length: int) -> None:
    """Uniform noise in ±alpha/sqrt(length·d): its largest draw reaches the bound, its mean size is half of it."""
    bound = ALPHA / math.sqrt(length * noise.shape[-1])
    size = noise.abs()
    assert size.max().item() <= bound * (1 + 1e-5)
    assert size.max().item() >= 0.9 * bound
    assert size.mean().item() == pytest.approx(bound / 2, rel=0.15)


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_a_packed_row_sizes_the_noise_by_each_samples_own_length(tuner):
    rows = synthetic_rows(3, seed=1, vocab=700, min_len=12, max_len=90)
    rows["input_ids"] = [ids[:n] for ids, n in zip(rows["input_ids"], (12, 40, 90))]
    for key in ("labels", "weights"):
        rows[key] = [values[:n] for values, n in zip(rows[key], (12, 40, 90))]
    batch = pack(rows)
    noise = embedding_noise(noisy_model(tuner), batch)[0]  # (N, d)
    bounds = batch["cu_seq_lens"].tolist()
    for start, end in zip(bounds, bounds[1:]):
        # transformers' hook would use the row's 142 tokens: sqrt(142/12) = 3.4 times too little for the first
        assert_uniform_within(noise[start:end], end - start)


def test_a_padded_batch_sizes_the_noise_by_each_rows_real_length():
    rows = synthetic_rows(2, seed=2, vocab=700, min_len=20, max_len=20)
    rows["input_ids"][1], rows["labels"][1], rows["weights"][1] = (v[:8] for v in (rows["input_ids"][1], rows["labels"][1], rows["weights"][1]))
    batch = collate(rows, pad_id=0)
    noise = embedding_noise(noisy_model(), batch)
    assert_uniform_within(noise[0], 20)
    assert_uniform_within(noise[1, :8], 8)


def test_a_shared_prefix_takes_the_longest_of_the_samples_that_hold_it():
    I = IGNORE
    prefix = list(range(1, 31))
    rows = {"input_ids": [prefix + list(range(100, 110)), prefix + list(range(200, 270))],
            "labels": [[I] * 30 + list(range(100, 110)), [I] * 30 + list(range(200, 270))],
            "weights": [[0.0] * 30 + [1.0] * 10, [0.0] * 30 + [1.0] * 70], "source": [0, 0]}
    batch = pack_shared(rows)
    assert batch["input_ids"].shape[1] == 29 + 11 + 71  # 29 shared tokens (the 30th predicts a trained one)
    noise = embedding_noise(noisy_model(), batch)[0]
    assert_uniform_within(noise[:29], 100)  # shared: the longer sample's 100
    assert_uniform_within(noise[29:40], 40)
    assert_uniform_within(noise[40:], 100)


def test_no_noise_outside_training_mode():
    model = noisy_model()
    model.eval()
    batch = pack(synthetic_rows(2, seed=3, vocab=700))
    assert torch.equal(embedding_noise(model, batch), torch.zeros_like(embedding_noise(model, batch)))


def test_train_py_trains_with_noisy_embeddings(tmp_path, monkeypatch):
    """The same run with and without NEFTune: the noise changes the first step's loss (the weights
    are the same then), the run trains and saves, and the saved model carries no noise."""
    args = ["train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "tuner=full"]
    train_in_process([f"output_dir={tmp_path / 'plain'}", *args], monkeypatch)
    train_in_process([f"output_dir={tmp_path / 'noisy'}", "train.neftune_alpha=15", *args], monkeypatch)
    plain, _ = metrics(tmp_path / "plain")
    noisy, _ = metrics(tmp_path / "noisy")
    assert noisy[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-6)
    assert noisy[0]["loss"] == pytest.approx(plain[0]["loss"], rel=0.05)  # noise, not a different run
    assert len(noisy) == 2 and all(math.isfinite(m["loss"]) for m in noisy)

    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "noisy" / "final")
    saved.train()  # training mode: the noise hook, had it been saved, would fire
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(saved.get_input_embeddings()(ids), saved.get_input_embeddings().weight[ids])
