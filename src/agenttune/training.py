"""The verbs ``train.py``'s loop calls: batching, the λ-weighted loss, optimizer and schedule,
evaluation, checkpoints, metrics.

Shapes: B = samples in a micro-batch, T = padded length, V = vocabulary, H = hidden size,
K = trained positions in a micro-batch. A packed micro-batch is one row (B = 1) of whole samples.
Sources: ``source`` is 0 (agent) or 1 (general), matching the data pipeline: one per row in a
padded batch, one per token in a packed row (which holds samples of both).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

from agenttune.config import ConfigError, HardwareConfig, LossConfig, TrainConfig, WandbConfig
from agenttune.data.schema import SOURCE_IDS
from agenttune.data.templates import get_template
from agenttune.storage import SaveError, free_bytes, free_space_line, gib, is_write_error

log = logging.getLogger(__name__)

AGENT = 0  # and 1 = general
IGNORE = -100


# ----------------------------------------------------------------------------- accelerator


def export_submitit_env() -> None:
    """Under sweep=slurm (hydra-submitit-launcher) each GPU is a Slurm task that submitit starts
    itself, not torchrun: set the env:// variables torchrun would (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) from submitit's view of the job. A no-op anywhere else."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Keep every GPU visible: Accelerate picks cuda:LOCAL_RANK itself.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def resolve_mixed_precision(hardware: HardwareConfig) -> HardwareConfig:
    """``hardware.mixed_precision=auto`` made concrete, the same on every rank: on CUDA bf16 where
    the GPU has it, else fp16; on a CPU bf16 only where rank 0 measures its bf16 matmuls at least
    1.2x float32's speed (agenttune.cpu.bf16_is_faster), else fp32 (``no``); elsewhere ``no``.
    The run's saved config records the result."""
    if hardware.mixed_precision != "auto":
        return hardware
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.device.type == "cuda":
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        reason = f"{torch.cuda.get_device_name(state.device)} {'has' if chosen == 'bf16' else 'lacks'} bf16"
    elif state.device.type == "cpu":
        decision = [None, None]  # as long as rank 0's list: the broadcast fills it in place
        if state.is_main_process:
            from agenttune.cpu import bf16_is_faster

            faster, speeds = bf16_is_faster()
            decision = ["bf16" if faster else "no",
                        f"this CPU multiplies bf16 at {speeds['bf16']:.0f} GFLOP/s, fp32 at {speeds['fp32']:.0f}"]
        chosen, reason = broadcast_object_list(decision) if state.num_processes > 1 else decision
    else:
        chosen, reason = "no", f"no autocast default for {state.device.type}"
    if state.is_main_process:
        log.info("hardware.mixed_precision=auto: %s (%s)", "no (fp32)" if chosen == "no" else chosen, reason)
    return replace(hardware, mixed_precision=chosen)


def build_accelerator(hardware: HardwareConfig, train: TrainConfig):
    """An Accelerator whose accumulation steps give train.global_batch_size at this world size."""
    import importlib.util

    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    world = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).num_processes
    launched = int(os.environ.get("WORLD_SIZE", world))  # set by torchrun / accelerate launch
    if world != launched:  # e.g. several processes on a machine without GPUs: each would train alone
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate sees a world of {world}. "
            "On CPU, launch with ACCELERATE_USE_CPU=1 (accelerate launch --cpu ...)."
        )
    accumulation = train.accumulation_steps(world)
    if train.packing and hardware.strategy == "deepspeed":
        raise ConfigError(
            f"train.packing: hardware={hardware.name} uses DeepSpeed, whose engine fixes the accumulation count "
            "when it is built, but a packed step's micro-batch count varies. Use hardware.strategy ddp or fsdp, "
            "or train.packing=false with train.group_by_length=true."
        )
    plugins = {}
    if hardware.strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise RuntimeError(f"hardware={hardware.name} uses DeepSpeed, which is not installed: pip install deepspeed")
        from accelerate import DeepSpeedPlugin

        plugins["deepspeed_plugin"] = DeepSpeedPlugin(
            zero_stage=hardware.zero_stage,
            gradient_accumulation_steps=accumulation,
            gradient_clipping=train.max_grad_norm if train.max_grad_norm > 0 else None,
            # ZeRO-3 partitions the weights: accelerator.get_state_dict gathers them (16-bit) to
            # rank 0 only with this on, for checkpoints' trainable.safetensors and final/.
            zero3_save_16bit_model=hardware.zero_stage == 3,
        )
    elif hardware.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT"
        )
    accelerator = Accelerator(
        mixed_precision=hardware.mixed_precision, gradient_accumulation_steps=accumulation, **plugins
    )
    if hardware.strategy == "fsdp" and accelerator.distributed_type != DistributedType.FSDP:
        # Accelerate applies the FSDP plugin only on GPUs (and like devices); elsewhere it would
        # silently train unsharded, so say so instead.
        raise RuntimeError(
            f"hardware={hardware.name} asks for FSDP but Accelerate runs as {accelerator.distributed_type.value} "
            f"on {accelerator.device}. FSDP needs GPUs and a distributed launch: accelerate launch --num_processes N "
            "train.py hardware=fsdp (on one GPU: accelerate launch --use_fsdp --num_processes 1 ...)."
        )
    if accelerator.is_main_process and accelerator.num_processes != hardware.num_processes:
        log.warning(
            "hardware=%s is written for %d processes but this run has %d; the global batch stays %d "
            "(accumulation %d). Launch with: accelerate launch --num_processes %d train.py ...",
            hardware.name, hardware.num_processes, accelerator.num_processes,
            train.global_batch_size, accumulation, hardware.num_processes,
        )
    machines = launched_machines(accelerator.num_processes)
    if accelerator.is_main_process and machines not in (None, hardware.num_machines):
        log.warning("hardware=%s is written for %d machines but this run spans %d (WORLD_SIZE / LOCAL_WORLD_SIZE). "
                    "Launch with: accelerate launch --num_machines %d --machine_rank R ...",
                    hardware.name, hardware.num_machines, machines, hardware.num_machines)
    return accelerator


def launched_machines(world: int) -> int | None:
    """How many machines the launch spans: torchrun and accelerate launch set LOCAL_WORLD_SIZE,
    the processes on each machine. A single process is one machine; None where a launcher left
    LOCAL_WORLD_SIZE unset (the count is unknown, so nothing is checked)."""
    if world == 1:
        return 1
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return max(1, world // int(local)) if local else None


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=8)
def sample_order(num_samples: int, epoch: int, seed: int, groups: tuple[str, ...] | None = None) -> tuple[int, ...]:
    """The row order of one epoch; a pure function of (seed, epoch, groups).

    ``groups`` None: a uniform shuffle (train.sampler=shuffle). Else ``groups[row]`` names the
    row's sampling group, a path such as ``agent/weather/en`` (train.sampler=balanced), and every
    level of the paths is spread evenly over the epoch: the sources, then within a source its
    tasks, then within a task its languages. So any stretch of the epoch holds each group about in
    proportion to its size, where a shuffle gives binomial noise (see interleave_evenly).
    """
    if groups is None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return tuple(torch.randperm(num_samples, generator=generator).tolist())
    if len(groups) != num_samples:
        raise ValueError(f"{len(groups)} sampling groups for {num_samples} rows")
    rng = np.random.default_rng([seed, epoch])
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    rows_of = [np.flatnonzero(index == g) for g in range(len(names))]
    paths = [name.split("/") for name in names]

    def order(members: list[int], depth: int) -> np.ndarray:
        """The rows of groups ``members``, whose paths agree up to ``depth``, balanced below it."""
        parts: dict[str, list[int]] = {}
        for g in members:  # a path that ends here is a part of its own: "" sorts first
            parts.setdefault(paths[g][depth] if depth < len(paths[g]) else "", []).append(g)
        return interleave_evenly([
            rng.permutation(np.concatenate([rows_of[g] for g in part])) if key == "" else order(part, depth + 1)
            for key, part in sorted(parts.items())
        ], rng)

    return tuple(order(list(range(len(names))), 0).tolist())


def interleave_evenly(sequences: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Merge sequences keeping each one's order, each spread evenly over the result: the i-th of
    a sequence's n items takes a random place in the fraction [i/n, (i+1)/n) of it. Two sequences
    of equal length thus alternate in random order within each pair of places."""
    if len(sequences) == 1:
        return sequences[0]
    place = np.concatenate([(np.arange(len(seq)) + rng.random(len(seq))) / len(seq) for seq in sequences])
    return np.concatenate(sequences)[np.argsort(place, kind="stable")]


def sampling_groups(dataset, sampler: str) -> tuple[str, ...] | None:
    """The training set's ``group`` column for train.sampler=balanced; None for shuffle."""
    if sampler == "shuffle":
        return None
    if "group" not in dataset.column_names:
        raise ValueError("train.sampler=balanced needs the training set's group column: rebuild the dataset cache")
    return tuple(dataset["group"])


def step_rows(num_samples: int, step: int, global_batch: int, seed: int,
              groups: tuple[str, ...] | None = None) -> list[int]:
    """Rows of optimizer step ``step`` (0-based): positions [step·G, (step+1)·G) of the endless
    stream epoch 0, epoch 1, ... of rows in sample_order. The data position is therefore ``step``
    alone, and the rows of a step do not depend on micro-batch size, accumulation or world size."""
    rows, first = [], step * global_batch
    for epoch in range(first // num_samples, (first + global_batch - 1) // num_samples + 1):  # one lookup each
        order = sample_order(num_samples, epoch, seed, groups)
        start, stop = max(first, epoch * num_samples), min(first + global_batch, (epoch + 1) * num_samples)
        rows += order[start - epoch * num_samples : stop - epoch * num_samples]
    return rows


def collate(rows: dict[str, list], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch and shift the supervision by one.

    Position t of ``targets``/``target_weights`` holds the token that position t must predict
    (the input token at t+1), so logits (B, T, V) line up with them without slicing the logits.
    """
    length = max(len(ids) for ids in rows["input_ids"])
    batch_size = len(rows["input_ids"])
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    targets = torch.full((batch_size, length), IGNORE, dtype=torch.long)
    target_weights = torch.zeros((batch_size, length), dtype=torch.float32)
    for i, (ids, labels, weights) in enumerate(zip(rows["input_ids"], rows["labels"], rows["weights"])):
        n = len(ids)
        if not n == len(labels) == len(weights):
            raise ValueError(f"row {i}: input_ids, labels and weights differ in length ({n}, {len(labels)}, {len(weights)})")
        input_ids[i, :n] = torch.tensor(ids)
        attention_mask[i, :n] = 1
        targets[i, : n - 1] = torch.tensor(labels[1:])
        target_weights[i, : n - 1] = torch.tensor(weights[1:], dtype=torch.float32)
    if (target_weights[targets == IGNORE] != 0).any():
        raise ValueError("a token with label -100 has a non-zero weight: the data pipeline must zero both together")
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": attention_mask,  # (B, T)
        "targets": targets,  # (B, T), -100 where untrained
        "target_weights": target_weights,  # (B, T), 0 where untrained
        "source": torch.tensor(rows["source"], dtype=torch.long),  # (B,)
    }


def pack(rows: dict[str, list], share_prefixes: bool = False) -> dict[str, torch.Tensor]:
    """Concatenate whole samples into one row with no padding.

    Position ids restart at 0 for each sample, and no attention mask is given: from the restarts
    transformers builds per-sample causal attention (masking_utils.find_packed_sequence_indices
    for sdpa and eager, varlen kernels for flash-attention), so samples never see each other.
    A sample's last token predicts nothing: the next token in the row belongs to another sample.
    ``share_prefixes``: see pack_shared.
    """
    if share_prefixes:
        return pack_shared(rows)
    input_ids, position_ids, targets, target_weights, source = [], [], [], [], []
    for i, (ids, labels, weights, src) in enumerate(zip(rows["input_ids"], rows["labels"], rows["weights"], rows["source"])):
        n = len(ids)
        if not n == len(labels) == len(weights):
            raise ValueError(f"row {i}: input_ids, labels and weights differ in length ({n}, {len(labels)}, {len(weights)})")
        input_ids += ids
        position_ids += range(n)
        targets += labels[1:] + [IGNORE]
        target_weights += weights[1:] + [0.0]
        source += [src] * n
    bounds = torch.tensor([0, *itertools.accumulate(len(ids) for ids in rows["input_ids"])], dtype=torch.int32)
    return packed_row(input_ids, position_ids, targets, target_weights, source, cu_seq_lens=bounds)


def packed_row(input_ids, position_ids, targets, target_weights, source, **layout: torch.Tensor) -> dict[str, torch.Tensor]:
    """One packed row's tensors from its per-token lists, plus how its samples are laid out
    (``cu_seq_lens`` or ``prefix_nodes``)."""
    batch = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),  # (1, N)
        "position_ids": torch.tensor([position_ids], dtype=torch.long),  # (1, N)
        "targets": torch.tensor([targets], dtype=torch.long),  # (1, N), -100 where untrained
        "target_weights": torch.tensor([target_weights], dtype=torch.float32),  # (1, N), 0 where untrained
        "source": torch.tensor([source], dtype=torch.long),  # (1, N), per token
        **layout,
    }
    if (batch["target_weights"][batch["targets"] == IGNORE] != 0).any():
        raise ValueError("a token with label -100 has a non-zero weight: the data pipeline must zero both together")
    return batch


def shareable_length(labels: list[int]) -> int:
    """Leading positions of a sample that another sample may share: the ones before the
    position that predicts the first trained token. Sharing them changes no loss term."""
    first = next((t for t, label in enumerate(labels) if label != IGNORE), len(labels))
    return max(0, min(first - 1, len(labels) - 1))


def pack_shared(rows: dict[str, list]) -> dict[str, torch.Tensor]:
    """pack, with the untrained prefixes that samples have in common laid out once.

    Agent samples start with the same system turn and tool preamble (the demo's: about 85
    tokens before the tool listings part ways), and real agent sets often share far more. The
    row holds a prefix tree: a sample runs down the tree while its tokens match and its
    positions are shareable (shareable_length), then lays out its own tokens. A shared token
    sits at the same position in every sample that holds it, so its keys and values are the
    ones each sample would compute alone, and it predicts no trained token, so the loss is
    that of pack's row up to float rounding, in fewer tokens.

    ``prefix_nodes`` (K, 3) lists the tree's nodes in row order as [start, end, parent node or
    -1]: runs of tokens that the same samples hold. A token attends to its own node up to
    itself and to all of its ancestors' tokens (attention.packed_sdpa).
    """
    input_ids, position_ids, targets, target_weights, source = [], [], [], [], []
    previous, holders = [], []  # per row token: the row index before it in its samples, and who holds it (a bit each)
    children: dict[tuple[int, int], int] = {}  # (row index of the token before or -1, token id) -> row index
    for i, (ids, labels, weights, src) in enumerate(zip(rows["input_ids"], rows["labels"], rows["weights"], rows["source"])):
        n = len(ids)
        if not n == len(labels) == len(weights):
            raise ValueError(f"row {i}: input_ids, labels and weights differ in length ({n}, {len(labels)}, {len(weights)})")
        share, last, t = shareable_length(labels), -1, 0
        while t < share and (last, ids[t]) in children:
            last = children[(last, ids[t])]
            holders[last] |= 1 << i
            t += 1
        for t in range(t, n):
            if t < share:
                children[(last, ids[t])] = len(input_ids)
            previous.append(last)
            holders.append(1 << i)
            last = len(input_ids)
            input_ids.append(ids[t])
            position_ids.append(t)
            targets.append(labels[t + 1] if t + 1 < n else IGNORE)
            target_weights.append(weights[t + 1] if t + 1 < n else 0.0)
            source.append(src)
    nodes, node_of = [], []
    for x in range(len(input_ids)):
        if x == 0 or previous[x] != x - 1 or holders[x] != holders[x - 1]:
            nodes.append([x, x + 1, node_of[previous[x]] if previous[x] >= 0 else -1])
        else:
            nodes[-1][1] = x + 1
        node_of.append(len(nodes) - 1)
    return packed_row(input_ids, position_ids, targets, target_weights, source,
                      prefix_nodes=torch.tensor(nodes, dtype=torch.int32))  # (K, 3)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into bins whose lengths sum to at most ``capacity``:
    longest first, each into the fullest bin it still fits, or a new bin. Ties keep index
    order, so the bins are a pure function of the lengths. Within a bin, longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"item {i} has length {lengths[i]} > capacity {capacity}")
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: room[b])
            bins[best].append(i)
            room[best] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def split_bins(bins: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """Cut ``bins`` until there are ``count`` of them: the fullest bin that holds more than one
    item gives its last (shortest) item a bin of its own. Splitting never overfills a bin."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            raise ValueError(f"cannot cut {sum(map(len, bins))} items into {count} bins")
        fullest = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.append([fullest.pop()])
    return bins


def packed_micro_batches(dataset, rows: list[int], train: TrainConfig, rank: int, world: int) -> list[dict]:
    """This rank's share of a step's rows, packed best-fit decreasing into rows of at most
    train.max_tokens_per_batch tokens.

    Every rank must run the same number of micro-batches: Accelerate syncs gradients (an
    all-reduce under DDP) on each rank's last one, and a rank that ran fewer would leave the
    others waiting. So each rank packs every rank's share, which is a pure function of the step
    and needs no communication, and splits its own bins up to the largest count.
    """
    share = len(rows) // world
    lengths = dataset.select_columns("length")[rows]["length"]
    packed = []
    for r in range(world):
        theirs = lengths[r * share : (r + 1) * share]
        longest = max(range(share), key=lambda i: theirs[i])
        if theirs[longest] > train.max_tokens_per_batch:
            raise ConfigError(
                f"train.max_tokens_per_batch: row {rows[r * share + longest]} of the training set has "
                f"{theirs[longest]} tokens, more than one packed micro-batch holds ({train.max_tokens_per_batch}). "
                "Raise it to at least data.supervision.max_length."
            )
        packed.append(best_fit_decreasing(theirs, train.max_tokens_per_batch))
    count = max(len(bins) for bins in packed)
    mine = rows[rank * share : (rank + 1) * share]
    bins = split_bins(packed[rank], lengths[rank * share : (rank + 1) * share], count)
    batches = [pack(dataset[[mine[i] for i in b]], train.share_prefixes) for b in bins]
    if any(b["input_ids"].shape[1] > train.max_tokens_per_batch for b in batches):
        raise ValueError("the training set's length column disagrees with its input_ids: rebuild the dataset cache")
    return batches


def micro_batches(dataset, step: int, train: TrainConfig, rank: int, world: int, pad_id: int,
                  groups: tuple[str, ...] | None = None) -> list[dict]:
    """The micro-batches this rank runs for optimizer step ``step``: its contiguous share of the
    step's rows, packed (train.packing) or cut into train.micro_batch_size pieces, longest first
    with train.group_by_length. Only the grouping depends on the options, never which rows a
    step trains, so the data position stays ``step`` alone. ``groups``: see sampling_groups."""
    rows = step_rows(len(dataset), step, train.global_batch_size, train.seed, groups)
    if train.packing:
        return packed_micro_batches(dataset, rows, train, rank, world)
    share = len(rows) // world
    mine = rows[rank * share : (rank + 1) * share]
    if train.group_by_length:
        lengths = dataset.select_columns("length")[mine]["length"]
        mine = [row for _, row in sorted(zip(lengths, mine), key=lambda pair: -pair[0])]  # stable: ties keep order
    size = train.micro_batch_size
    return [collate(dataset[mine[i : i + size]], pad_id) for i in range(0, share, size)]


def model_inputs(batch: dict) -> dict:
    """What the model sees: a padded batch's attention mask, or a packed row's restarting
    position ids with no mask (see pack). No KV cache: with one, transformers would not look
    for packed sequences. A packed row also carries its sample boundaries, which flash-attention's
    varlen kernel would otherwise derive from the position ids in every layer (a device sync
    each); sdpa and eager ignore them."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if "prefix_nodes" in batch:  # pack_shared: only attention.packed_sdpa reads the tree
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
                "prefix_nodes": batch["prefix_nodes"]}
    bounds = batch["cu_seq_lens"]
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {
        "input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest,
    }


def input_tokens(batch: dict) -> torch.Tensor:
    """Real (non-padding) input tokens of a micro-batch; a packed row has no padding."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


# ----------------------------------------------------------------------------- loss


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy of every position, (B, T), 0 where the target is -100. Computed ``chunk``
    positions at a time in fp32, so the fp32 copy of the logits never exists whole."""
    batch_size, length, vocab = logits.shape
    flat_logits, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
    pieces = [
        F.cross_entropy(flat_logits[i : i + chunk].float(), flat_targets[i : i + chunk], ignore_index=IGNORE, reduction="none")
        for i in range(0, flat_targets.numel(), chunk)
    ]
    return torch.cat(pieces).view(batch_size, length)


def source_sums(values: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Sum a (B, T) tensor per source: (2,) = [agent, general]. ``source`` is per row (B,),
    or per token (B, T) in a packed row."""
    if source.dim() == 1:
        per_row = values.sum(dim=1)
        is_agent = source == AGENT
        return torch.stack([per_row[is_agent].sum(), per_row[~is_agent].sum()])
    is_agent = source == AGENT
    return torch.stack([values[is_agent].sum(), values[~is_agent].sum()])


def loss_impl(accelerator, loss_cfg: LossConfig) -> str:
    """loss.impl with auto resolved: chunked where each rank holds the whole lm_head weight.
    FSDP and ZeRO-3 gather a layer's weights only inside the model's forward; the chunked head
    calls lm_head after it returns, so there the model computes the logits itself."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    sharded = kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    )
    if loss_cfg.impl == "auto":
        return "logits" if sharded else "chunked"
    if sharded and loss_cfg.impl != "logits":
        raise ConfigError(
            f"loss.impl: {loss_cfg.impl} calls lm_head outside the model's forward, where {kind.value} has "
            "sharded its weight; use loss.impl=auto or logits"
        )
    if loss_cfg.impl == "liger":
        if accelerator.device.type != "cuda":
            raise ConfigError(f"loss.impl: liger runs Triton kernels on CUDA, not on {accelerator.device.type}; use chunked")
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("loss.impl: liger needs Liger-Kernel: pip install liger-kernel (or use chunked)")
    return loss_cfg.impl


def chunk_nll(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


class FrozenHeadNLL(torch.autograd.Function):
    """Cross-entropy of hidden states (K, H) through a frozen bias-free head (V, H), with the
    gradient with respect to the hidden states computed in the forward, ``chunk`` rows at a time.

    Per row, d CE / d hidden = (softmax(logits) - onehot(target)) @ W, and the loss's upstream
    gradient is one number per row, so the forward can keep (K, H) instead of any (chunk, V)
    logits, and the backward only scales it. Against the checkpointed chunks of ``head_nll``
    this skips recomputing the logits and the log-softmax backward. Only for a frozen head: the
    head's own gradient would need the upstream gradient inside the sum over rows.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        nll, grads = [], []
        for i in range(0, len(targets), chunk):
            h, t = hidden[i : i + chunk], targets[i : i + chunk]
            logits = (h @ weight.T).float()  # (chunk, V), in the compute dtype then fp32, as lm_head(h).float()
            # In place, one (chunk, V) buffer: half the time of logsumexp then softmax on this CPU.
            top, target = logits.amax(dim=-1, keepdim=True), logits.gather(1, t[:, None])
            total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)  # logits now hold exp(logit - top)
            nll.append((top + total.log() - target).squeeze(1))
            if ctx.needs_input_grad[0]:
                probs = logits.div_(total)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grads.append(probs.to(weight.dtype) @ weight)  # (chunk, H)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.cat(grads))
        return torch.cat(nll)

    @staticmethod
    def backward(ctx, grad_nll):
        (grads,) = ctx.saved_tensors
        return (grad_nll[:, None] * grads).to(grads.dtype), None, None, None


def frozen_plain_head(lm_head: torch.nn.Module) -> bool:
    return type(lm_head) is torch.nn.Linear and lm_head.bias is None and not lm_head.weight.requires_grad


def head_nll(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy of each hidden state (K, H) against its target (K,): (K,) in fp32.

    ``chunk`` rows at a time. A frozen plain head (LoRA without include_embeddings, freeze
    tuning) goes through FrozenHeadNLL. Otherwise each chunk runs under activation checkpointing:
    a chunk's logits (chunk, V) are freed once its loss is known and recomputed in backward, so
    at most one chunk of logits exists at any moment. Calling the lm_head module (not its
    weight) keeps a LoRA adapter on it in the graph.
    """
    if frozen_plain_head(lm_head):
        weight = lm_head.weight
        if torch.is_autocast_enabled(hidden.device.type):  # a custom Function is not autocast: cast as autocast would
            weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        return FrozenHeadNLL.apply(hidden.to(weight.dtype), weight, targets, chunk)
    pieces = []
    for i in range(0, len(targets), chunk):
        h, t = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(chunk_nll, lm_head, h, t, use_reentrant=False))
        else:  # evaluation: nothing to recompute
            pieces.append(chunk_nll(lm_head, h, t))
    return torch.cat(pieces)


def liger_source_sums(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                      weights: torch.Tensor, source: torch.Tensor, sum_ce=None) -> torch.Tensor:
    """Σ weight·CE per source, (2,), with Liger's fused linear cross-entropy, which never builds
    the logits and computes its gradients during the forward.

    Its kernel reduces to one sum and knows no per-token weights, so the tokens are grouped by
    (source, weight) (a handful of groups: weights are 1.0 and a few loss-scale values) and each
    group's summed CE is scaled by its weight. ``sum_ce(hidden, weight, targets)`` is the kernel;
    tests pass a plain-torch one.
    """
    if sum_ce is None:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def sum_ce(h, w, t):
            return liger_fused_linear_cross_entropy(h, w, t, reduction="sum")

    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        raise ConfigError(
            f"loss.impl: liger needs a plain bias-free nn.Linear lm_head, this model has {type(lm_head).__name__} "
            "(a LoRA adapter on it: tuner.include_embeddings=true); use loss.impl=chunked"
        )
    weight = lm_head.weight
    if torch.is_autocast_enabled(hidden.device.type):  # a custom kernel is not autocast: cast as autocast would
        weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
    hidden = hidden.to(weight.dtype)
    sums = []
    for src in (AGENT, 1 - AGENT):
        total = hidden.new_zeros((), dtype=torch.float32)
        in_source = source == src
        for value in torch.unique(weights[in_source]).tolist():
            group = in_source & (weights == value)
            total = total + value * sum_ce(hidden[group], weight, targets[group]).float()
        sums.append(total)
    return torch.stack(sums)


def source_nll(accelerator, model, batch: dict, impl: str, chunk: int) -> torch.Tensor:
    """Σ weight·CE per source over one micro-batch: (2,) = [agent, general], differentiable.

    logits: the model's own lm_head gives (B, T, V) logits for every position. chunked and liger:
    the model stops at its final hidden states (B, T, H) (logits_to_keep=1 makes its lm_head
    score one position, which the loss ignores), and only the K trained positions meet lm_head.
    """
    if impl == "logits":
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        nll = token_nll(logits, batch["targets"], chunk)  # (B, T)
        return source_sums(nll * batch["target_weights"], batch["source"])
    hidden = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # (B, T, H)
    trained = batch["target_weights"] > 0  # (B, T)
    source = batch["source"]
    if source.dim() == 1:
        source = source[:, None].expand_as(trained)
    weights = batch["target_weights"][trained]  # (K,)
    targets = batch["targets"][trained]
    if not trained.any():
        # Nothing to train here, but lm_head must still be in the graph: under DDP every
        # parameter's gradient (zero) is part of the step's all-reduce.
        trained = torch.zeros_like(trained)
        trained[0, 0] = True
        weights, targets = weights.new_zeros(1), torch.zeros(1, dtype=torch.long, device=trained.device)
    lm_head = accelerator.unwrap_model(model).get_output_embeddings()
    with accelerator.autocast():  # the model's forward runs under it; its lm_head must too
        if impl == "liger":
            return liger_source_sums(lm_head, hidden[trained], targets, weights, source[trained])
        nll = head_nll(lm_head, hidden[trained], targets, chunk)  # (K,)
    is_agent = source[trained] == AGENT
    weighted = nll * weights
    return torch.stack([weighted[is_agent].sum(), weighted[~is_agent].sum()])


def source_counts(batch: dict) -> torch.Tensor:
    """Weighted trained-token count per source, (2,): the sum of the token weights."""
    return source_sums(batch["target_weights"], batch["source"])


def check_sources_weighted(sources: set[int], lambda_agent: float) -> None:
    """Refuse a λ that gives every source in the training data weight 0 (general-only data at
    λ=1, agent-only at λ=0): the loss would be 0 at every step and nothing would train."""
    weights = {SOURCE_IDS["agent"]: lambda_agent, SOURCE_IDS["general"]: 1.0 - lambda_agent}
    if sources and all(weights[s] == 0 for s in sources):
        only, other, fix = (("general", "agent", "below 1") if sources == {SOURCE_IDS["general"]}
                            else ("agent", "general", "above 0"))
        raise ConfigError(f"loss.lambda_agent: {lambda_agent:g} gives {only} data no weight, and the training data holds "
                          f"only {only} samples, so the loss would be 0 and nothing would train. Set loss.lambda_agent "
                          f"{fix}, or add {other} data")


def source_scales(counts: torch.Tensor, lambda_agent: float) -> torch.Tensor:
    """Multipliers turning per-source weighted CE sums into the loss: L = Σ_s scale_s · sum_s.

    With both sources present: scale = [λ / N_agent, (1-λ) / N_general], so
    L = λ·L_agent + (1-λ)·L_general, each L_s the weighted mean CE over its N_s weighted tokens.

    When only one source has trained tokens (counted over the whole step, all ranks), the λ
    weights are renormalised over the sources present: that source's mean CE gets weight 1.
    So a batch, or a dataset, with no general data trains at full strength rather than at λ.
    One exception keeps λ's meaning absolute: a source whose own weight is 0 (general at λ=1,
    agent at λ=0) never contributes, so a step holding only that source has L = 0, no gradient.
    """
    present = counts > 0
    mix = torch.tensor([lambda_agent, 1.0 - lambda_agent], dtype=torch.float32, device=counts.device)
    mix = mix * present
    if mix.sum() == 0:
        return torch.zeros_like(mix)
    mix = mix / mix.sum()
    return torch.where(present, mix / counts.clamp_min(1e-12), torch.zeros_like(mix))


@dataclass
class StepLoss:
    """Global (all ranks, whole accumulation window) numbers of one optimizer step."""

    loss: float
    loss_agent: float | None  # weighted mean CE over agent tokens; None when the step had none
    loss_general: float | None
    trained_tokens: int  # tokens with a non-zero weight
    tokens: int  # non-padding input tokens


def _per_source(sums: torch.Tensor, counts: torch.Tensor) -> list[float | None]:
    return [(s / c).item() if c > 0 else None for s, c in zip(sums, counts)]


def forward_backward(accelerator, model, batches: list[dict], loss_cfg: LossConfig) -> StepLoss:
    """Accumulate one optimizer step's gradients over ``batches`` and return its loss. The
    window is all of ``batches``, however many (packed steps vary in count, never across ranks).

    The denominators of both loss parts are the weighted-token counts of the WHOLE step: every
    micro-batch of the accumulation window on every rank, summed before any backward. A mean of
    per-micro-batch means would instead over-weight the tokens of short samples.
    """
    if len(batches) != accelerator.gradient_accumulation_steps:
        accumulate_over(accelerator, len(batches))
    impl = loss_impl(accelerator, loss_cfg)
    device = accelerator.device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    local = sum(
        torch.cat([source_counts(b), (b["target_weights"] > 0).sum().view(1), input_tokens(b).view(1)])
        for b in batches
    )
    totals = accelerator.reduce(local.float(), reduction="sum")  # [N_agent, N_general, trained, tokens]
    counts = totals[:2]
    scales = source_scales(counts, loss_cfg.lambda_agent)
    # Each micro-batch's loss below is already its share of the global loss. accelerator.backward
    # divides by the accumulation steps (DeepSpeed's engine does the same itself) and data
    # parallelism averages gradients over ranks, so multiply both back: the summed gradient is
    # then exactly that of the global loss.
    undo_means = accelerator.gradient_accumulation_steps * accelerator.num_processes
    sums = torch.zeros(2, device=device)
    for batch in batches:
        with accelerator.accumulate(model):
            part = source_nll(accelerator, model, batch, impl, loss_cfg.ce_chunk_tokens)  # (2,)
            accelerator.backward((part * scales).sum() * undo_means)
            sums += part.detach()
    if not accelerator.sync_gradients:
        raise RuntimeError("accumulation window out of step with Accelerate: gradients were not synchronised")
    sums = accelerator.reduce(sums, reduction="sum")
    loss_agent, loss_general = _per_source(sums, counts)
    return StepLoss(
        loss=(sums * scales).sum().item(),
        loss_agent=loss_agent,
        loss_general=loss_general,
        trained_tokens=int(totals[2].item()),
        tokens=int(totals[3].item()),
    )


def accumulate_over(accelerator, num_micro_batches: int) -> None:
    """Make this step's accumulation window ``num_micro_batches`` long (packed steps vary; every
    rank has the same count, see packed_micro_batches). Accelerate ends a window, syncing the
    gradients, when its micro-batch counter reaches a multiple of the window, so the counter
    restarts too. backward's division follows the new count, and forward_backward undoes it."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # its engine keeps the count it was built with
        raise ValueError(
            f"{num_micro_batches} micro-batches for DeepSpeed's {accelerator.gradient_accumulation_steps} accumulation steps"
        )
    accelerator.gradient_accumulation_steps = num_micro_batches
    accelerator.step = 0


def clip_gradients(accelerator, model, max_norm: float) -> float | None:
    """Clip to ``max_norm`` (<= 0: measure only) and return the pre-clip global norm.
    None under DeepSpeed, whose engine clips by itself and reports the norm later."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    return None if norm is None else float(norm)


def check_finite(step: int, loss: float, grad_norm: float | None, on_nonfinite: str) -> bool:
    """True when the update may be applied. On NaN/inf: raise (stop) or return False (skip).
    Every rank sees the same reduced loss and norm, so all ranks take the same branch."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return True
    message = f"step {step}: non-finite loss={loss} or grad_norm={grad_norm}"
    if on_nonfinite == "stop":
        raise FloatingPointError(
            f"{message}. Stopping before the update, so no checkpoint holds it. Lower train.lr, "
            "check the data for empty or extreme samples, or set train.on_nonfinite=skip to drop such steps."
        )
    log.warning("%s: update skipped (train.on_nonfinite=skip)", message)
    return False


@torch.no_grad()
def evaluate(accelerator, model, dataset, micro_batch_size: int, pad_id: int, loss_cfg: LossConfig) -> dict[str, float | None]:
    """eval/loss, eval/loss_agent, eval/loss_general over the whole eval split (all ranks),
    normalised exactly like the training loss."""
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, len(dataset), world))
    # Every rank runs the same number of forwards (collectives inside wrapped models must pair up);
    # a rank whose shard is short re-reads row 0 with its weights zeroed.
    num_batches = math.ceil(math.ceil(len(dataset) / world) / micro_batch_size)
    impl = loss_impl(accelerator, loss_cfg)
    totals = torch.zeros(4, device=accelerator.device)  # [sum_agent, sum_general, N_agent, N_general]
    model.eval()
    for b in range(num_batches):
        rows = shard[b * micro_batch_size : (b + 1) * micro_batch_size]
        batch = collate(dataset[rows or [0]], pad_id)
        if not rows:
            batch["target_weights"].zero_()
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        totals[:2] += source_nll(accelerator, model, batch, impl, loss_cfg.ce_chunk_tokens)
        totals[2:] += source_counts(batch)
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    sums, counts = totals[:2], totals[2:]
    loss_agent, loss_general = _per_source(sums, counts)
    loss = (sums * source_scales(counts, loss_cfg.lambda_agent)).sum().item()
    return {"eval/loss": loss, "eval/loss_agent": loss_agent, "eval/loss_general": loss_general}


# ----------------------------------------------------------------------------- optimizer


def param_groups(model: torch.nn.Module, train: TrainConfig, loraplus_lr_ratio: float | None) -> list[dict]:
    """AdamW groups. Matrices decay; biases and norm weights (1-D) do not (nanoGPT's rule).
    With LoRA+, the B matrices learn loraplus_lr_ratio times faster."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2
        fast = loraplus_lr_ratio is not None and (".lora_B." in name or ".lora_embedding_B." in name)
        groups.setdefault((decay, fast), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": train.weight_decay if decay else 0.0,
            "lr": train.lr * (loraplus_lr_ratio if fast else 1.0),
        }
        for (decay, fast), params in sorted(groups.items())
    ]


def optimizer_impl_flags(impl: str, strategy: str, devices: set[str]) -> dict:
    """torch.optim.AdamW's fused/foreach arguments for train.optimizer_impl. auto fuses under
    plain data parallel with every trained weight on a CPU or CUDA device: DeepSpeed and FSDP
    swap in sharded parameters after the optimizer is built. On the demo's CPU the fused update
    of 42 M fp32 weights takes 24 ms against 126 ms one parameter at a time, torch's CPU
    default (BENCHMARKS.md)."""
    if impl == "fused" or (impl == "auto" and strategy == "ddp" and devices <= {"cpu", "cuda"}):
        return {"fused": True}
    if impl in ("foreach", "for_loop"):
        return {"foreach": impl == "foreach"}
    return {}


def build_optimizer(model: torch.nn.Module, train: TrainConfig, loraplus_lr_ratio: float | None,
                    strategy: str = "ddp") -> torch.optim.AdamW:
    groups = param_groups(model, train, loraplus_lr_ratio)
    devices = {p.device.type for g in groups for p in g["params"]}
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
        **optimizer_impl_flags(train.optimizer_impl, strategy, devices),
    )


def build_scheduler(optimizer, train: TrainConfig, total_steps: int, num_processes: int):
    """Warmup then cosine (or linear/constant), sized for Accelerate: a prepared scheduler ticks
    num_processes times per optimizer step (it assumes the dataloader was sharded), so both
    lengths are counted in those ticks."""
    from transformers import get_scheduler

    if train.max_minutes > 0:  # the schedule follows progress, not a step count fixed in advance
        return torch.optim.lr_scheduler.LambdaLR(optimizer, ProgressSchedule(train.scheduler, train.warmup_ratio))
    return get_scheduler(
        train.scheduler,
        optimizer,
        num_warmup_steps=train.warmup_steps(total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
    )


class ProgressSchedule:
    """The LR multiplier as a function of the run's progress p in [0, 1] (warm-up over the first
    warmup_ratio of it, then cosine, linear or constant), for runs with a time budget: the loop sets
    ``progress`` to max(steps done / step limit, time trained / budget) before each scheduler tick,
    so warm-up and decay fit however many steps the budget turns out to hold. A callable object,
    not a function: LambdaLR's state_dict then saves (and a resumed run restores) ``progress``;
    how many times a prepared scheduler ticks per step does not matter."""

    def __init__(self, kind: str, warmup_ratio: float):
        self.kind, self.warmup_ratio, self.progress = kind, warmup_ratio, 0.0

    def __call__(self, _tick: int) -> float:
        p = min(max(self.progress, 0.0), 1.0)
        if p < self.warmup_ratio:
            return p / self.warmup_ratio
        if self.kind == "constant_with_warmup":
            return 1.0
        decayed = (p - self.warmup_ratio) / (1.0 - self.warmup_ratio)
        if self.kind == "linear":
            return 1.0 - decayed
        return 0.5 * (1.0 + math.cos(math.pi * decayed))  # cosine


class TimeBudget:
    """train.max_minutes: how long the loop has trained (wall clock, evaluations and saves
    included, earlier runs of a resumed one too) and whether one more step still fits.

    Every rank must stop at the same step and use the same learning rate, so ``update`` takes the
    largest elapsed time over the ranks (one small all-gather a step)."""

    def __init__(self, accelerator, minutes: float, spent_s: float, clock=time.monotonic):
        self.accelerator, self.limit_s, self.spent_s, self.clock = accelerator, minutes * 60.0, spent_s, clock
        self.start, self.steps, self.elapsed_s = clock(), 0, spent_s

    def update(self) -> float:
        """Seconds trained so far, agreed over the ranks; call once after each optimizer step."""
        self.steps += 1
        local = torch.tensor([self.spent_s + self.clock() - self.start], device=self.accelerator.device)
        self.elapsed_s = float(self.accelerator.gather(local).max())
        return self.elapsed_s

    @property
    def progress(self) -> float:
        return self.elapsed_s / self.limit_s

    def exhausted(self) -> bool:
        """True when another step of this run's mean length would end past the budget."""
        mean_step = (self.elapsed_s - self.spent_s) / max(self.steps, 1)
        return self.elapsed_s + mean_step > self.limit_s


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done; also the data position (see step_rows)
    micro_step: int = 0  # forward/backward passes done on this rank
    samples_seen: int = 0
    trained_tokens: int = 0
    skipped_steps: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    world_size: int = 1
    wandb_run_id: str | None = None
    train_seconds: float = 0.0  # wall clock of the loop so far, over all runs of a resumed one

    def record_eval(self, eval_loss: float) -> bool:
        """Note an eval result; True when it is the best so far."""
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss:
            self.best_eval_loss, self.best_step, self.evals_since_best = eval_loss, self.step, 0
            return True
        self.evals_since_best += 1
        return False


CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
ACCELERATE_STATE = "accelerate"  # a checkpoint's accelerator.save_state dir, under DeepSpeed and FSDP


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights (the adapter, or the whole model for tuner=full), by parameter name.
    named_parameters() lists a tied weight once, so every tensor is saved once."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def shards_state(accelerator) -> bool:
    """True under DeepSpeed and FSDP: each rank holds only a shard of the optimizer state (and
    under ZeRO-3 and FSDP2 of the weights), so checkpoints go through Accelerate's save_state."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def gathered_trainable_state(accelerator, model) -> dict[str, torch.Tensor]:
    """trainable_state of the whole model on rank 0, whatever the sharding. Every rank must call
    it: under ZeRO-3 and FSDP2 accelerator.get_state_dict is a collective that gathers the full
    tensors to rank 0 (ZeRO-3: in 16 bit); the other ranks get {}."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    kind = accelerator.distributed_type
    partitioned = kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    )
    if not partitioned:
        return trainable_state(unwrapped)
    trained = {name for name, p in unwrapped.named_parameters() if p.requires_grad}
    full = accelerator.get_state_dict(model) or {}
    return {name: t.detach().cpu().contiguous() for name, t in full.items() if name in trained}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a directory so that an interruption never leaves a half-deleted ``step-N``:
    rename it out of the candidates first (atomic), then delete."""
    trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """``step-N`` directories, newest first. Temp (``.tmp-*``) and trash dirs never match."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def is_loadable(checkpoint: Path) -> bool:
    """The manifest in state.json is present and every file it lists has its recorded size."""
    try:
        manifest = json.loads((checkpoint / STATE_FILE).read_text())["files"]
        return all((checkpoint / name).stat().st_size == size for name, size in manifest.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to start from: None (fresh), the newest loadable one (auto), or the given dir."""
    candidates = checkpoint_dirs(output_dir)
    if resume is None:
        if candidates:
            raise ConfigError(
                f"resume: {output_dir} already holds checkpoints ({candidates[0].name}, ...). "
                "Pass resume=auto to continue from the newest one, or choose another output_dir."
            )
        return None
    if resume == "auto":
        for checkpoint in candidates:
            if is_loadable(checkpoint):
                return checkpoint
            log.warning("skipping %s: incomplete or damaged", checkpoint)
        return None
    checkpoint = Path(resume)
    if not is_loadable(checkpoint):
        raise ConfigError(f"resume: {checkpoint} is not a complete checkpoint (no valid {STATE_FILE} manifest)")
    return checkpoint


def clean_incomplete(output_dir: Path) -> None:
    """Remove temp and trash dirs left by a run killed while saving or rotating (rank 0)."""
    root = output_dir / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(output_dir: Path, keep: int, best_step: int | None) -> None:
    """Keep the ``keep`` newest checkpoints plus the best one."""
    for checkpoint in checkpoint_dirs(output_dir)[keep:]:
        if best_step is None or checkpoint.name != f"step-{best_step}":
            _discard(checkpoint)


def _attempt(write) -> BaseException | None:
    """Run one rank's share of a save; return a failed write instead of raising it, so that
    every rank reaches the agreement in ``_agree_saved`` (a rank that raised alone would leave
    the others waiting in a barrier until the collective timeout)."""
    try:
        write()
    except Exception as e:
        if not is_write_error(e):
            raise
        return e
    return None


def _agree_saved(accelerator, failure: BaseException | None, tmp: Path, what: str, output_dir: Path) -> None:
    """A barrier that also tells every rank whether any rank's write failed; if one did, the
    temp dir goes (it holds a partial save that only takes space) and every rank raises SaveError."""
    failed = torch.tensor([float(failure is not None)], device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item() == 0:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is None:
        raise SaveError(f"writing {what} failed on another rank (its message names the cause)")
    last = next((p for p in checkpoint_dirs(output_dir) if is_loadable(p)), None)
    raise SaveError(
        f"could not write {what}: {_cause(failure)}. {free_space_line(output_dir)}. "
        + (f"The last complete checkpoint is {last} (resume=auto continues from it). " if last else "")
        + "Free space, lower train.save_total_limit, or set output_dir to a larger disk."
    )


def _cause(e: BaseException) -> str:
    if isinstance(e, RuntimeError):  # torch.save's zip writer names no OS error
        return f"a write by torch.save failed ({str(e).strip()})"
    return str(e)


def save_footprint(model: torch.nn.Module, keep: int) -> tuple[int, int, int]:
    """Bytes of (one checkpoint, final/, the most the run holds at once), estimated before the
    first save. A checkpoint holds the trainable weights and AdamW's two moments of each (the
    optimizer's state is lazily allocated, so it cannot be read yet); final/ holds the adapter,
    or for a full fine-tune every weight in the model's dtype. At most ``keep`` newest
    checkpoints, the best one and the one being written exist together, beside final/."""
    params = list(model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    moments = 2 * sum(p.numel() * 4 for p in params if p.requires_grad)  # AdamW keeps them in fp32
    checkpoint = trainable + moments
    if hasattr(model, "peft_config"):
        final = trainable
    else:
        dtype = getattr(model.config, "dtype", None)
        final = sum(p.numel() * (dtype.itemsize if isinstance(dtype, torch.dtype) and p.is_floating_point()
                                 else p.element_size()) for p in params)
    return checkpoint, final, (keep + 2) * checkpoint + final


def check_free_space(model: torch.nn.Module, output_dir: Path, keep: int) -> str | None:
    """A warning when ``output_dir``'s disk cannot hold what the run will write; None when it can.
    A warning, not an error: the estimate is rough and space may be freed while the run trains."""
    checkpoint, final, most = save_footprint(model, keep)
    free = free_bytes(output_dir)
    if free >= most:
        return None
    return (f"{output_dir} has {gib(free)} free, and this run writes about {gib(most)}: up to {keep + 2} "
            f"checkpoints of {gib(checkpoint)} (train.save_total_limit={keep}, the best and the one being "
            f"written) and final/ of {gib(final)}. A save that finds the disk full stops the run; free "
            "space, lower train.save_total_limit, or set output_dir to a larger disk.")


def save_checkpoint(
    accelerator, model, optimizer, scheduler, state: TrainState, output_dir: Path, config_yaml: str, keep: int
) -> Path:
    """Write ``checkpoints/step-N/`` atomically: everything goes into a temp dir, is fsynced, and
    the dir is renamed into place last. A kill at any moment leaves either the complete
    checkpoint or no ``step-N`` at all. Every rank must call this (each saves its RNG state)."""
    root = output_dir / "checkpoints"
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    weights = gathered_trainable_state(accelerator, model)  # full tensors on rank 0
    bad = torch.tensor([float(not all(torch.isfinite(t).all() for t in weights.values()))], device=accelerator.device)
    if accelerator.reduce(bad, reduction="sum").item() > 0:  # every rank raises, none waits forever
        raise FloatingPointError(f"step {state.step}: the weights hold NaN/inf; refusing to write a checkpoint of them")
    failure = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _attempt(lambda: tmp.mkdir(parents=True))
    _agree_saved(accelerator, failure, tmp, f"checkpoint {final}", output_dir)
    failure = _attempt(lambda: torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt"))  # per rank
    if shards_state(accelerator):  # each rank writes its optimizer (and weight) shards; all must call it
        failure = _attempt(lambda: accelerator.save_state(str(tmp / ACCELERATE_STATE))) or failure
    if accelerator.is_main_process and failure is None:
        failure = _attempt(lambda: _write_checkpoint_files(tmp, weights, optimizer, scheduler, config_yaml,
                                                           sharded=shards_state(accelerator)))
    _agree_saved(accelerator, failure, tmp, f"checkpoint {final}", output_dir)
    failure = None
    if accelerator.is_main_process:
        failure = _attempt(lambda: _seal_checkpoint(tmp, state))
        if failure is None:
            if final.exists():  # re-reaching a step after resuming from an older checkpoint
                _discard(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            rotate_checkpoints(output_dir, keep, state.best_step)
    _agree_saved(accelerator, failure, tmp, f"checkpoint {final}", output_dir)
    return final


def _write_checkpoint_files(tmp: Path, weights: dict, optimizer, scheduler, config_yaml: str, sharded: bool) -> None:
    save_file(weights, tmp / "trainable.safetensors")  # gathered: loadable without the shards
    if not sharded:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "config.yaml").write_text(config_yaml)


def _seal_checkpoint(tmp: Path, state: TrainState) -> None:
    """fsync every file, then write the manifest that makes the checkpoint loadable."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())  # accelerate/ holds nested shard dirs
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    manifest = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
    (tmp / STATE_FILE).write_text(json.dumps({"state": asdict(state), "files": manifest}, indent=1))
    with open(tmp / STATE_FILE, "rb") as f:
        os.fsync(f.fileno())


def load_checkpoint(checkpoint: Path, accelerator, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the loop state."""
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    state = TrainState(**saved["state"])
    sharded = (checkpoint / ACCELERATE_STATE).is_dir()
    if sharded != shards_state(accelerator):
        raise ConfigError(
            f"resume: {checkpoint} was written {'with' if sharded else 'without'} sharded state (DeepSpeed/FSDP) "
            f"but this run is {accelerator.distributed_type.value}; resume with the hardware= that wrote it"
        )
    if sharded:  # Accelerate reads back each rank's shards of weights, optimizer and scheduler
        accelerator.load_state(str(checkpoint / ACCELERATE_STATE))
    else:
        load_trainable(checkpoint, accelerator.unwrap_model(model))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
    if state.world_size != accelerator.num_processes:
        log.warning(
            "%s was written by %d processes, this run has %d: the data order is unchanged, "
            "but dropout streams and the lr schedule's ticks differ",
            checkpoint, state.world_size, accelerator.num_processes,
        )
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: numpy state needs pickle
    state.world_size = accelerator.num_processes
    return state


def load_trainable(checkpoint: Path, model: torch.nn.Module) -> None:
    """Copy a checkpoint's trainable.safetensors into the (unwrapped, unsharded) model."""
    weights = load_file(checkpoint / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{checkpoint}: trained weights do not match this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); was it saved with another model or tuner?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


# ----------------------------------------------------------------------------- preemption

REQUEUE_EXIT_CODE = 85
"""train.py's exit status after SIGUSR1: a checkpoint of the last finished step is saved and the
job should be requeued with resume=auto (launch/*.sbatch do). Distinct from 0 (done), 1 (error),
and 128+N (killed by signal N)."""
REQUEUE_MARKER_ENV = "AGENTTUNE_REQUEUE_MARKER"
"""When set, rank 0 also creates this file before exiting 85: ``accelerate launch`` (torchrun)
turns any worker failure into its own exit 1, so a launch script cannot see the 85 through it."""


class Preemption:
    """Set by SIGUSR1, the warning Slurm sends ``--signal=USR1@120`` seconds before the time
    limit. The handler only sets a flag; the loop acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.signalled = False

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True


def catch_preemption() -> Preemption:
    """Install the SIGUSR1 handler on this rank (every rank calls it) and return its flag."""
    preemption = Preemption()
    signal.signal(signal.SIGUSR1, preemption._on_signal)
    return preemption


def preemption_agreed(accelerator, preemption: Preemption) -> bool:
    """True on every rank when SIGUSR1 reached any rank. Called at each step boundary: the ranks
    may get the signal at different moments (or only some of them), and a rank that stopped
    alone would leave the others blocked in the next step's collectives."""
    flag = torch.tensor([float(preemption.signalled)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def leave_process_group() -> None:
    """Destroy the process group before a rank exits on an error. Left to interpreter teardown,
    gloo's threads sometimes abort the process ("terminate called without an active exception",
    exit -6: 1 run in 6 of two CPU ranks stopping on a failed save)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def leave_together(accelerator) -> None:
    """End the run on every rank at once, after the last reference to the prepared model.

    Before, a rank that finished first (rank 0 still plotting and logging) destroyed the process
    group alone while the DDP wrapper it kept still held the group, to be freed in interpreter
    teardown. In one of four suite runs such a rank aborted after its work was done ("terminate
    called without an active exception", exit -6, gloo's threads); it did not recur in 17 runs of
    the test alone or of a two-rank script, so this removes both conditions rather than a cause
    shown. The caller drops its own references to the model first; this drops accelerate's."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()


def exit_for_requeue(accelerator, step: int, checkpoint: Path) -> None:
    """End the run after a preemption checkpoint with REQUEUE_EXIT_CODE (and the marker file)."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if accelerator.is_main_process:
        if marker:
            Path(marker).write_text(f"{checkpoint}\n")
        log.warning("SIGUSR1: stopped after step %d with %s saved; exiting %d so the job is requeued (resume=auto)",
                    step, checkpoint, REQUEUE_EXIT_CODE)
    accelerator.end_training()
    raise SystemExit(REQUEUE_EXIT_CODE)


# ----------------------------------------------------------------------------- final model


def save_final(accelerator, model, tokenizer, path: Path, template: str) -> None:
    """A directory that stock ``PeftModel.from_pretrained`` (adapters) or
    ``AutoModelForCausalLM.from_pretrained`` (tuner=full) loads, with the training tokenizer
    and chat template. Written to a temp dir and renamed, like checkpoints."""
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights; every rank calls it
    tmp = path.with_name(f".tmp-{path.name}")
    failure = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "peft_config"):
            state_dict = in_model_dtype(state_dict, unwrapped.config)

        def write() -> None:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            # Serve with exactly the text the model was trained on (agenttune.data.templates renders both).
            tokenizer.chat_template = get_template(template).chat_template
            tokenizer.save_pretrained(tmp)

        failure = _attempt(write)
        if failure is None:
            if path.exists():
                _discard(path)
            os.rename(tmp, path)
    _agree_saved(accelerator, failure, tmp, f"the final model {path}", path.parent)


def in_model_dtype(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A full model written in the dtype its config names (the one it was loaded in). Freeze
    tuning under bf16 keeps the frozen weights in bf16 and fp32 masters of the trained ones
    (modeling.frozen_in_bf16); final/ holds them all in bf16, as the base was loaded."""
    dtype = getattr(config, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- logging


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def log_metrics(path: Path, entry: dict, run=None) -> None:
    """Append one object to metrics.jsonl and send it to W&B (rank 0 only)."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    if run is not None:
        run.log({k: v for k, v in entry.items() if k != "step" and v is not None}, step=entry["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop entries after ``step``: a killed run may have logged steps its last checkpoint lacks."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """loss.png: training loss (total, agent, general) and eval loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_metrics(metrics_path) if metrics_path.exists() else []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("loss", "-"), ("loss_agent", ":"), ("loss_general", ":"), ("eval/loss", "o-")):
        points = [(e["step"], e[key]) for e in entries if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (weighted)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def init_wandb(cfg: WandbConfig, config: dict, output_dir: Path, run_id: str | None):
    """Rank 0's W&B run, or None when disabled. Offline by default when no API key is set."""
    mode = cfg.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    import wandb

    try:
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or output_dir.name,
            tags=list(cfg.tags),
            config=config,
            dir=str(output_dir),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
        )
    except wandb.errors.Error as e:  # no API key, no network, an unknown entity: before any step is trained
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"wandb.mode: W&B could not start the {mode} run ({first.rstrip('.')}). Set WANDB_API_KEY (or run "
                          "`wandb login`), or pass wandb.mode=offline to log locally and `wandb sync` later, "
                          "or wandb.mode=disabled") from e
