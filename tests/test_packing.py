"""Packing, length grouping and the chunked lm_head: each changes how a step is computed,
never what it computes. Checked through ``micro_batches`` and ``forward_backward``, the
functions the loop calls, on the tiny model."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from test_train_support import FAST, compose, metrics, run_train, synthetic_dataset, synthetic_rows, train_in_process

from agenttune.attention import PACKED_SDPA, use_packed_sdpa
from agenttune.modeling import build_model
from agenttune.config import ConfigError, HardwareConfig, LossConfig, TrainConfig
from agenttune.training import (
    IGNORE,
    best_fit_decreasing,
    build_accelerator,
    collate,
    forward_backward,
    head_nll,
    liger_source_sums,
    micro_batches,
    model_inputs,
    pack,
    pack_shared,
    shareable_length,
    source_nll,
    split_bins,
    step_rows,
)

from test_train_loss import fresh_model  # noqa: E402

PAD = 0


tiny = fresh_model  # the tiny model with a tuner, train mode, dropout off (shared with the loss tests)


def step_grads(batches: list[dict], tuner: str = "full", impl: str = "chunked", extra: tuple[str, ...] = (), per_sample: bool = False):
    """One optimizer step's gradients and StepLoss through Accelerate, as the loop runs it;
    ``per_sample``: with train.py's packed attention (agenttune.attention)."""
    model = tiny(tuner, extra)
    if per_sample:
        assert use_packed_sdpa(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)  # packing resets it per step
    result = forward_backward(accelerator, accelerator.prepare(model), batches, LossConfig(lambda_agent=0.3, impl=impl))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, result


def assert_close_grads(a: dict, b: dict, **tol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


# ----------------------------------------------------------------------------- bins


@pytest.mark.parametrize("capacity", [40, 64, 200])
def test_bfd_bins_respect_capacity_and_hold_every_item_once(capacity):
    rng = random.Random(capacity)
    for _ in range(20):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        bins = best_fit_decreasing(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        # best fit: no two bins could be merged, so at most one bin is half empty or worse
        assert sum(sum(lengths[i] for i in b) <= capacity / 2 for b in bins) <= 1
        assert bins == best_fit_decreasing(lengths, capacity), "deterministic"


def test_bfd_fills_the_tightest_bin():
    # 6 opens bin 0 and 5 bin 1 (6 + 5 > 10); 4 fits both and goes to the fuller bin 0, which
    # it fills; 3 and 2 fill bin 1; 1 fits nowhere and opens bin 2.
    assert best_fit_decreasing([3, 6, 1, 4, 5, 2], 10) == [[1, 3], [4, 0, 5], [2]]


def test_split_bins_reaches_the_count_without_overfilling():
    lengths = [5, 4, 3, 2, 1, 1]
    bins = best_fit_decreasing(lengths, 8)
    split = split_bins(bins, lengths, 5)
    assert len(split) == 5 and sorted(i for b in split for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 8 for b in split)
    with pytest.raises(ValueError, match="cannot cut 6 items into 7 bins"):
        split_bins(bins, lengths, 7)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_steps_train_the_same_rows_with_one_count_on_every_rank(world):
    """Every row of the step exactly once over all ranks; the same micro-batch count on each
    rank (DDP's all-reduce pairs up); no bin over max_tokens_per_batch."""
    dataset = synthetic_dataset(30, seed=3, max_len=60)
    train = TrainConfig(global_batch_size=12, micro_batch_size=1, packing=True, max_tokens_per_batch=90)
    for step in range(4):
        per_rank = [micro_batches(dataset, step, train, rank, world, PAD) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1
        seen = sorted(tuple(ids) for batches in per_rank for b in batches for ids in unpack(b))
        rows = step_rows(len(dataset), step, 12, train.seed)
        assert seen == sorted(tuple(dataset[r]["input_ids"]) for r in rows)
        assert all(b["input_ids"].shape[1] <= 90 for batches in per_rank for b in batches)


def unpack(batch: dict) -> list[list[int]]:
    """The samples of a packed row, cut where the position ids restart."""
    ids, pos = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [ids[a:b] for a, b in itertools.pairwise(starts)]


def test_pack_keeps_weights_and_sources_per_token_and_never_predicts_across_samples():
    rows = {"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [-100, 9]],
            "weights": [[0.0, 1.0, 2.0], [0.0, 1.0]], "source": [1, 0], "length": [3, 2]}
    batch = pack(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["targets"].tolist() == [[6, 7, IGNORE, 9, IGNORE]]  # 7 never learns to predict 8
    assert batch["target_weights"].tolist() == [[1.0, 2.0, 0.0, 1.0, 0.0]]
    assert batch["source"].tolist() == [[1, 1, 1, 0, 0]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5]  # sample boundaries, for flash-attention's varlen kernel
    assert "attention_mask" not in model_inputs(batch), "a mask would hide the sample boundaries from transformers"


def test_a_sample_too_long_for_a_packed_batch_names_the_key():
    dataset = synthetic_dataset(8, seed=1, min_len=30, max_len=40)
    train = TrainConfig(global_batch_size=4, micro_batch_size=1, packing=True, max_tokens_per_batch=20)
    with pytest.raises(ConfigError, match=r"train.max_tokens_per_batch: row \d+ of the training set has \d+ tokens"):
        micro_batches(dataset, 0, train, 0, 1, PAD)


# ----------------------------------------------------------------------------- attention isolation


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_a_packed_sample_never_sees_its_neighbours(attn):
    """Changing sample A changes nothing in sample B's logits, which equal B's logits alone.
    The control (the same row without restarting positions) shows B would otherwise see A."""
    model = tiny(extra=(f"model.attn_implementation={'sdpa' if attn == PACKED_SDPA else attn}",)).eval()
    if attn == PACKED_SDPA:
        assert use_packed_sdpa(model)
    assert model.config._attn_implementation == attn
    a, other_a, b = [5, 6, 7, 8, 9, 10], [50, 60, 70, 80, 90, 100], [20, 21, 22, 23, 24]

    def row(first):
        return pack({"input_ids": [first, b], "labels": [first, b], "weights": [[1.0] * 6, [1.0] * 5], "source": [0, 1]})

    with torch.no_grad():
        b_after_a = model(**model_inputs(row(a))).logits[0, 6:]
        b_after_other = model(**model_inputs(row(other_a))).logits[0, 6:]
        b_alone = model(input_ids=torch.tensor([b])).logits[0]
        b_unmasked = model(input_ids=row(a)["input_ids"]).logits[0, 6:]
    torch.testing.assert_close(b_after_a, b_after_other, rtol=0, atol=1e-6)
    torch.testing.assert_close(b_after_a, b_alone, rtol=1e-5, atol=1e-5)
    assert (b_unmasked - b_alone).abs().max() > 1e-2


# ----------------------------------------------------------------------------- same step, other layout


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_packed_padded_and_grouped_steps_give_the_same_loss_and_gradients(tuner):
    dataset = synthetic_dataset(24, seed=5, max_len=48)
    padded = micro_batches(dataset, 1, TrainConfig(micro_batch_size=2, global_batch_size=8), 0, 1, PAD)
    packed = micro_batches(dataset, 1, TrainConfig(global_batch_size=8, packing=True, max_tokens_per_batch=100), 0, 1, PAD)
    grouped = micro_batches(dataset, 1, TrainConfig(micro_batch_size=2, global_batch_size=8, group_by_length=True), 0, 1, PAD)
    assert len(padded) == len(grouped) == 4 and len(packed) not in (0, 4)  # the count really changes
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in grouped)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in padded)
    reference, r0 = step_grads(padded, tuner, impl="logits")
    for batches, per_sample in ((packed, False), (packed, True), (grouped, False)):
        grads, result = step_grads(batches, tuner, per_sample=per_sample)
        assert result.loss == pytest.approx(r0.loss, rel=1e-6)
        assert result.loss_agent == pytest.approx(r0.loss_agent, rel=1e-6)
        assert result.loss_general == pytest.approx(r0.loss_general, rel=1e-6)
        assert (result.trained_tokens, result.tokens) == (r0.trained_tokens, r0.tokens)
        assert_close_grads(grads, reference, rtol=1e-4, atol=1e-7)


def prefixed_dataset(n: int, seed: int):
    """synthetic rows behind a few shared untrained prefixes (a system turn, then one of three
    tool listings), as agent samples are; some prefixes run into a row's trained tokens."""
    rng = random.Random(seed)
    system, listings = [rng.randrange(1, 700) for _ in range(12)], [[rng.randrange(1, 700) for _ in range(k)] for k in (5, 9, 3)]
    rows = synthetic_rows(n, seed, vocab=700, max_len=30)
    for i in range(n):
        head = system + listings[i % 3] if i % 4 else system[:7]
        rows["input_ids"][i] = head + rows["input_ids"][i]
        rows["labels"][i] = [IGNORE] * len(head) + rows["labels"][i]
        rows["weights"][i] = [0.0] * len(head) + rows["weights"][i]
        rows["length"][i] = len(rows["input_ids"][i])
    rows["labels"][1] = list(rows["input_ids"][1])  # trained from its first token: shares nothing
    rows["weights"][1] = [1.0] * len(rows["input_ids"][1])
    import datasets
    return datasets.Dataset.from_dict(rows)


@pytest.mark.parametrize("extra", [(), ("hardware.gradient_checkpointing=true",)])
def test_shared_prefix_rows_give_the_same_loss_and_gradients_in_fewer_tokens(extra):
    dataset = prefixed_dataset(24, seed=7)
    config = dict(global_batch_size=8, packing=True, max_tokens_per_batch=200)
    packed = micro_batches(dataset, 1, TrainConfig(**config), 0, 1, PAD)
    shared = micro_batches(dataset, 1, TrainConfig(**config, share_prefixes=True), 0, 1, PAD)
    assert len(shared) == len(packed) >= 2
    assert sum(b["input_ids"].numel() for b in shared) < 0.8 * sum(b["input_ids"].numel() for b in packed)
    reference, r0 = step_grads(packed, "full", extra=extra, per_sample=True)
    grads, result = step_grads(shared, "full", extra=extra, per_sample=True)
    assert result.loss == pytest.approx(r0.loss, rel=1e-5)
    assert result.loss_agent == pytest.approx(r0.loss_agent, rel=1e-5)
    assert result.loss_general == pytest.approx(r0.loss_general, rel=1e-5)
    assert result.trained_tokens == r0.trained_tokens and result.tokens < r0.tokens
    assert_close_grads(grads, reference, rtol=1e-4, atol=1e-6)


def test_pack_shared_lays_each_prefix_out_once_and_keeps_every_trained_token():
    I = IGNORE
    rows = {"input_ids": [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9], [1, 2, 7, 8], [5, 5]],
            "labels": [[I, I, I, I, 5, 6], [I, I, I, I, 9], [I, I, 7, 8], [I, 5]],
            "weights": [[0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 1], [0, 0, 1, 1], [0, 1.0]], "source": [0, 0, 1, 1]}
    assert [shareable_length(labels) for labels in rows["labels"]] == [3, 3, 1, 0]
    batch = pack_shared(rows)
    # [1 2 3] once for the first two rows; the third shares only 1: its 2 predicts a trained 7.
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 9, 9, 2, 7, 8, 5, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 1, 2, 3, 0, 1]]
    assert batch["targets"].tolist() == [[I, I, I, 5, 6, I, 9, I, 7, 8, I, 5, I]]
    assert batch["target_weights"].tolist() == [[0, 0, 0, 1, 2, 0, 1, 0, 1, 1, 0, 1, 0]]
    # nodes [start, end, parent]: 1 | 2 3 | 4 5 6 | 9 9 | 2 7 8 | 5 5
    assert batch["prefix_nodes"].tolist() == [[0, 1, -1], [1, 3, 0], [3, 6, 1], [6, 8, 1], [8, 11, 0], [11, 13, -1]]
    def trained(b):
        return sorted((t, w) for t, w in zip(b["targets"][0].tolist(), b["target_weights"][0].tolist()) if t != I)
    assert trained(batch) == trained(pack(rows))


def test_shared_prefixes_need_packing_and_sdpa(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.share_prefixes: .*train.packing=true"):
        TrainConfig(share_prefixes=True)
    args = ["train.max_steps=1", "train.global_batch_size=4", "train.packing=true", "train.share_prefixes=true",
            "model.attn_implementation=eager", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="train.share_prefixes: the model attends with eager attention"):
        train_in_process(args, monkeypatch, data={"train": 8, "eval": 0, "max_len": 40})


def test_grouping_sorts_the_share_longest_first():
    dataset = synthetic_dataset(24, seed=5, max_len=48)
    batches = micro_batches(dataset, 0, TrainConfig(micro_batch_size=2, global_batch_size=8, group_by_length=True), 0, 1, PAD)
    lengths = [n for b in batches for n in b["attention_mask"].sum(dim=1).tolist()]
    assert lengths == sorted(lengths, reverse=True)


# ----------------------------------------------------------------------------- chunked lm_head


@pytest.mark.parametrize("tuner, extra", [
    ("full", ()),
    ("lora", ("tuner.include_embeddings=true",)),  # a LoRA adapter on lm_head itself
    ("lora", ("hardware.gradient_checkpointing=true",)),
])
def test_chunked_head_equals_the_full_logits(tuner, extra):
    rows = synthetic_rows(6, seed=2, vocab=700, max_len=40)
    batches = [collate({k: v[i : i + 3] for k, v in rows.items()}, PAD) for i in (0, 3)]
    plain, r_plain = step_grads(batches, tuner, impl="logits", extra=extra)
    chunked, r_chunked = step_grads(batches, tuner, impl="chunked", extra=extra)
    assert r_chunked.loss == pytest.approx(r_plain.loss, rel=1e-6)
    assert_close_grads(chunked, plain, rtol=1e-4, atol=1e-7)
    if "tuner.include_embeddings=true" in extra:
        assert any("lm_head" in n and "lora_B" in n and g.abs().sum() > 0 for n, g in chunked.items())


def test_head_nll_chunks_do_not_change_the_result():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    (whole * torch.arange(23)).sum().backward()
    want = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    chunked = head_nll(head, hidden, targets, chunk=5)  # 5 chunks, the last one short
    (chunked * torch.arange(23)).sum().backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close((hidden.grad, head.weight.grad), want)


def test_a_frozen_head_takes_the_gradient_in_forward_path():
    """head_nll with a frozen plain head (FrozenHeadNLL: the hidden states' gradient computed in
    the forward) gives the losses and gradients of cross-entropy over the whole logits, for any
    upstream weights and chunking, in fp32 and (close to the checkpointed path) under bf16 autocast."""
    from agenttune.training import FrozenHeadNLL, frozen_plain_head

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    assert frozen_plain_head(head) and not frozen_plain_head(torch.nn.Linear(16, 50, bias=False))
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    upstream = torch.rand(23) * 3
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    (whole * upstream).sum().backward()
    want = hidden.grad.clone()
    hidden.grad = None
    fused = head_nll(head, hidden, targets, chunk=5)  # 5 chunks, the last one short
    assert fused.grad_fn is not None and type(fused.grad_fn).__name__ == "FrozenHeadNLLBackward"
    (fused * upstream).sum().backward()
    torch.testing.assert_close(fused, whole)
    torch.testing.assert_close(hidden.grad, want)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(FrozenHeadNLL.apply(hidden, head.weight, targets, 7), whole)

    got, ref = [], []
    for path, out in (("fused", got), ("checkpointed", ref)):
        hidden.grad = None
        head.weight.requires_grad_(path == "checkpointed")  # a trained head takes the checkpointed path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = head_nll(head, hidden, targets, chunk=5)
        (nll * upstream).sum().backward()
        out += [nll.detach(), hidden.grad.clone()]
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_a_micro_batch_without_trained_tokens_still_reaches_lm_head():
    """Zero loss, but lm_head gets a (zero) gradient: under DDP every parameter is all-reduced."""
    rows = synthetic_rows(2, seed=4, vocab=700)
    rows["labels"] = [[IGNORE] * len(x) for x in rows["labels"]]
    rows["weights"] = [[0.0] * len(x) for x in rows["weights"]]
    model = tiny("lora", ("tuner.include_embeddings=true",))
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    part = source_nll(accelerator, prepared, collate(rows, PAD), "chunked", 4096)
    assert part.tolist() == [0.0, 0.0]
    part.sum().backward()
    head = [p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert head and all(p.grad is not None and not p.grad.any() for p in head)


def test_liger_grouping_by_source_and_weight_equals_the_chunked_head():
    """The Liger path's decomposition (one summed CE per (source, weight) group), with a plain
    torch stand-in for the CUDA kernel: same sums, same gradients as head_nll."""
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 40, (30,))
    weights = torch.tensor([1.0, 2.0, 0.5] * 10)
    source = torch.tensor([0, 1] * 15)

    def sum_ce(h, w, t):
        return torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")

    grouped = liger_source_sums(head, hidden, targets, weights, source, sum_ce=sum_ce)
    grouped.sum().backward()
    got = grouped.detach(), hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    weighted = head_nll(head, hidden, targets, chunk=7) * weights
    direct = torch.stack([weighted[source == 0].sum(), weighted[source == 1].sum()])
    direct.sum().backward()
    torch.testing.assert_close(got, (direct.detach(), hidden.grad, head.weight.grad))


# ----------------------------------------------------------------------------- config


def test_packing_config_composes_and_validates():
    cfg = compose(FAST + ["train.packing=true", "train.max_tokens_per_batch=512", "loss.impl=logits"])
    assert (cfg.train.packing, cfg.train.max_tokens_per_batch, cfg.loss.impl) == (True, 512, "logits")
    assert not compose(FAST).train.packing and compose(FAST).loss.impl == "auto"
    with pytest.raises(ConfigError, match="train.group_by_length: applies to unpacked batches"):
        compose(FAST + ["train.packing=true", "train.group_by_length=true"])
    with pytest.raises(ConfigError, match="train.max_tokens_per_batch: must be >= 2"):
        compose(FAST + ["train.max_tokens_per_batch=1"])
    with pytest.raises(ConfigError, match="loss.impl: 'fused' is not one of"):
        compose(FAST + ["loss.impl=fused"])
    with pytest.raises(ConfigError, match="train.packing: hardware=zero2 uses DeepSpeed"):
        build_accelerator(HardwareConfig(name="zero2", strategy="deepspeed"), TrainConfig(packing=True))


def test_liger_on_cpu_says_why_not():
    model = tiny()
    accelerator = Accelerator(cpu=True)
    batch = collate(synthetic_rows(2, seed=0, vocab=700), PAD)
    with pytest.raises(ConfigError, match="loss.impl: liger runs Triton kernels on CUDA, not on cpu"):
        forward_backward(accelerator, accelerator.prepare(model), [batch], LossConfig(impl="liger"))


# ----------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_two_processes_packed_equal_one_process_padded(tmp_path, monkeypatch):
    """train.py under ``accelerate launch`` with 2 CPU ranks and packing (each rank packs its
    share; the counts differ before they are equalised) matches one padded process."""
    args = ["tuner.dropout=0", "train.max_steps=3", "train.global_batch_size=8", "train.lr=1e-3",
            "train.eval_steps=3", "train.save_steps=3"]
    data = {"train": 24, "eval": 5, "max_len": 48}
    _, one = train_in_process(args + [f"output_dir={tmp_path / 'one'}"], monkeypatch, data=data)
    packed = ["train.packing=true", "train.max_tokens_per_batch=64"]
    run_train(tmp_path, FAST + args + packed + [f"output_dir={tmp_path / 'two'}"], data=data, processes=2)
    (train1, eval1), (train2, eval2) = metrics(one), metrics(tmp_path / "two")
    assert [e["step"] for e in train2] == [1, 2, 3]
    for a, b in zip(train1, train2):
        for key in ("loss", "loss_agent", "loss_general", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        assert a["trained_tokens"] == b["trained_tokens"]
    assert eval2[0]["eval/loss"] == pytest.approx(eval1[0]["eval/loss"], rel=1e-5)


# ----------------------------------------------------------------------------- per-sample sdpa


def random_rows(lengths: list[int], seed: int) -> dict:
    rng = random.Random(seed)
    ids = [[rng.randrange(5, 700) for _ in range(n)] for n in lengths]
    return {"input_ids": ids, "labels": ids, "weights": [[1.0] * n for n in lengths], "source": [0, 1] * len(lengths)}


@pytest.mark.parametrize("extra", [(), ("hardware.gradient_checkpointing=true",)])
def test_per_sample_sdpa_equals_the_masked_row_and_its_gradients(extra):
    """packed_sdpa against transformers' sdpa with the block-diagonal mask, on a packed row of
    the tiny model (grouped-query attention: 4 heads, 2 key/value heads), samples of 1 token included."""
    row = pack({k: v[:6] for k, v in random_rows([17, 1, 40, 9, 1, 23], seed=3).items()})
    results = []
    for per_sample in (False, True):
        model = tiny("lora", ("model.attn_implementation=sdpa", *extra))
        if per_sample:
            assert use_packed_sdpa(model) and model.get_base_model().config._attn_implementation == PACKED_SDPA
        logits = model(**model_inputs(row)).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (masked, g_masked), (per, g_per) = results
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    torch.testing.assert_close(per, masked, rtol=1e-5, atol=1e-5)
    assert_close_grads(g_per, g_masked, rtol=1e-4, atol=1e-6)


def test_per_sample_sdpa_leaves_padded_batches_and_generation_to_sdpa(tmp_path):
    """Without sample boundaries packed_sdpa is sdpa: a left-padded batch (generation's layout)
    gives the same logits and the same greedy tokens."""
    rows = random_rows([12, 5, 9], seed=4)
    width = max(map(len, rows["input_ids"]))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows["input_ids"]])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows["input_ids"]])
    outputs = []
    for per_sample in (False, True):
        model = tiny(extra=("model.attn_implementation=sdpa",)).eval()
        if per_sample:
            assert use_packed_sdpa(model)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        outputs.append((logits[mask.bool()], tokens))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[1][1], outputs[0][1])


def test_per_sample_sdpa_is_not_saved_with_the_model(tmp_path):
    """A model trained with packed_sdpa saves a config.json that stock from_pretrained loads
    (in a process that never registered the name) with its usual attention."""
    model = tiny(extra=("model.attn_implementation=sdpa",))
    assert use_packed_sdpa(model)
    model.save_pretrained(tmp_path / "saved")
    assert PACKED_SDPA not in (tmp_path / "saved" / "config.json").read_text()
    script = (
        "import sys; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(m.config._attn_implementation)"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved")], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "sdpa"


def test_per_sample_sdpa_only_replaces_sdpa():
    """flash-attention has its own varlen kernel and eager was asked for by name: both stay."""
    model = tiny(extra=("model.attn_implementation=eager",))
    assert not use_packed_sdpa(model) and model.config._attn_implementation == "eager"


def test_train_py_switches_to_per_sample_sdpa_only_when_packing(tmp_path, monkeypatch):
    """What train.py runs with: the attention the model had during the step, seen by a forward hook."""
    seen = []

    def record(module, args, kwargs):
        seen.append((module.config._attn_implementation, "cu_seq_lens_q" in kwargs or "prefix_nodes" in kwargs))

    def build_and_watch(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    args = ["train.max_steps=1", "train.global_batch_size=4", "train.save_steps=1"]
    data = {"train": 8, "eval": 0, "max_len": 40}
    for packing in (True, False):
        seen.clear()
        train_in_process(args + [f"train.packing={packing}", f"output_dir={tmp_path / str(packing)}"],
                         monkeypatch, data=data, replace={"build_model": build_and_watch})
        assert seen and set(seen) == ({(PACKED_SDPA, True)} if packing else {("sdpa", False)})
    seen.clear()  # with shared prefixes the row's tree reaches the attention
    train_in_process(args + ["train.packing=true", "train.share_prefixes=true", f"output_dir={tmp_path / 'shared'}"],
                     monkeypatch, data=data, replace={"build_model": build_and_watch})
    assert seen and set(seen) == {(PACKED_SDPA, True)}
