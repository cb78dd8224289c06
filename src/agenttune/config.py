"""The typed config tree of ``train.py``.

These dataclasses are the schema, registered in Hydra's ConfigStore as ``train_schema``;
``conf/train.yaml`` and its groups (``model/``, ``data/``, ``tuner/``, ``hardware/``) only
select and override. Each default lives here once. Hydra rejects an unknown key while
composing (``Key 'foo' not in 'ModelConfig'``, ``full_key: model.foo``); bad values are
caught by ``__post_init__`` when :func:`to_config` builds the objects, and the message
names the key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import sys
import textwrap
import typing
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from agenttune.data.options import DataConfig

TEMPLATES = ("qwen", "llama3", "react", "chatml", "chatml_compact", "chatml_kv")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TUNERS = ("lora", "dora", "qlora", "full")
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
STRATEGIES = ("ddp", "deepspeed", "fsdp")
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
ON_NONFINITE = ("stop", "skip")
SAMPLERS = ("shuffle", "balanced")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")
LOSS_IMPLS = ("auto", "chunked", "logits", "liger")
WANDB_MODES = ("online", "offline", "disabled")

class ConfigError(ValueError):
    """A bad value in the config, phrased with the full key that holds it."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(key: str, value, allowed) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Short name, used in the default output_dir."""
    path: str = "tiny"
    """A local directory or hub id; ``tiny`` (a random-init Qwen2 built offline, see agenttune.tiny);
    or ``python-package:NAME``, the directory of an installed Python package (one that ships a GGUF)."""
    gguf_file: str | None = None
    """A GGUF file inside ``path`` to load (transformers de-quantizes it)."""
    gguf_cache: bool = True
    """Keep the de-quantized GGUF as an ordinary checkpoint under ``$AGENTTUNE_CACHE/gguf/`` (made at
    the first load, one per load dtype: 4 bytes a parameter in float32, 2 in bfloat16), so later
    loads skip transformers' de-quantization (SmolLM2-135M: 19 s against under 1 s on 2 CPU cores).
    The weights are the ones the GGUF gives, bit for bit. false: de-quantize at every load."""
    template: str = "qwen"
    """Chat template the data is rendered with and that is saved with the final model."""
    dtype: str = "auto"
    """Weights dtype at load. auto, in train.py: bfloat16 for adapter tuners under bf16 mixed
    precision (the frozen base needs no fp32 master copy), float32 otherwise. auto, in infer.py:
    bfloat16 on a GPU that has it; on a CPU float32, or bfloat16 for a run that trained under bf16
    autocast where this CPU multiplies bf16 faster (agenttune.cpu.bf16_is_faster)."""
    trust_remote_code: bool = False
    """Run modeling code shipped with the checkpoint. Off unless you trust its author."""
    attn_implementation: str | None = None
    """sdpa, eager, flash_attention_2; None lets transformers choose."""

    def __post_init__(self) -> None:
        _one_of("model.template", self.template, TEMPLATES)
        _one_of("model.dtype", self.dtype, DTYPES)
        _require(bool(self.path) and self.path != "???", "model.path", "set it to a model directory")


@dataclass
class TunerConfig:
    name: str = "lora"
    """lora, dora (weight-decomposed LoRA), qlora (LoRA over a 4-bit NF4 base, CUDA only) or full."""
    r: int = 8
    """LoRA rank: the inner dimension of each adapter's two matrices."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on each adapter's input while training."""
    target_modules: str = "all-linear"
    """all-linear (every linear layer but the output head), or comma-separated module names
    (quoted on the command line: tuner.target_modules='q_proj,v_proj'); each must name a layer."""
    include_embeddings: bool = False
    """Also adapt the input embeddings and lm_head, as ms-swift's ``ALL`` target does."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices learn this many times faster than the A matrices (e.g. 16)."""
    top_layers: int = 0
    """Train only the last N decoder layers; 0 trains all. Adapter tuners adapt just those (PEFT
    ``layers_to_transform``); tuner=full trains their full weights and freezes everything else,
    embeddings, final norm and output head included (LLaMA-Factory's freeze tuning). Backward then
    stops at the lowest trained layer, so a step costs less: 1.5x the steps per second with 12 of
    SmolLM2-135M's 30 layers on a 2-core CPU (the demo, BENCHMARKS.md)."""
    freeze: list[str] = field(default_factory=list)
    """tuner=full: parameters kept at their loaded values, by name prefix as ``model.named_parameters()``
    spells them (e.g. ``[model.embed_tokens]``, ``[model.layers.0., model.layers.1.]``)."""

    def __post_init__(self) -> None:
        _one_of("tuner.name", self.name, TUNERS)
        _require(self.r >= 1, "tuner.r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, "tuner.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "tuner.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.target_modules.strip()), "tuner.target_modules", "must name modules or be all-linear")
        if self.loraplus_lr_ratio is not None:
            _require(self.loraplus_lr_ratio > 0, "tuner.loraplus_lr_ratio", f"must be > 0, got {self.loraplus_lr_ratio}")
            _require(self.name != "full", "tuner.loraplus_lr_ratio", "applies to LoRA tuners, not tuner=full")
        _require(self.top_layers >= 0, "tuner.top_layers", f"must be >= 0, got {self.top_layers}")
        if self.top_layers:
            _require(not self.include_embeddings, "tuner.top_layers",
                     "adapts decoder layers only; it cannot be combined with tuner.include_embeddings")
        if self.freeze:
            _require(self.name == "full", "tuner.freeze", "applies to tuner=full; adapter tuners freeze the whole base")
            _require(all(isinstance(x, str) and x.strip() for x in self.freeze), "tuner.freeze",
                     f"must be a list of parameter-name prefixes, got {list(self.freeze)!r}")

    @property
    def uses_adapter(self) -> bool:
        return self.name != "full"


@dataclass
class HardwareConfig:
    name: str = "cpu"
    """The profile's name (conf/hardware/NAME.yaml), used in messages."""
    mixed_precision: str = "no"
    """no, bf16 or fp16: Accelerate's autocast; weights stay fp32 unless model.dtype says otherwise.
    auto: bf16 on a GPU that has it (else fp16); on a CPU, bf16 only where a start-up probe
    measures bf16 matmuls at least 1.2x as fast as fp32's, else no (CPUs differ: with AMX or
    AVX-512 BF16 kernels bf16 is 2-3x faster, without them slower)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% more compute."""
    strategy: str = "ddp"
    """ddp: plain data parallel, as many processes as ``accelerate launch`` starts (one is fine);
    deepspeed: ZeRO at ``zero_stage``; fsdp: PyTorch FSDP2."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, for strategy=deepspeed."""
    num_processes: int = 1
    """Processes this profile is written for. A run launched with another count warns."""
    num_machines: int = 1
    """Machines this profile is written for. A run launched over another count warns."""

    def __post_init__(self) -> None:
        _one_of("hardware.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _one_of("hardware.strategy", self.strategy, STRATEGIES)
        _one_of("hardware.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _require(self.num_processes >= 1, "hardware.num_processes", f"must be >= 1, got {self.num_processes}")
        _require(self.num_machines >= 1, "hardware.num_machines", f"must be >= 1, got {self.num_machines}")


@dataclass
class TrainConfig:
    """The loop and the optimizer. Defaults follow ms-swift's agent recipe."""

    epochs: float = 2.0
    """Passes over the training data (fractions allowed) when max_steps is not set."""
    max_steps: int = -1
    """Optimizer steps to run. > 0 overrides epochs."""
    max_minutes: float = 0.0
    """A time budget: stop after the step at which one more would end past this many minutes of
    training (the loop's wall clock, evaluations and saves included, summed over resumes), with
    the final evaluation and save as at any last step. The learning rate then follows the run's
    progress, max(step / step limit, time / budget), so warm-up and decay fit the steps that the
    machine manages. 0: no budget. The step limit (max_steps or epochs) still applies."""
    micro_batch_size: int = 2
    """Samples per forward pass on one process."""
    global_batch_size: int = 32
    """Samples per optimizer step over all processes; the rest is gradient accumulation."""
    lr: float = 5e-5
    """Peak learning rate of AdamW, reached after the warm-up."""
    weight_decay: float = 0.1
    """Applied to matrices only; biases and norm weights are never decayed."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's β₁ and β₂."""
    eps: float = 1e-8
    """AdamW's ε."""
    optimizer_impl: str = "auto"
    """How torch's AdamW runs its update (the same arithmetic each way). fused: one kernel over
    all parameters (CPU, CUDA); foreach: batched per-op kernels; for_loop: one parameter at a
    time. auto: fused where the run is plain data parallel (hardware.strategy ddp, one process or
    many) with the trained weights on CPU or CUDA, as the HF Trainer's default adamw_torch_fused;
    elsewhere (DeepSpeed and FSDP hand the optimizer sharded parameters) torch's own default."""
    neftune_alpha: float = 0.0
    """NEFTune: uniform noise in ±alpha/sqrt(L·d) added to the input embeddings while training (L the
    sample's own length, in a packed row too; d the hidden size). 0: off. The paper's values are
    5-15; LLaMA-Factory, TRL and ms-swift call it neftune_noise_alpha. See modeling.add_neftune."""
    max_grad_norm: float = 0.5
    """Clip the global gradient norm to this; <= 0 disables clipping (the norm is still logged)."""
    scheduler: str = "cosine"
    """The learning rate after the warm-up: cosine or linear decay to 0, or constant_with_warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    eval_steps: int = 100
    """Evaluate every this many optimizer steps, and at the last step."""
    save_steps: int = 100
    """Save a checkpoint every this many optimizer steps, and whenever eval/loss improves; the
    last step's weights also go to final/."""
    save_total_limit: int = 2
    """Newest checkpoints kept, plus the best one by eval/loss."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a lower eval/loss. 0 disables."""
    log_steps: int = 1
    """Log the training metrics (metrics.jsonl, W&B, the progress bar) every this many optimizer steps."""
    on_nonfinite: str = "stop"
    """stop: raise when the loss or gradient norm is NaN/inf; skip: drop that update and go on."""
    seed: int = 42
    """Seeds the new weights (adapters: the same on every process), the row order, and dropout
    (per process); a resumed run restores each process's random state from its checkpoint."""
    sampler: str = "shuffle"
    """The row order of an epoch. shuffle: a uniform shuffle, so a step's agent/general mix
    varies around the data's (8 samples of a half-and-half mix: 4 ± 1.4 agent). balanced: each
    sampling group is spread evenly over the epoch, so every stretch of steps holds each group in
    proportion to its size. The groups are the sources (agent, general), split further by the
    values of a dataset's ``balance_by`` fields (e.g. the task of each record). Either way an
    epoch visits every row once, and the order is a pure function of the seed."""
    packing: bool = False
    """Concatenate each process's share of a step into micro-batches of at most
    max_tokens_per_batch tokens (best-fit decreasing), with no padding. Samples never attend to
    each other (position ids restart per sample). The micro-batch count then varies per step,
    the same on every rank; micro_batch_size only sizes eval batches. Not with DeepSpeed."""
    max_tokens_per_batch: int = 4096
    """With packing: tokens in one micro-batch (one packed row). Must hold the longest sample."""
    share_prefixes: bool = False
    """With packing: lay out once the untrained prefix that samples of a row have in common (the
    system turn, the tool listing), as a prefix tree the attention follows; the loss is the same
    up to float rounding. Needs sdpa attention (not flash-attention, whose varlen kernel knows no
    trees): the demo's rows are about 18% shorter."""
    group_by_length: bool = False
    """Without packing: sort each process's share of a step by length before cutting it into
    micro_batch_size pieces, so similar lengths share a batch and padding drops."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "global_batch_size", "eval_steps", "save_steps", "log_steps"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.epochs > 0 or self.max_steps > 0, "train.epochs", "set epochs > 0 or train.max_steps > 0")
        _require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", f"must be -1 or > 0, got {self.max_steps}")
        _require(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
                 f"{self.global_batch_size} is not a multiple of train.micro_batch_size={self.micro_batch_size}")
        _require(self.max_minutes >= 0, "train.max_minutes", f"must be >= 0 (0: no time budget), got {self.max_minutes}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.neftune_alpha >= 0, "train.neftune_alpha", f"must be >= 0 (0: off), got {self.neftune_alpha}")
        _require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                 f"must be two numbers in [0, 1), got {list(self.betas)}")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(self.save_total_limit >= 1, "train.save_total_limit", f"must be >= 1, got {self.save_total_limit}")
        _require(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
        _one_of("train.scheduler", self.scheduler, SCHEDULERS)
        _one_of("train.on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        _one_of("train.sampler", self.sampler, SAMPLERS)
        _one_of("train.optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        _require(self.max_tokens_per_batch >= 2, "train.max_tokens_per_batch", f"must be >= 2, got {self.max_tokens_per_batch}")
        _require(not (self.packing and self.group_by_length), "train.group_by_length",
                 "applies to unpacked batches; with train.packing=true the bins are already filled by length")
        _require(self.packing or not self.share_prefixes, "train.share_prefixes",
                 "shares prefixes inside packed rows: set train.packing=true too")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches each process runs per optimizer step."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size}) x processes ({world_size})"
            )
        return self.global_batch_size // per_step

    def total_steps(self, num_samples: int) -> int:
        """Optimizer steps in the run: max_steps, or enough to see ``epochs`` passes of the data."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.epochs * num_samples / self.global_batch_size))

    def warmup_steps(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps)


@dataclass
class LossConfig:
    lambda_agent: float = 0.2
    """λ in L = λ·L_agent + (1-λ)·L_general (AgentTuning's η; 0.2 was its best). Independent of the
    sampling mix. A step whose tokens all come from one source trains on that source alone:
    the weights are renormalised over the sources present (see agenttune.training.source_scales)."""
    ce_chunk_tokens: int = 4096
    """Cross-entropy is computed this many positions at a time, so the fp32 upcast of the
    logits never exists for the whole batch at once."""
    impl: str = "auto"
    """How the output layer and cross-entropy run. chunked: the model stops at its hidden states;
    lm_head and CE run on the trained positions only, ce_chunk_tokens at a time, each chunk
    recomputed in backward, so no (B, T, V) logits exist. logits: the model's lm_head returns
    all logits (B, T, V). liger: Liger-Kernel's fused linear cross-entropy (CUDA, pip install
    liger-kernel, plain nn.Linear lm_head). auto: chunked, or logits under FSDP and ZeRO-3,
    whose lm_head weight exists whole only inside the model's forward."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.lambda_agent <= 1.0, "loss.lambda_agent", f"must be in [0, 1], got {self.lambda_agent}")
        _require(self.ce_chunk_tokens >= 1, "loss.ce_chunk_tokens", f"must be >= 1, got {self.ce_chunk_tokens}")
        _one_of("loss.impl", self.impl, LOSS_IMPLS)


@dataclass
class WandbConfig:
    mode: str | None = None
    """online, offline or disabled. None: $WANDB_MODE if set, else online with WANDB_API_KEY, else offline."""
    project: str = "agenttune"
    """W&B project the run is logged to."""
    entity: str | None = None
    """W&B team or user; None: the API key's default entity."""
    name: str | None = None
    """Run name; None uses the output_dir's name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags of the run."""

    def __post_init__(self) -> None:
        if self.mode is not None:
            _one_of("wandb.mode", self.mode, WANDB_MODES)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "outputs/${model.name}-${tuner.name}"
    """Everything the run writes: checkpoints/, final/, metrics.jsonl, loss.png, Hydra's .hydra/.
    Hydra's run dir is pinned to it so every rank agrees (a timestamped default would not)."""
    resume: str | None = None
    """None: start fresh (refuses an output_dir that already has checkpoints); auto: continue from
    the newest loadable checkpoint in output_dir, or start fresh if there is none; or a checkpoint dir."""

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "output_dir", "must be set")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), by field name;
    none where the source is not installed (--help then shows the keys undocumented)."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):
        return {}
    return {
        node.target.id: inspect.cleandoc(doc.value.value)
        for node, doc in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
    }


def keys_help(cls: type, prefix: str = "") -> str:
    """Every key of a config dataclass with its docstring, nested dataclasses flattened into
    dotted keys (``model.path``); the fields of a list's items read ``data.datasets[i].path``."""
    hints, docs, parts = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list and typing.get_args(kind) else None
        if dataclasses.is_dataclass(kind):
            parts.append(keys_help(kind, key + "."))
        elif item is not None and dataclasses.is_dataclass(item):
            parts.append(f"{key}\n{textwrap.indent(docs.get(f.name, 'a list of:'), '    ')}")
            parts.append(keys_help(item, key + "[i]."))
        else:
            parts.append(f"{key}\n{textwrap.indent(docs.get(f.name, '(undocumented)'), '    ')}")
    return "\n".join(parts)


def register_help(name: str, script: str, usage: str, schema: type, groups: str = "group=option") -> None:
    """``hydra/help=<name>``: the script's ``--help`` prints its usage, the config groups (Hydra
    lists every group under conf/; ``groups`` heads the list), every key of ``schema`` with its
    docstring, then the config composed from the command line."""
    keys = keys_help(schema).replace("$", "$$").replace("$${", "$\\${")  # string.Template, then OmegaConf
    template = (f"{usage.strip()}\n\n== Config groups ({groups}) ==\n$APP_CONFIG_GROUPS\n\n"
                f"== Keys (key=value) ==\n{keys}\n\n== The config these arguments compose ==\n$CONFIG")
    ConfigStore.instance().store(group="hydra/help", name=name,
                                 node={"app_name": script, "header": "", "footer": "", "template": template})


TRAIN_USAGE = """
train.py: fine-tune a chat model into a tool-using agent, L = λ·L_agent + (1-λ)·L_general.

    python train.py                                   # tiny model, demo data, LoRA, CPU
    python train.py experiment=demo                   # the README's demo: SmolLM2-135M on the synthetic world
    accelerate launch train.py model=qwen7b tuner=lora hardware=8gpu
    python train.py output_dir=runs/a resume=auto     # continue after a crash
    python train.py -m sweep=local                    # a Hydra multirun sweep (sweep=slurm on a cluster)

Arguments are Hydra overrides: group=option picks a file under conf/, key=value sets one key.
An unknown key or a bad value stops at start with a message naming the key.
"""


def register_configs() -> None:
    """Make ``train_schema`` and its ``--help`` available to ``conf/train.yaml``'s defaults list."""
    ConfigStore.instance().store(name="train_schema", node=Config)
    register_help("agenttune_train", "train.py", TRAIN_USAGE, Config)


register_configs()


def on_rank_zero(value):
    """``${on_rank_zero:.hydra}``: the value in the first process of a job, None in the others.
    Under sweep=slurm every Slurm task runs Hydra's job code (which writes ``.hydra/``); this
    keeps those writes to rank 0. RANK (torchrun) wins over SLURM_PROCID (one srun task each)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return value if rank == "0" else None


if not OmegaConf.has_resolver("on_rank_zero"):
    OmegaConf.register_new_resolver("on_rank_zero", on_rank_zero, use_cache=False)


def _reject_unknown_keys(node, path: str) -> None:
    """Hydra's ``+key=value`` can add keys the schema lacks; refuse them rather than ignore them."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _reject_unknown_keys(item, f"{path}.{i}")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known:
            raise ConfigError(f"{full}: unknown key (the schema {schema.__name__} has {', '.join(sorted(known))})")
        _reject_unknown_keys(node._get_node(key), full)


class CheckOutputDir(Callback):
    """Hydra creates the run's directory (train.py pins hydra.run.dir to output_dir) before the
    script's main() runs, and one it cannot create (a path under a file, no permission) ends in
    Hydra's own traceback. Registered in conf/train.yaml's hydra.callbacks, this creates it
    first and, if it cannot, says which key to change."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _create_dir("output_dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _create_dir("hydra.sweep.dir", config.hydra.sweep.dir)


def _create_dir(key: str, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        script = os.path.basename(sys.argv[0]) or "agenttune"
        print(f"{script}: error: {key}: cannot create the directory {path} ({e.strerror}: {e.filename}); "
              "set it to a directory you can write", file=sys.stderr)
        sys.exit(1)


def to_config(cfg: DictConfig) -> Config:
    """Resolve a composed DictConfig and build the typed tree, naming the group of a bad value."""
    _reject_unknown_keys(cfg, "")
    parts = {}
    for f in dataclasses.fields(Config):
        node = cfg[f.name]
        try:
            parts[f.name] = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # raised by DataConfig & co., which do not know their group
            raise ConfigError(f"{_failing_item(node, f.name)}: {e}") from e
    return Config(**parts)


def _failing_item(node, path: str) -> str:
    """The deepest part of ``node`` whose checks fail (data.supervision, data.datasets.1), so the
    message names it; ``path`` itself when no part fails alone."""
    children = node.items() if isinstance(node, DictConfig) else enumerate(node) if isinstance(node, ListConfig) else ()
    for key, _ in children:
        child = node._get_node(key)
        if isinstance(child, ListConfig):
            found = _failing_item(child, f"{path}.{key}")
            if found != f"{path}.{key}":
                return found
        elif isinstance(child, DictConfig):
            try:
                OmegaConf.to_object(child)
            except (ValueError, TypeError):
                return _failing_item(child, f"{path}.{key}")
    return path
