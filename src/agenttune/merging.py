"""The verbs ``merge.py`` calls: read the run, load base + adapter, render verification samples,
export, and check the export in a fresh process.

The base model and chat template come from the run's saved config, so a merge always pairs an
adapter with the model and template it was trained with. ``base=`` overrides only the path
(a base that moved since training); a base of another shape is refused with a message that
says what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agenttune.config import Config, ConfigError, ModelConfig, TunerConfig
from agenttune.data.schema import Conversation, Message, ToolCall
from agenttune.data.templates import Template
from agenttune.modeling import load_pretrained, lora_config, plain_gguf, quantization_config_nf4, resolve_model_path
from agenttune.training import checkpoint_dirs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest allowed |merged - (base + adapter)| logit difference, as a fraction of the largest
# reference logit. Merging rounds W + s·BA to the export dtype once per weight, so the error
# grows with the dtype's epsilon (fp32 2^-23, fp16 2^-10, bf16 2^-7), with headroom for depth.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
VERIFY_MAX_TOKENS = 128  # per sample: enough to cover headers, tool calls and answers


class MergeError(RuntimeError):
    """A problem the user can fix: a missing run config, a base model that is gone or does not fit."""


@dataclass
class MergeConfig:
    adapter: str = ""
    """A run's ``final/`` dir, or one of its ``checkpoints/step-N`` dirs."""
    output: str = ""
    """Directory to write; refused when it exists and is not empty, unless force=true."""
    dtype: str = "bf16"
    """bf16, fp16 or fp32: the dtype the base is loaded, merged and saved in."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard, e.g. 5GB or 500MB."""
    force: bool = False
    """Replace a non-empty output dir (only once the new export has passed verification)."""
    adapter_only: bool = False
    """Export the adapter, tokenizer and chat template instead of a merged model (vLLM --enable-lora)."""
    base: str | None = None
    """Base model dir; None uses model.path from the run's config. For a base that has moved."""

    def __post_init__(self) -> None:
        if not self.adapter:
            raise ConfigError("adapter: required, e.g. adapter=outputs/tiny-lora/final")
        if not self.output:
            raise ConfigError("output: required, e.g. output=merged/tiny-lora")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not self.max_shard_size[:1].isdigit():
            raise ConfigError(f"max_shard_size: {self.max_shard_size!r} is not a size like 5GB or 500MB")


class HelpRequested(Exception):
    """merge.py -h/--help: print the usage and every key, exit 0."""


def parse_args(argv: list[str]) -> MergeConfig:
    """``key=value`` arguments, as train.py takes them; an unknown key fails naming it."""
    known = {f.name for f in fields(MergeConfig)}
    bools = {"force", "adapter_only"}
    values: dict = {}
    if {"-h", "--help"} & set(argv):
        raise HelpRequested
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg}: expected key=value (keys: {', '.join(sorted(known))})")
        if key not in known:
            raise ConfigError(f"{key}: unknown key (merge.py takes {', '.join(sorted(known))})")
        if key in bools:
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{key}: expected true or false, got {value!r}")
            values[key] = value.lower() == "true"
        else:
            values[key] = value
    return MergeConfig(**values)


# ----------------------------------------------------------------------------- the run


def find_run_config(adapter: Path) -> Path:
    """The resolved config the adapter was trained with: a checkpoint holds its own
    ``config.yaml``; for ``final/``, Hydra's ``.hydra/config.yaml`` in the run dir, else the
    copy in the run's newest checkpoint (runs started without Hydra's output dir)."""
    candidates = [adapter / "config.yaml", adapter.parent / ".hydra" / "config.yaml"]
    candidates += [checkpoint / "config.yaml" for checkpoint in checkpoint_dirs(adapter.parent)]
    for path in candidates:
        if path.is_file():
            return path
    raise MergeError(
        f"adapter={adapter}: no training config found (looked for {', '.join(map(str, candidates[:2]))} "
        "and checkpoints/step-*/config.yaml). Point adapter= at a run's final/ or checkpoints/step-N dir."
    )


def read_run_config(path: Path) -> tuple[ModelConfig, TunerConfig]:
    """The model and tuner sections of a saved run config, validated by the training schema."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
        return OmegaConf.to_object(node.model), OmegaConf.to_object(node.tuner)
    except (OmegaConfBaseException, ValueError) as e:
        raise MergeError(f"{path}: not a readable training config ({str(e).splitlines()[0]})") from None


def load_run_config(path: Path) -> tuple[ModelConfig, TunerConfig]:
    """:func:`read_run_config` for a merge, which needs an adapter run."""
    model_cfg, tuner = read_run_config(path)
    if not tuner.uses_adapter:
        raise MergeError(f"{path}: this run used tuner=full; its final/ is already a standalone model, nothing to merge")
    return model_cfg, tuner


# ----------------------------------------------------------------------------- loading


def load_base(model_cfg: ModelConfig, dtype: torch.dtype, dequantize_nf4: bool, source: str):
    """The base model in ``dtype``, refusing one whose files lack weights the architecture needs.
    ``source`` says where the path came from, for the messages (``model.path in RUN/config.yaml``).

    QLoRA (dequantize_nf4): the adapter was trained against the NF4-rounded weights, so the base
    is quantized exactly as in training and dequantized back; merging into the original
    weights would add the update to a slightly different matrix than the one it was learned on.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_cfg.path)
    if Path(path).is_absolute() and not Path(path).is_dir():  # a local path, not a hub id: say so plainly
        raise MergeError(f"base model {path} ({source}) does not exist. If the base moved, pass base=DIR.")
    kwargs = {"dtype": dtype}
    if dequantize_nf4:
        if not torch.cuda.is_available():
            raise MergeError(
                "this adapter was trained with tuner=qlora: merging it quantizes the base to NF4 as in "
                "training and dequantizes it, which needs a CUDA GPU (bitsandbytes). Run the merge on a GPU "
                "machine, or pass adapter_only=true to export the adapter for serving on the original base."
            )
        kwargs["quantization_config"] = quantization_config_nf4()
    try:
        model, info = load_pretrained(AutoModelForCausalLM, path, model_cfg, output_loading_info=True, **kwargs)
        model = plain_gguf(model)
    except (OSError, ValueError) as e:
        raise MergeError(
            f"base model {path} ({source}) could not be loaded: {str(e).splitlines()[0]} "
            "If the base moved, pass base=DIR."
        ) from None
    missing = sorted(info["missing_keys"]) + [name for name, *_ in info["mismatched_keys"]]
    if missing:
        raise MergeError(
            f"base model {path}: its weight files lack or misshape {len(missing)} weights the architecture "
            f"needs ({', '.join(missing[:3])}, ...). Is this the model the run trained on ({source})?"
        )
    if dequantize_nf4:
        model = model.dequantize(dtype=dtype)
    return model.eval()


def _adapter_module(key: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.lora_A[.default].weight`` -> ``model.layers.0.mlp.up_proj``."""
    return key.split(".lora_")[0].removeprefix("base_model.model.")


def check_adapter_fits(base, weights: dict[str, torch.Tensor], adapter: Path, base_path: str) -> None:
    """Name the first layer the adapter was trained on that the base lacks or has in another shape.
    LoRA's A is (r, in) and B is (out, r), so the two give the layer's (in, out) as trained."""
    modules = dict(base.named_modules())
    for key, tensor in weights.items():
        if ".lora_" not in key:
            # Saved whole layers (PEFT stores embeddings/lm_head it adapted, and DoRA magnitudes
            # are lora_magnitude_vector): PEFT's own load checks their shapes.
            continue
        name = _adapter_module(key)
        module = modules.get(name)
        if module is None:
            raise MergeError(
                f"adapter {adapter} does not fit base model {base_path}: the base has no layer {name} "
                f"(hidden size {base.config.hidden_size}, {base.config.num_hidden_layers} layers)"
            )
        if not isinstance(module, torch.nn.Linear):
            continue  # embeddings and DoRA magnitudes: PEFT's own load checks them
        if ".lora_A." in key and tensor.shape[-1] != module.in_features:
            got, want = f"{module.in_features} inputs", f"{tensor.shape[-1]}"
        elif ".lora_B." in key and tensor.shape[0] != module.out_features:
            got, want = f"{module.out_features} outputs", f"{tensor.shape[0]}"
        else:
            continue
        raise MergeError(
            f"adapter {adapter} does not fit base model {base_path}: layer {name} has {got} in the base, "
            f"the adapter was trained on {want} (base hidden size {base.config.hidden_size}). "
            "Is this the model the run trained on?"
        )


def attach_adapter(base, tuner: TunerConfig, adapter: Path, base_path: str):
    """base + adapter as a PeftModel, from a final/ dir (PEFT's files) or a training checkpoint."""
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    if (adapter / "adapter_config.json").is_file():
        weights = load_file(adapter / "adapter_model.safetensors")
        check_adapter_fits(base, weights, adapter, base_path)
        return PeftModel.from_pretrained(base, adapter).eval()
    if not (adapter / "trainable.safetensors").is_file():
        raise MergeError(f"adapter={adapter}: holds neither adapter_config.json (a final/ dir) "
                         "nor trainable.safetensors (a checkpoint)")
    weights = load_file(adapter / "trainable.safetensors")
    check_adapter_fits(base, weights, adapter, base_path)
    model = get_peft_model(base, lora_config(base, tuner))
    params = dict(model.named_parameters())
    if set(weights) != {name for name, p in params.items() if p.requires_grad}:
        raise MergeError(f"{adapter}: the checkpoint's tensors do not match tuner={tuner.name} from its config.yaml")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return model.eval()


# ----------------------------------------------------------------------------- export


def verify_conversations() -> list[Conversation]:
    """Samples the verification renders: a tool call with its result, and a plain chat."""
    weather = {"name": "get_weather", "description": "Get the weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    call = ToolCall(name="get_weather", arguments=json.dumps({"city": "Paris"}))
    return [
        Conversation([
            Message("system", "You are a helpful assistant."),
            Message("user", "What is the weather in Paris today?"),
            Message("assistant", "", tool_calls=[call]),
            Message("tool", '{"temperature": 20, "sky": "sunny"}'),
            Message("assistant", "It is sunny and 20 degrees in Paris."),
        ], tools=[weather], origin="merge-verify#0"),
        Conversation([
            Message("user", "Convert 100 km to miles."),
            Message("assistant", "100 km is about 62 miles."),
        ], origin="merge-verify#1"),
    ]


def sample_ids(tokenizer, template: Template) -> list[list[int]]:
    return [tokenizer(template.render_text(conv), add_special_tokens=False)["input_ids"][:VERIFY_MAX_TOKENS]
            for conv in verify_conversations()]


@torch.no_grad()
def logits_of(model, samples: list[list[int]]) -> list[torch.Tensor]:
    """Per sample, the logits (T, V) in fp32; one sample at a time, so no padding enters."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in samples]


def stop_token_ids(tokenizer, template: Template) -> tuple[list[int], list[str]]:
    """(ids, words): the template's end token and stop words that are single tokens, which go
    into generation_config.eos_token_id; and the stop words that are not (ReAct's
    ``Observation:``), which a server must be told as stop strings."""
    ids, words = [], []
    for word in (template.eos_token, *template.stop_words):
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1:
            ids += [i for i in encoded if i not in ids]
        else:
            words.append(word)
    return ids, words


def write_generation_config(model, tokenizer, template: Template) -> list[str]:
    """Set the model's generation config to stop where the template's turns and tool calls end.
    Returns the stop words no single token can express."""
    ids, words = stop_token_ids(tokenizer, template)
    model.generation_config.eos_token_id = ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return words


def temp_dir_beside(output: Path) -> Path:
    """A fresh dir next to ``output`` (same filesystem, so the final rename is atomic)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{output.name}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export should read like any other dir
    return tmp


def check_output(output: Path, force: bool, inputs: dict[str, Path]) -> None:
    """Refuse a non-empty output without force=true, and never replace an input ({what: dir})."""
    for what, path in inputs.items():
        if output.resolve() == path.resolve():
            raise MergeError(f"output={output} is the {what} dir itself; choose another")
    if output.exists() and not output.is_dir():
        raise MergeError(f"output={output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise MergeError(f"output={output} exists and is not empty; pass force=true to replace it")


def publish(tmp: Path, output: Path) -> None:
    """Move the verified export into place; an old output goes only now, and atomically."""
    if output.exists():
        trash = output.with_name(f".trash-{output.name}-{os.getpid()}")
        os.rename(output, trash)
        shutil.rmtree(trash)
    os.rename(tmp, output)


# ----------------------------------------------------------------------------- verification

# Runs in a fresh interpreter with stock transformers (and peft for an adapter export), so the
# export is checked as a user will load it, not through anything this process still holds.
VERIFY_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
args = json.loads(sys.argv[1])
device = args["device"]
kwargs = {"dtype": getattr(torch, args["dtype"]), "trust_remote_code": args["trust_remote_code"]}
if args["base"] is None:
    model = AutoModelForCausalLM.from_pretrained(args["path"], **kwargs)
else:
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args["base"], **kwargs), args["path"])
model.to(device).eval()
with torch.no_grad():
    logits = [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in args["samples"]]
torch.save(logits, args["result"])
"""


def logits_in_fresh_process(path: Path, samples: list[list[int]], dtype: torch.dtype, device: torch.device,
                            base: str | None, trust_remote_code: bool) -> list[torch.Tensor]:
    """Load ``path`` (a model, or an adapter over ``base``) in a new Python process and return its
    logits, computed on ``device``: the reference's device, so kernels do not differ between the two."""
    result = path / ".verify-logits.pt"
    args = {"path": str(path), "base": base, "dtype": str(dtype).removeprefix("torch."), "samples": samples,
            "device": str(device), "trust_remote_code": trust_remote_code, "result": str(result)}
    proc = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MergeError(f"verification: the export in {path} does not load with stock transformers:\n"
                         f"{proc.stderr[-3000:]}")
    try:
        return torch.load(result, weights_only=True)
    finally:
        result.unlink()


def max_abs_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g - w).abs().max().item() for g, w in zip(got, want))


def tolerance(dtype: str, reference: list[torch.Tensor]) -> float:
    scale = max(1.0, max(r.abs().max().item() for r in reference))
    return TOLERANCE[dtype] * scale
