"""One timed training run: our loop (the functions train.py calls) or TRL's SFTTrainer, on the
same model, data, batch and LoRA. ``python -m agenttune.bench`` starts one of these per
(loop, layout) in a fresh process and compares them; see its --help.

What is counted, identically for both loops, by a hook on the model's forward:
  positions   input positions the model computed, padding included
  tokens      real input tokens (positions minus padding)
  trained     tokens with a loss (labels != -100 after the shift), from each loop's own count
and, per sample, its length n, for the attention term of the FLOP count.

MFU = achieved model FLOP/s / the device's peak dense bf16 FLOP/s, with model FLOPs per step
    6 · N · tokens + 6 · L · d · Σ n²
N is every parameter that takes part in a matmul (all but the input embedding; lm_head counted
even when tied), L the layers, d = heads x head_dim, n each sample's length (causal attention,
forward + backward, samples never attending to each other). This is the usual convention
(PaLM, nanoGPT): it counts the weight gradients of frozen base weights that LoRA never
computes, and not the recomputation under gradient checkpointing. No MFU without a known peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULT_PREFIX = "BENCH-RESULT "
LAYOUTS = ("padded", "grouped", "packed")

# Real sizes of the published configs, built with random weights (nothing is downloaded).
ARCHS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; first match wins.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1))


@dataclass
class Workload:
    """Everything a run needs; the same object goes to both loops."""

    overrides: list[str] = field(default_factory=list)
    """Hydra overrides of train.py's config (model=, tuner=, hardware=, train.*, loss.*)."""
    layout: str = "padded"
    arch: str | None = None
    data: str = "config"
    """config: the data group of the composed config through the real pipeline; synthetic: random tokens."""
    samples: int = 512
    seq_len: int = 2048
    steps: int = 30
    warmup: int = 3
    trl_accumulation: int | None = None
    """TRL's gradient_accumulation_steps for packed rows; None: our accumulation steps."""
    peak_tflops: float | None = None


# ----------------------------------------------------------------------------- workload


def conf_dir() -> Path:
    conf = Path(__file__).resolve().parents[3] / "conf"
    if not (conf / "train.yaml").is_file():
        raise SystemExit(f"no conf/train.yaml next to the package ({conf}): run the benchmark from a source checkout")
    return conf


def compose_config(overrides: list[str]):
    """The typed Config that ``python train.py <overrides>`` would run with
    (``hardware.mixed_precision=auto`` resolved as train.py resolves it)."""
    from dataclasses import replace

    from hydra import compose, initialize_config_dir

    from agenttune.config import to_config
    from agenttune.training import resolve_mixed_precision

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = to_config(compose("train", overrides=overrides))
    return replace(cfg, hardware=resolve_mixed_precision(cfg.hardware))


def layout_overrides(layout: str) -> list[str]:
    return {
        "padded": ["train.packing=false", "train.group_by_length=false"],
        "grouped": ["train.packing=false", "train.group_by_length=true"],
        "packed": ["train.packing=true", "train.group_by_length=false"],
    }[layout]


def arch_dir(arch: str) -> Path:
    """A model directory for ``arch``: its config, the tiny tokenizer, and a checkpoint holding
    only the final norm, so that from_pretrained (inside build_model) initialises every other
    weight randomly. Built once into the agenttune cache."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    from agenttune.tiny import cache_dir, tiny_tokenizer_dir

    target = cache_dir() / f"bench-{arch}-v1"
    if target.exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    sizes = ARCHS[arch]
    config = Qwen2Config(**sizes, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({"model.norm.weight": torch.ones(sizes["hidden_size"])}, tmp / "model.safetensors", metadata={"format": "pt"})
    try:
        os.rename(tmp, target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_dataset(samples: int, seq_len: int, vocab: int, seed: int):
    """Rows with the pipeline's columns: lengths uniform in [seq_len/8, seq_len], the first 60%
    of each a prompt (untrained), the rest trained at weight 1; agent and general alternate."""
    import datasets

    rng = random.Random(seed)
    rows = {"input_ids": [], "labels": [], "weights": [], "source": [], "length": []}
    for i in range(samples):
        n = rng.randint(max(2, seq_len // 8), seq_len)
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        prompt = max(1, int(0.6 * n))
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * prompt + ids[prompt:])
        rows["weights"].append([0.0] * prompt + [1.0] * (n - prompt))
        rows["source"].append(i % 2)
        rows["length"].append(n)
    return datasets.Dataset.from_dict(rows)


def build_workload(work: Workload):
    """(cfg, tokenizer, training rows) of a workload."""
    from agenttune.modeling import build_tokenizer

    overrides = list(work.overrides)
    if work.arch:
        overrides += [f"model.path={arch_dir(work.arch)}", f"model.name={work.arch}"]
    cfg = compose_config(overrides + layout_overrides(work.layout))
    tokenizer = build_tokenizer(cfg.model)
    if work.data == "synthetic":
        return cfg, tokenizer, synthetic_dataset(work.samples, work.seq_len, len(tokenizer), cfg.train.seed)
    from agenttune.data.pipeline import build_datasets

    return cfg, tokenizer, build_datasets(cfg.data, cfg.model.template, tokenizer).train


# ----------------------------------------------------------------------------- measuring


def matmul_params(model) -> int:
    """Parameters that take part in a matmul: all but the input embedding; lm_head counted
    even when it shares the embedding's weight."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    if head_weight is None:  # a LoRA-wrapped lm_head keeps the original as base_layer
        head_weight = head.base_layer.weight
    return total - embedding.numel() + (head_weight.numel() if head_weight is embedding else 0)


class Meter:
    """Counts what the model's forward receives between start() and stop(), and times it."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.positions = self.tokens = self.trained = self.squares = 0
        self.seconds = self.cpu_seconds = 0.0
        self._t0 = self._cpu0 = None
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if self._t0 is None or not torch.is_grad_enabled():
            return
        ids = kwargs["input_ids"]
        self.positions += ids.numel()
        if kwargs.get("attention_mask") is not None:
            lengths = kwargs["attention_mask"].sum(dim=1)
        else:  # padding-free: one row, samples start where the position ids restart
            starts = torch.nonzero(kwargs["position_ids"][0] == 0).flatten().tolist() + [ids.shape[1]]
            lengths = torch.tensor([b - a for a, b in itertools.pairwise(starts)])
        self.tokens += int(lengths.sum())
        self.squares += int((lengths.long() ** 2).sum())
        if kwargs.get("labels") is not None:  # TRL passes labels; our loop counts its own
            self.trained += int((kwargs["labels"][:, 1:] != -100).sum())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._cpu0
        self._t0 = None


def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def report(loop: str, work: Workload, cfg, model, meter: Meter, device, micro_batches_per_step: float) -> dict:
    config = model.config
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_dim = config.num_attention_heads * head_dim
    n_params = matmul_params(model)
    flops = 6 * n_params * meter.tokens + 6 * layers * attn_dim * meter.squares
    bf16 = cfg.hardware.mixed_precision == "bf16" or next(model.parameters()).dtype == torch.bfloat16
    peak = peak_tflops(device, bf16, work.peak_tflops)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    achieved = flops / meter.seconds
    return {
        "loop": loop, "layout": work.layout, "model": work.arch or cfg.model.name, "device": device_name(device),
        "timed_steps": work.steps - work.warmup, "seconds": round(meter.seconds, 3),
        "cpu_seconds": round(meter.cpu_seconds, 3),  # all threads of this process: less sensitive to a busy machine
        "tokens": meter.tokens, "trained_tokens": meter.trained, "positions": meter.positions,
        "tokens_per_s": round(meter.tokens / meter.seconds, 1),
        "trained_tokens_per_s": round(meter.trained / meter.seconds, 1),
        "padding_fraction": round(1 - meter.tokens / meter.positions, 4),
        "micro_batches_per_step": round(micro_batches_per_step, 2),
        "peak_mem_gib": round(peak_mem, 3), "peak_mem_kind": "allocated" if device.type == "cuda" else "process RSS",
        "matmul_params": n_params, "achieved_tflops": round(achieved / 1e12, 4),
        "peak_tflops": peak, "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
    }


# ----------------------------------------------------------------------------- the two loops


def run_ours(work: Workload) -> dict:
    """train.py's step, without eval, logging or checkpoints."""
    from accelerate.utils import set_seed

    from agenttune.attention import use_packed_sdpa
    from agenttune.modeling import build_model
    from agenttune.training import (
        build_accelerator,
        build_optimizer,
        build_scheduler,
        clip_gradients,
        forward_backward,
        micro_batches,
    )

    cfg, tokenizer, dataset = build_workload(work)
    accelerator = build_accelerator(cfg.hardware, cfg.train)
    if accelerator.num_processes != 1:
        raise SystemExit("the benchmark runs one process; its tokens/s are per device")
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    if cfg.train.packing:
        use_packed_sdpa(model)  # as train.py does
    optimizer = build_optimizer(model, cfg.train, cfg.tuner.loraplus_lr_ratio)
    scheduler = build_scheduler(optimizer, cfg.train, work.steps, 1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    meter = Meter(accelerator.unwrap_model(model), accelerator.device)
    model.train()
    counts = []
    for step in range(work.steps):
        if step == work.warmup:
            meter.start()
        batches = micro_batches(dataset, step, cfg.train, 0, 1, tokenizer.pad_token_id)
        result = forward_backward(accelerator, model, batches, cfg.loss)
        clip_gradients(accelerator, model, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= work.warmup:
            meter.trained += result.trained_tokens
            counts.append(len(batches))
    meter.stop()
    return report("ours", work, cfg, accelerator.unwrap_model(model), meter, accelerator.device, sum(counts) / len(counts))


def run_trl(work: Workload) -> dict:
    """TRL's SFTTrainer on the same tokenized rows: ``input_ids`` and ``labels`` (-100 where
    our pipeline trains nothing), so both loops train exactly the same tokens. Same model
    (build_model), optimizer and schedule (ours, handed over), micro-batch and accumulation;
    packed: TRL's bfd packing into rows of train.max_tokens_per_batch, padding-free."""
    from accelerate.utils import set_seed
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from agenttune.modeling import build_model
    from agenttune.training import build_optimizer, build_scheduler

    cfg, tokenizer, dataset = build_workload(work)
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    optimizer = build_optimizer(model, cfg.train, cfg.tuner.loraplus_lr_ratio)
    scheduler = build_scheduler(optimizer, cfg.train, work.steps, 1)
    packed = work.layout == "packed"
    accumulation = cfg.train.accumulation_steps(1)
    if packed:
        accumulation = work.trl_accumulation or accumulation
    out = tempfile.mkdtemp(prefix="agenttune-bench-trl-")
    args = SFTConfig(
        output_dir=out, max_steps=work.steps, seed=cfg.train.seed, report_to="none", save_strategy="no",
        logging_steps=work.steps, disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=1 if packed else cfg.train.micro_batch_size,
        gradient_accumulation_steps=accumulation, max_grad_norm=cfg.train.max_grad_norm,
        bf16=cfg.hardware.mixed_precision == "bf16", fp16=cfg.hardware.mixed_precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.hardware.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=cfg.train.max_tokens_per_batch if packed else None,  # None: no truncation, like ours
        packing=packed, packing_strategy="bfd",
        train_sampling_strategy="group_by_length" if work.layout == "grouped" else "random",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.select_columns(["input_ids", "labels"]),
                         processing_class=tokenizer, optimizers=(optimizer, scheduler))
    meter = Meter(trainer.model, trainer.args.device)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == work.warmup:
                meter.start()
            elif state.global_step == work.steps:
                meter.stop()

    trainer.add_callback(Clock())
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return report("trl", work, cfg, trainer.model, meter, trainer.args.device, accumulation)


def main(argv=None) -> None:
    """Child entry point: ``python -m agenttune.bench.throughput {ours,trl} WORKLOAD_JSON``."""
    parser = argparse.ArgumentParser(prog="python -m agenttune.bench.throughput")
    parser.add_argument("loop", choices=("ours", "trl"))
    parser.add_argument("workload", help="a Workload as JSON")
    args = parser.parse_args(argv)
    work = Workload(**json.loads(args.workload))
    if work.warmup >= work.steps:
        raise SystemExit(f"--warmup ({work.warmup}) must be below --steps ({work.steps})")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the arch checkpoints' MISSING-weights report is expected
    result = (run_ours if args.loop == "ours" else run_trl)(work)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def workload_json(work: Workload) -> str:
    return json.dumps(asdict(work))


if __name__ == "__main__":
    main()
