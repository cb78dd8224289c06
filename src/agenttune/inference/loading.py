"""Load what ``infer.py`` talks to: a base model, a base model plus a run's adapter (its
``final/`` or a ``checkpoints/step-N``), or a merged/standalone directory, with the chat
template the model was trained with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from agenttune.config import ModelConfig
from agenttune.cpu import bf16_is_faster
from agenttune.data.templates import TEMPLATES, Template, get_template
from agenttune.inference.config import InferConfig
from agenttune.merging import MergeError, attach_adapter, find_run_config, load_base, read_run_config
from agenttune.modeling import build_tokenizer, resolve_model_path
from agenttune.training import load_trainable

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """The model, adapter or run could not be loaded; the message says what to fix."""


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    template: Template
    name: str
    """What the model is called in logs, tables and /v1/models."""
    has_adapter: bool


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LoadError("device=cuda but no CUDA GPU is visible; use device=cpu")
    return torch.device(device)


def inference_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # CPU half precision is slow and lossy


def template_of(tokenizer, fallback: str) -> str:
    """The template a directory was exported with (train.py's final/, merge.py's output both save
    our Jinja as the tokenizer's chat_template), else ``fallback``."""
    for name, template in TEMPLATES.items():
        if tokenizer.chat_template == template.chat_template:
            return name
    return fallback


def load_for_inference(cfg: InferConfig) -> Loaded:
    device = pick_device(cfg.device)
    try:
        if cfg.adapter:
            loaded = _load_run(Path(cfg.adapter), cfg, device)
        else:
            loaded = _load_plain(cfg.model, cfg, device)
    except MergeError as err:
        raise LoadError(str(err)) from None
    loaded.model.to(device).eval()
    loaded.model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    loaded.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    log.info("loaded %s (template %s) on %s", loaded.name, loaded.template.name, device)
    return loaded


def load_run_base(cfg: InferConfig, template: str) -> Loaded:
    """The model the run at ``cfg.adapter`` started from (its saved config's model), rendered with
    ``template``: the "before" of a tuner=full run."""
    run_config = find_run_config(Path(cfg.adapter))
    model_cfg, _ = read_run_config(run_config)
    model_cfg = with_asked_dtype(model_cfg, cfg, run_config)
    return load_for_inference(replace(cfg, adapter=None, model=model_cfg, template=template))


def with_asked_dtype(run_model: ModelConfig, cfg: InferConfig, run_config: Path) -> ModelConfig:
    """The run's model section, with the dtype inference runs it in: the one ``model.dtype=``
    asks for; with auto the run's own (usually auto too: float32 on a CPU, bf16 on a GPU that has
    it), except that a run whose matmuls trained under bf16 autocast runs in bf16 on a CPU that
    multiplies bf16 faster than float32 (agenttune.cpu.bf16_is_faster)."""
    if cfg.model.dtype != "auto":
        return replace(run_model, dtype=cfg.model.dtype)
    if run_model.dtype == "auto" and pick_device(cfg.device).type == "cpu" and trained_in_bf16(run_config):
        faster, speeds = bf16_is_faster()
        log.info("model.dtype=auto: %s, for a run that trained under bf16 autocast (this CPU multiplies bf16 "
                 "at %.0f GFLOP/s, fp32 at %.0f)", "bfloat16" if faster else "float32", speeds["bf16"], speeds["fp32"])
        if faster:
            return replace(run_model, dtype="bfloat16")
    return run_model


def trained_in_bf16(run_config: Path) -> bool:
    return OmegaConf.select(OmegaConf.load(run_config), "hardware.mixed_precision") == "bf16"


def _load_plain(model_cfg: ModelConfig, cfg: InferConfig, device: torch.device) -> Loaded:
    path = resolve_model_path(model_cfg.path)
    model = load_base(model_cfg, inference_dtype(model_cfg, device), False, f"model.path={model_cfg.path}")
    tokenizer = build_tokenizer(model_cfg)
    template = cfg.template or template_of(tokenizer, model_cfg.template)
    return Loaded(model, tokenizer, get_template(template), model_cfg.name if model_cfg.path in ("tiny", "tiny-demo") else Path(path).name,
                  has_adapter=False)


def _load_run(adapter: Path, cfg: InferConfig, device: torch.device) -> Loaded:
    if not adapter.is_dir():
        raise LoadError(f"adapter={adapter}: no such directory (a run's final/ or checkpoints/step-N)")
    run_config = find_run_config(adapter)
    model_cfg, tuner = read_run_config(run_config)
    template = get_template(cfg.template or model_cfg.template)
    name = f"{adapter.parent.name}/{adapter.name}"
    model_cfg = with_asked_dtype(model_cfg, cfg, run_config)
    dtype = inference_dtype(model_cfg, device)
    source = f"model.path in {run_config}"
    if tuner.uses_adapter:
        base = load_base(model_cfg, dtype, False, source)
        model = attach_adapter(base, tuner, adapter, resolve_model_path(model_cfg.path))
        return Loaded(model, build_tokenizer(model_cfg), template, name, has_adapter=True)
    # tuner=full: final/ is a standalone model; a checkpoint holds every weight over the base.
    if (adapter / "config.json").is_file():
        standalone = replace(model_cfg, path=str(adapter), gguf_file=None)
        return Loaded(load_base(standalone, dtype, False, f"adapter={adapter}"), build_tokenizer(standalone),
                      template, name, has_adapter=False)
    model = load_base(model_cfg, dtype, False, source)
    load_trainable(adapter, model)
    return Loaded(model, build_tokenizer(model_cfg), template, name, has_adapter=False)
