"""CPU-only tuning of the process: keep freed memory for reuse.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free. A training step on the CPU allocates its activations, the
logits of the trained positions and their gradients anew each step, so each step page-faults
(and the kernel zeroes) hundreds of megabytes again. On the README demo (SmolLM2-135M, 2 cores)
the step ran at 605-629 tokens/s with glibc's defaults and 714-824 with freed memory kept
(BENCHMARKS.md, the demo's section, "Evening of 2026-12-03").

:func:`keep_freed_memory` asks glibc to serve every block from the heap and to give back only
free heap beyond 2 GiB, the effect of PyTorch's advice to use jemalloc or tcmalloc on CPUs,
without a preloaded library. It only suits a process whose working set is steady, which a training or
inference loop on the CPU is; on a GPU run the host only stages the weights, so it is not called.

:func:`matmul_speeds` and :func:`bf16_is_faster` decide ``hardware.mixed_precision=auto`` on a
CPU. Whether bf16 pays there depends on the chip, and on a cloud VM on what the hypervisor
exposes: the same 2-core VM type here has run a bf16 matmul at 2.4x float32's speed on one day
(oneDNN on AMX or AVX-512 BF16) and at 0.6x on another (BENCHMARKS.md, the demo's section).
So the choice is measured at start-up, not assumed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time

import torch

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap (no mmap) and keep up to 2 GiB of free heap instead
    of returning it to the OS. Returns whether glibc took the settings; on another C library
    (macOS, musl) it changes nothing and returns False."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a stub
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
    if done:
        log.info("glibc malloc keeps freed memory for reuse (no mmap, trim threshold 2 GiB): "
                 "no page faults on each step's fresh activations")
    return done


# bf16 must beat float32 by this much to be chosen: its rounding is a cost, a few percent is noise.
BF16_MARGIN = 1.2


def matmul_speeds(tokens: int = 1024, width: int = 1024, out: int = 2816, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a (tokens × width) @ (width × out) product, a decoder MLP's projection over a
    packed row, in float32 and in bf16 on this process's CPU threads: the best of ``repeats``
    after one warm-up call (oneDNN builds its kernel on the first). About 0.3 s on 2 cores."""
    speeds = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(tokens, width).to(dtype)
        b = torch.randn(out, width).to(dtype)
        torch.nn.functional.linear(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best = min(best, time.perf_counter() - start)
        speeds[name] = 2 * tokens * width * out / best / 1e9
    return speeds


@functools.lru_cache(maxsize=1)
def bf16_is_faster() -> tuple[bool, dict[str, float]]:
    """Whether bf16 matmuls run at least BF16_MARGIN times float32's speed on this CPU, with the
    measured GFLOP/s. Measured once per process."""
    speeds = matmul_speeds()
    return speeds["bf16"] >= BF16_MARGIN * speeds["fp32"], speeds
