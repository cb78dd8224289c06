"""agenttune.cpu: freed memory kept for reuse on glibc."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from test_train_support import env

# A training step's pattern of allocations: large buffers (above glibc's 32 MiB mmap ceiling and
# below it) alive together, then all freed; the page faults of 20 such steps after 2 warm-up ones.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from agenttune.cpu import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def step():
        held = [torch.ones(n) for n in (30 * 2**20, 9 * 2**20, 2 * 2**20, 30 * 2**20, 500_000)]
        return sum(float(t[0]) for t in held)
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_memory_is_reused_without_page_faults():
    """With glibc's defaults every step maps its large buffers afresh and faults each page in
    again (about 70,000 pages a step here); with keep_freed_memory the heap's blocks are reused."""
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 20 * 30_000, default
    assert kept * 10 < default, (kept, default)
