"""Merge a trained adapter into its base model and export a verified standalone model.

    python merge.py adapter=outputs/tiny-lora/final output=merged/tiny-lora
    python merge.py adapter=runs/a/checkpoints/step-400 output=merged/a dtype=fp16 max_shard_size=2GB
    python merge.py adapter=runs/a/final output=serve/a adapter_only=true   # vLLM --enable-lora
    options: dtype=bf16|fp16|fp32  max_shard_size=5GB  force=true  adapter_only=true  base=DIR

The base model and chat template come from the run's saved config. Reading order: find the
run -> load base + adapter -> reference logits -> merge and write to a temp dir -> reload the
export in a fresh process and compare logits -> rename into place. Verbs live in agenttune/merging.py.
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
from pathlib import Path

from agenttune.config import ConfigError, keys_help
from agenttune.data.templates import get_template
from agenttune.merging import (
    DTYPES,
    HelpRequested,
    MergeConfig,
    MergeError,
    attach_adapter,
    check_output,
    find_run_config,
    load_base,
    load_run_config,
    logits_in_fresh_process,
    logits_of,
    max_abs_diff,
    parse_args,
    publish,
    sample_ids,
    temp_dir_beside,
    tolerance,
    write_generation_config,
)
from agenttune.modeling import build_tokenizer, resolve_model_path
from agenttune.storage import free_space_line, is_write_error

log = logging.getLogger("merge")


def merge(cfg: MergeConfig) -> Path:
    # ---------------------------------------------------------------- the run
    adapter, output, dtype = Path(cfg.adapter), Path(cfg.output), DTYPES[cfg.dtype]
    if not adapter.is_dir():
        raise MergeError(f"adapter={adapter}: no such directory")
    run_config = find_run_config(adapter)
    model_cfg, tuner = load_run_config(run_config)
    if cfg.base is not None:
        model_cfg.path = cfg.base
    base_path = resolve_model_path(model_cfg.path)
    check_output(output, cfg.force, inputs={"adapter": adapter, "base model": Path(base_path)})
    template = get_template(model_cfg.template)
    log.info("adapter %s (tuner=%s), base %s, template %s, from %s",
             adapter, tuner.name, base_path, template.name, run_config)

    # ---------------------------------------------------------------- base + adapter
    # An adapter-only export is served on the original base, so only a merge dequantizes NF4.
    source = "base=" if cfg.base is not None else f"model.path in {run_config}"
    base = load_base(model_cfg, dtype, tuner.name == "qlora" and not cfg.adapter_only, source)
    model = attach_adapter(base, tuner, adapter, base_path)
    tokenizer = build_tokenizer(model_cfg)
    tokenizer.chat_template = template.chat_template  # serve with exactly the training format
    samples, device = sample_ids(tokenizer, template), next(model.parameters()).device
    reference = logits_of(model, samples)  # the unmerged model is the truth the export must match
    with model.disable_adapter():
        effect = max_abs_diff(logits_of(model, samples), reference)

    # ---------------------------------------------------------------- export to a temp dir
    tmp = temp_dir_beside(output)
    try:
        if cfg.adapter_only:
            model.save_pretrained(tmp, safe_serialization=True)
            exported = model.base_model.model
        else:
            exported = model.merge_and_unload()
            exported.config.use_cache = True
            exported.save_pretrained(tmp, max_shard_size=cfg.max_shard_size, safe_serialization=True)
        stop_words = write_generation_config(exported, tokenizer, template)
        exported.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, base, exported
        gc.collect()  # the fresh process below needs the memory this copy holds

        # ------------------------------------------------------------ verify in a fresh process
        got = logits_in_fresh_process(tmp, samples, dtype, device, base_path if cfg.adapter_only else None,
                                      model_cfg.trust_remote_code)
        diff, limit = max_abs_diff(got, reference), tolerance(cfg.dtype, reference)
        tokens = sum(map(len, samples))
        print(f"verify: max |logit diff| {diff:.3g} vs base+adapter over {len(samples)} samples ({tokens} tokens); "
              f"tolerance {limit:.3g} ({cfg.dtype}); the adapter itself moves logits by up to {effect:.3g}")
        if not diff <= limit:  # also catches NaN
            raise MergeError(f"verification failed: the export's logits differ from base+adapter by {diff:.3g} "
                             f"(tolerance {limit:.3g} for {cfg.dtype}); nothing was written to {output}")
        publish(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):  # a full disk, a quota, permissions: one message naming the place
            raise MergeError(f"could not write {output}: {e}. {free_space_line(output.parent)}; "
                             "nothing was written there. Free space, or choose another output=") from e
        raise
    if stop_words:
        log.info("stop words with no single token, pass them to your server as stop strings: %s", stop_words)
    log.info("wrote %s (%s)", output, "adapter + tokenizer" if cfg.adapter_only else f"merged model, {cfg.dtype}")
    return output


def main(argv: list[str]) -> int:
    """Errors the user can fix are printed as one message (no traceback) with exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        merge(parse_args(argv))
    except HelpRequested:
        print(f"{__doc__.strip()}\n\nKeys (key=value):\n{keys_help(MergeConfig)}")
        return 0
    except (ConfigError, MergeError) as e:
        print(f"merge.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
