"""Fine-tune a chat model into a tool-using agent with L = λ·L_agent + (1-λ)·L_general.

    python train.py                                              # tiny model, demo data, LoRA, CPU
    accelerate launch train.py model=qwen7b tuner=lora hardware=8gpu
    python train.py output_dir=runs/a train.max_steps=50 loss.lambda_agent=0.5
    python train.py output_dir=runs/a resume=auto                 # continue after a crash
    python train.py train.max_minutes=45 train.max_steps=5000     # a time budget: the schedule fits the steps it holds
    python train.py train.packing=true train.max_tokens_per_batch=8192   # padding-free packed micro-batches
    sbatch launch/slurm_1node.sbatch output_dir=runs/a            # Slurm; SIGUSR1 -> checkpoint, exit 85, requeue

The config schema and its defaults are agenttune/config.py; conf/ holds the groups.
Reading order: setup (accelerator, data, model, optimizer, resume) -> loop -> final save.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from agenttune.attention import PACKED_SDPA, use_packed_sdpa
from agenttune.config import Config, ConfigError, to_config
from agenttune.cpu import keep_freed_memory
from agenttune.data.pipeline import build_datasets
from agenttune.data.schema import DataError, DataErrors
from agenttune.modeling import add_neftune, build_model, build_tokenizer, count_parameters
from agenttune.training import (
    SaveError,
    TimeBudget,
    TrainState,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    catch_preemption,
    check_finite,
    check_sources_weighted,
    check_free_space,
    clean_incomplete,
    clip_gradients,
    evaluate,
    exit_for_requeue,
    export_submitit_env,
    find_checkpoint,
    forward_backward,
    init_wandb,
    leave_process_group,
    leave_together,
    load_checkpoint,
    log_metrics,
    micro_batches,
    peak_memory_gb,
    plot_losses,
    preemption_agreed,
    resolve_mixed_precision,
    sampling_groups,
    save_checkpoint,
    save_final,
    truncate_metrics,
)

log = get_logger("train")  # logs on rank 0 only
clock = time.monotonic  # train.max_minutes' clock (tests script it)


def train(cfg: Config) -> TrainState:
    # ---------------------------------------------------------------- setup
    out = Path(cfg.output_dir).resolve()
    preemption = catch_preemption()  # SIGUSR1 (Slurm's time-limit warning): checkpoint, exit 85, requeue
    cfg = replace(cfg, hardware=resolve_mixed_precision(cfg.hardware))  # auto: measured, recorded in config.yaml
    accelerator = build_accelerator(cfg.hardware, cfg.train)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # else each step page-faults its fresh activations in: 1.2-1.3x the tokens/s
    checkpoint = find_checkpoint(out, cfg.resume)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))

    set_seed(cfg.train.seed)  # the same on every rank, so adapters start identical everywhere
    tokenizer = build_tokenizer(cfg.model)
    with accelerator.main_process_first():  # rank 0 fills the dataset cache, the others read it
        data = build_datasets(cfg.data, cfg.model.template, tokenizer)
    check_sources_weighted(set(data.train.unique("source")), cfg.loss.lambda_agent)
    model = build_model(cfg.model, cfg.tuner, cfg.hardware)
    if cfg.train.neftune_alpha:
        add_neftune(model, cfg.train.neftune_alpha)  # noisy input embeddings in training mode only
    if cfg.train.packing and use_packed_sdpa(model):
        log.info("packed rows: sdpa runs once per sample (%s), not over the whole row", PACKED_SDPA)
    elif cfg.train.share_prefixes:
        raise ConfigError(
            f"train.share_prefixes: the model attends with {cfg.model.attn_implementation or 'its default'} "
            "attention, and only sdpa follows a packed row's prefix tree; set model.attn_implementation=sdpa "
            "or train.share_prefixes=false")
    groups = sampling_groups(data.train, cfg.train.sampler)
    if groups is not None:
        log.info("train.sampler=balanced: %d sampling groups, spread evenly over each epoch (data_report.json "
                 "counts them)", len(set(groups)))
    total_steps = cfg.train.total_steps(len(data.train))
    optimizer = build_optimizer(model, cfg.train, cfg.tuner.loraplus_lr_ratio, cfg.hardware.strategy)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps, world)
    schedule = scheduler.lr_lambdas[0] if cfg.train.max_minutes else None  # a ProgressSchedule: the loop moves it
    if main and (short := check_free_space(model, out, cfg.train.save_total_limit)):
        log.warning(short)  # before hours of training, not at the first save
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    set_seed(cfg.train.seed, device_specific=True)  # now per-rank: dropout differs across ranks

    state = TrainState(world_size=world)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", checkpoint, state.step)
    run = None
    if main:  # only rank 0 writes outside checkpoints
        out.mkdir(parents=True, exist_ok=True)
        clean_incomplete(out)
        truncate_metrics(out / "metrics.jsonl", state.step)  # steps the killed run logged past its checkpoint
        trainable, total = count_parameters(model)
        run_info = {
            "world_size": world, "accumulation_steps": accelerator.gradient_accumulation_steps,
            "total_steps": total_steps, "train_samples": len(data.train),
            "eval_samples": len(data.eval) if data.eval is not None else 0,
            "trainable_params": trainable, "total_params": total, "device": str(accelerator.device),
            "resumed_from": str(checkpoint) if checkpoint else None, "start_step": state.step,
        }
        (out / "run.json").write_text(json.dumps(run_info, indent=1))
        (out / "data_report.json").write_text(json.dumps(data.report, indent=1, default=str))
        log.info("run: %s", run_info)
        run = init_wandb(cfg.wandb, OmegaConf.to_container(OmegaConf.structured(cfg)), out, state.wandb_run_id)
        state.wandb_run_id = run.id if run is not None else None

    # ---------------------------------------------------------------- loop
    budget = TimeBudget(accelerator, cfg.train.max_minutes, state.train_seconds, clock) if cfg.train.max_minutes else None
    bar = tqdm(total=total_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    model.train()
    last = state.step >= total_steps or (budget is not None and state.train_seconds >= budget.limit_s)
    while not last:
        t0 = time.perf_counter()
        batches = micro_batches(data.train, state.step, cfg.train, rank, world, tokenizer.pad_token_id, groups)
        result = forward_backward(accelerator, model, batches, cfg.loss)
        grad_norm = clip_gradients(accelerator, model, cfg.train.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this update uses
        state.micro_step += len(batches)
        if check_finite(state.step + 1, result.loss, grad_norm, cfg.train.on_nonfinite):
            optimizer.step()
        else:
            state.skipped_steps += 1
        state.step += 1
        last = state.step >= total_steps
        if budget is not None:  # the schedule follows progress in steps or time, whichever is further
            state.train_seconds = budget.update()
            schedule.progress = max(state.step / total_steps, budget.progress)
            if budget.exhausted() and not last:
                last = True
                if main:
                    bar.write(f"train.max_minutes={cfg.train.max_minutes:g}: stopping after step {state.step} "
                              f"of {total_steps}, {state.train_seconds / 60:.2f} min trained")
        scheduler.step()  # the schedule keys off `step`, skipped updates included
        optimizer.zero_grad(set_to_none=True)
        state.samples_seen += cfg.train.global_batch_size
        state.trained_tokens += result.trained_tokens
        tokens_per_s = result.tokens / (time.perf_counter() - t0)

        if main and (state.step % cfg.train.log_steps == 0 or last):
            log_metrics(out / "metrics.jsonl", {
                "step": state.step, "loss": result.loss, "loss_agent": result.loss_agent,
                "loss_general": result.loss_general, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s, "trained_tokens": state.trained_tokens, "micro_batches": len(batches),
                "epoch": state.samples_seen / len(data.train), "skipped_steps": state.skipped_steps,
                "peak_mem_gb": peak_memory_gb(accelerator.device),
            }, run)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

        improved = False
        if data.eval is not None and (state.step % cfg.train.eval_steps == 0 or last):
            scores = evaluate(accelerator, model, data.eval, cfg.train.micro_batch_size, tokenizer.pad_token_id, cfg.loss)
            improved = state.record_eval(scores["eval/loss"])
            if main:
                log_metrics(out / "metrics.jsonl", {"step": state.step, **scores}, run)
                bar.write(f"step {state.step}: " + " ".join(f"{k}={v:.4f}" for k, v in scores.items() if v is not None))
        preempted = preemption_agreed(accelerator, preemption)  # all ranks stop at the same step
        if state.step % cfg.train.save_steps == 0 or improved or preempted:  # the best checkpoint always exists
            checkpoint = save_checkpoint(accelerator, model, optimizer, scheduler, state, out, config_yaml,
                                         cfg.train.save_total_limit)
        if preempted:
            exit_for_requeue(accelerator, state.step, checkpoint)  # SystemExit(85); resume=auto continues
        if cfg.train.early_stopping_patience and state.evals_since_best >= cfg.train.early_stopping_patience:
            log.info("early stop at step %d: eval/loss has not improved on step %s", state.step, state.best_step)
            break
    bar.close()

    # ---------------------------------------------------------------- final
    save_final(accelerator, model, tokenizer, out / "final", cfg.model.template)
    if main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        if run is not None:
            run.finish()
        log.info("done: %s holds the last weights; best eval/loss %s at checkpoints/step-%s",
                 out / "final", state.best_eval_loss, state.best_step)
    del model, optimizer, scheduler  # the DDP wrapper holds the process group: gone before the group is
    leave_together(accelerator)
    return state


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    export_submitit_env()  # sweep=slurm: one Slurm task per GPU, started without torchrun
    try:
        train(to_config(dcfg))
    except (ConfigError, DataError, DataErrors, SaveError) as err:  # what the user can fix: one message, no traceback
        tqdm.write(f"train.py: error: {err}", file=sys.stderr)  # on its own line, not after the bar's
        leave_process_group()
        sys.exit(1)


def rank_zero_only_hydra(argv: list[str]) -> list[str]:
    """Hydra writes .hydra/ and train.log into the run dir before main() runs; with every rank
    sharing one pinned dir, only rank 0 may, so other ranks switch both off."""
    if int(os.environ.get("RANK", "0")) == 0:
        return argv
    return argv + ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    sys.argv = rank_zero_only_hydra(sys.argv)
    main()
