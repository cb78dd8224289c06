"""The λ-weighted loss and its normalisation, checked through ``forward_backward``, the
exact function the loop calls (Accelerate's backward scaling included)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from agenttune.config import LossConfig, TrainConfig
from agenttune.modeling import build_model
from agenttune.training import IGNORE, collate, forward_backward, micro_batches, source_scales
from test_train_support import FAST, compose, synthetic_dataset, synthetic_rows

PAD = 0


def fresh_model(tuner: str = "full", extra: tuple[str, ...] = ()):
    """The tiny model with the given tuner, in train mode, dropout off."""
    cfg = compose(FAST + [f"tuner={tuner}", "tuner.dropout=0.0", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    model.train()
    return model


def grads_of(batches: list[dict], lambda_agent: float, model=None, tuner: str = "full"):
    """Gradients and StepLoss of one optimizer step over ``batches`` (one process)."""
    model = model or fresh_model(tuner)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=len(batches))
    prepared = accelerator.prepare(model)
    result = forward_backward(accelerator, prepared, batches, LossConfig(lambda_agent=lambda_agent))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, result


def split(rows: dict, size: int) -> list[dict]:
    n = len(rows["input_ids"])
    return [collate({k: v[i : i + size] for k, v in rows.items()}, PAD) for i in range(0, n, size)]


def assert_same_grads(a: dict, b: dict, **tol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("micro", [1, 2])
def test_accumulation_matches_one_big_batch(micro):
    """Acceptance 1: micro-batch B x accumulation 1 == micro-batch 1 (or 2) x accumulation B,
    in gradients, on variable-length mixed agent/general data, through the real sampler."""
    dataset = synthetic_dataset(24, seed=5, max_len=48)
    big = TrainConfig(micro_batch_size=8, global_batch_size=8)
    small = TrainConfig(micro_batch_size=micro, global_batch_size=8)
    for step in (0, 2):
        one, r1 = grads_of(micro_batches(dataset, step, big, 0, 1, PAD), 0.3)
        many, r2 = grads_of(micro_batches(dataset, step, small, 0, 1, PAD), 0.3)
        assert len(micro_batches(dataset, step, small, 0, 1, PAD)) == 8 // micro
        assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
        assert r1.trained_tokens == r2.trained_tokens
        assert_same_grads(one, many, rtol=2e-4, atol=1e-6)


def test_mean_of_micro_batch_means_would_differ():
    """Control for the test above: the data is uneven enough that the common mistake (each
    micro-batch normalised by its own token count) gives a visibly different gradient."""
    dataset = synthetic_dataset(24, seed=5, max_len=48)
    batches = micro_batches(dataset, 0, TrainConfig(micro_batch_size=1, global_batch_size=8), 0, 1, PAD)
    right, _ = grads_of(batches, 0.3)
    naive = None
    for batch in batches:  # each its own step, then averaged
        g, _ = grads_of([batch], 0.3)
        naive = g if naive is None else {n: naive[n] + g[n] for n in g}
    naive = {n: v / len(batches) for n, v in naive.items()}
    diff = max(((right[n] - naive[n]).norm() / right[n].norm()).item() for n in right if right[n].norm() > 0)
    assert diff > 0.05


# ----------------------------------------------------------------------------- λ semantics


def mixed_rows(n: int = 6, seed: int = 11) -> dict:
    rows = synthetic_rows(n, seed=seed, vocab=700, max_len=30)
    assert {0, 1} == set(rows["source"])
    return rows


def scramble_source(rows: dict, source: int, seed: int) -> dict:
    """Same inputs, different labels on the rows of ``source``: only their loss changes."""
    g = torch.Generator().manual_seed(seed)
    out = {k: [list(v) if isinstance(v, list) else v for v in vs] for k, vs in rows.items()}
    for i, s in enumerate(out["source"]):
        if s == source:
            fresh = torch.randint(1, 700, (len(out["labels"][i]),), generator=g).tolist()
            out["labels"][i] = [lab if lab == IGNORE else new for lab, new in zip(out["labels"][i], fresh)]
    return out


def drop_source(rows: dict, source: int) -> dict:
    keep = [i for i, s in enumerate(rows["source"]) if s != source]
    return {k: [v[i] for i in keep] for k, v in rows.items()}


@pytest.mark.parametrize("lambda_agent, silent", [(1.0, 1), (0.0, 0)])
def test_a_source_with_zero_weight_gives_zero_gradient(lambda_agent, silent):
    """Acceptance 3: λ=1 -> general tokens contribute no gradient; λ=0 -> agent tokens none.
    Changing the silenced rows' labels changes nothing, and removing them changes nothing."""
    rows = mixed_rows()
    base, result = grads_of(split(rows, 3), lambda_agent)
    scrambled, _ = grads_of(split(scramble_source(rows, silent, seed=1), 3), lambda_agent)
    for name in base:
        assert torch.equal(base[name], scrambled[name]), name
    without, _ = grads_of(split(drop_source(rows, silent), 3), lambda_agent)
    assert_same_grads(base, without, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in base.values())
    assert result.loss == pytest.approx(result.loss_agent if silent == 1 else result.loss_general, rel=1e-6)


def hand_loss(model, rows: dict, lambda_agent: float) -> torch.Tensor:
    """L = λ·L_agent + (1-λ)·L_general written out plainly: per row, log-softmax in float64,
    the next-token log-likelihood times its weight, summed per source over all rows, divided
    by that source's summed weights."""
    sums = {0: 0.0, 1: 0.0}
    counts = {0: 0.0, 1: 0.0}
    for ids, labels, weights, source in zip(rows["input_ids"], rows["labels"], rows["weights"], rows["source"]):
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(len(ids) - 1):
            if labels[t + 1] != IGNORE:
                sums[source] = sums[source] - weights[t + 1] * logp[t, labels[t + 1]]
                counts[source] += weights[t + 1]
    return lambda_agent * sums[0] / counts[0] + (1 - lambda_agent) * sums[1] / counts[1]


def test_lambda_half_matches_a_hand_computation():
    """Acceptance 3: λ=0.5 loss and gradients equal the formula computed by hand, through
    two accumulated micro-batches (so Accelerate's division by the accumulation steps and
    our compensation are both in the path)."""
    rows = mixed_rows(seed=12)
    model = fresh_model()
    expected = hand_loss(model, rows, 0.5)
    expected.backward()
    want = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got, result = grads_of(split(rows, 3), 0.5, model=model)
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)
    assert result.loss == pytest.approx(0.5 * result.loss_agent + 0.5 * result.loss_general, rel=1e-6)
    assert_same_grads(got, want, rtol=1e-4, atol=1e-6)


def test_a_step_with_one_source_trains_on_it_at_full_weight():
    """The documented single-source rule: λ is renormalised over the sources present, so an
    agent-only step at λ=0.2 is exactly the plain weighted mean over agent tokens (λ=1)."""
    agent_only = drop_source(mixed_rows(), 1)
    at_02, r02 = grads_of(split(agent_only, 2), 0.2)
    at_1, r1 = grads_of(split(agent_only, 2), 1.0)
    assert r02.loss_general is None and r02.loss == pytest.approx(r02.loss_agent)
    assert r02.loss == pytest.approx(r1.loss)
    assert_same_grads(at_02, at_1, rtol=1e-6, atol=0)


def test_source_scales():
    counts = torch.tensor([10.0, 40.0])
    torch.testing.assert_close(source_scales(counts, 0.2), torch.tensor([0.2 / 10, 0.8 / 40]))
    torch.testing.assert_close(source_scales(torch.tensor([10.0, 0.0]), 0.2), torch.tensor([1 / 10, 0.0]))
    torch.testing.assert_close(source_scales(torch.tensor([0.0, 8.0]), 0.2), torch.tensor([0.0, 1 / 8]))
    # a source with weight 0 never trains, even alone in a step
    torch.testing.assert_close(source_scales(torch.tensor([0.0, 8.0]), 1.0), torch.zeros(2))
    torch.testing.assert_close(source_scales(torch.tensor([0.0, 0.0]), 0.5), torch.zeros(2))


def test_token_weights_scale_the_loss():
    """A weight-2 token counts twice in both the sum and the count (weighted mean)."""
    rows = {"input_ids": [[5, 6, 7, 8]], "labels": [[-100, 6, 7, 8]], "weights": [[0.0, 1.0, 2.0, 1.0]],
            "source": [0], "length": [4]}
    model = fresh_model()
    _, result = grads_of(split(rows, 1), 1.0, model=model)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0].double(), -1)
    nll = [-logp[0, 6], -logp[1, 7], -logp[2, 8]]
    assert result.loss == pytest.approx(((nll[0] + 2 * nll[1] + nll[2]) / 4).item(), rel=1e-5)


def test_gradient_checkpointing_works_with_lora():
    """With the base frozen, checkpointed blocks must still pass gradients to the adapters."""
    batches = split(mixed_rows(4, seed=3), 2)
    plain, _ = grads_of(batches, 0.5, model=fresh_model("lora"))
    model = fresh_model("lora", ("hardware.gradient_checkpointing=true",))
    assert model.base_model.model.model.gradient_checkpointing
    checkpointed, _ = grads_of(batches, 0.5, model=model)
    lora_b = [n for n in checkpointed if "lora_B" in n]
    assert len(lora_b) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert all(checkpointed[n].abs().sum() > 0 for n in lora_b)
    assert_same_grads(plain, checkpointed, rtol=1e-5, atol=1e-7)
