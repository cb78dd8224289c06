"""launch/*.sbatch: valid bash; run against fake sbatch/srun/scontrol/accelerate that record
what they are asked to do, they launch exactly the expected command lines, keep SIGUSR1 away
from the launcher, and requeue the job only when training stopped for requeue."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from agenttune.training import REQUEUE_EXIT_CODE
from test_train_support import ROOT

SCRIPTS = sorted((ROOT / "launch").glob("*.sbatch"))
JOB_ID = 4242

# Each shim appends {"argv": [...], ...} to $SHIM_LOG.
RECORD = f"""#!{sys.executable}
import json, os, signal, sys
def record(**extra):
    with open(os.environ["SHIM_LOG"], "a") as f:
        f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:], **extra}}) + "\\n")
"""

SHIMS = {
    # sbatch: reads --nodes (else the script's #SBATCH --nodes), sets the job environment, runs the script.
    "sbatch": RECORD + """
import re, subprocess
args = sys.argv[1:]
options = []
while args[0].startswith("-"):
    options.append(args.pop(0))
script, overrides = args[0], args[1:]
nodes = [o.split("=")[1] for o in options if o.startswith("--nodes=")]
nodes = int(nodes[0]) if nodes else int(re.search(r"#SBATCH --nodes=(\\d+)", open(script).read()).group(1))
record()
env = dict(os.environ, SLURM_JOB_ID=os.environ["FAKE_JOB_ID"], SLURM_JOB_NUM_NODES=str(nodes),
           SLURM_JOB_NODELIST=f"gpu[{1:03d}-{nodes:03d}]", SLURM_SUBMIT_DIR=os.getcwd())
sys.exit(subprocess.run(["bash", script] + overrides, env=env).returncode)
""",
    # srun: runs its command once per task, as node SLURM_NODEID, and exits with the highest status.
    "srun": RECORD + """
import subprocess
args = sys.argv[1:]
options = []
while args[0].startswith("-"):
    options.append(args.pop(0))
ntasks = int(next((o.split("=")[1] for o in options if o.startswith("--ntasks=")), 1))
record()
codes = [subprocess.run(args, env=dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i))).returncode
         for i in range(ntasks)]
sys.exit(max(codes))
""",
    "scontrol": RECORD + """
record()
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(f"gpu{i:03d}" for i in range(1, int(os.environ["SLURM_JOB_NUM_NODES"]) + 1)))
""",
    # accelerate: notes its node, whether SIGUSR1 is ignored, the rendezvous env; exits as told.
    "accelerate": RECORD + """
record(node=os.environ.get("SLURM_NODEID"), usr1_ignored=signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
       cwd=os.getcwd(), nccl_async=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
if os.environ.get("FAKE_MARKER") and os.environ.get("SLURM_NODEID") == "0":
    open(os.environ["AGENTTUNE_REQUEUE_MARKER"], "w").write("checkpoints/step-7\\n")
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
""",
}


def submit(tmp_path: Path, script: str, overrides: str, options: tuple[str, ...] = (), fake_exit: int = 0,
           marker: bool = False) -> tuple[int, list[dict]]:
    """sbatch the script with the fakes first on PATH; (exit status, recorded calls)."""
    bin_dir, log, submit_dir = tmp_path / "bin", tmp_path / "calls.jsonl", tmp_path / "submit"
    bin_dir.mkdir(exist_ok=True)
    submit_dir.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    for name, text in SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SHIM_LOG=str(log), FAKE_JOB_ID=str(JOB_ID),
               FAKE_EXIT=str(fake_exit), FAKE_MARKER="1" if marker else "")
    command = ["sbatch", *options, str(ROOT / "launch" / script), *overrides.split()]
    proc = subprocess.run(command, cwd=submit_dir, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return proc.returncode, calls


def named(calls: list[dict], tool: str) -> list[dict]:
    return [c for c in calls if c["argv"][0] == tool]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_ask_for_the_requeue_signal(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for directive in ("#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert directive in text, f"{script.name} lacks {directive}"
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}" in text


OVERRIDES = "model=qwen7b output_dir=/shared/runs/a train.lr=1e-4"


def test_one_node_launch_line(tmp_path):
    status, calls = submit(tmp_path, "slurm_1node.sbatch", OVERRIDES)
    assert status == 0
    (srun,) = named(calls, "srun")
    assert srun["argv"][:5] == ["srun", "--ntasks=1", "--kill-on-bad-exit=1", "bash", "-c"]
    assert srun["argv"][6:] == ["agenttune-launch", *OVERRIDES.split()], "overrides pass through as separate words"
    (launch,) = named(calls, "accelerate")
    assert shlex.join(launch["argv"]) == (
        "accelerate launch --multi_gpu --num_machines 1 --num_processes 8 --max_restarts 0 "
        f"train.py hardware=8gpu resume=auto {OVERRIDES}")
    assert launch["usr1_ignored"], "SIGUSR1 must reach the workers, not kill the launcher"
    assert launch["cwd"] == str(tmp_path / "submit") and launch["nccl_async"] == "1"
    assert not named(calls, "scontrol")


def test_two_node_launch_lines(tmp_path):
    status, calls = submit(tmp_path, "slurm_multinode.sbatch", OVERRIDES, options=("--nodes=2",))
    assert status == 0
    assert [c["argv"] for c in named(calls, "scontrol")] == [["scontrol", "show", "hostnames", "gpu[001-002]"]]
    (srun,) = named(calls, "srun")
    assert srun["argv"][:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    port = 20000 + JOB_ID % 20000
    launches = named(calls, "accelerate")
    assert [shlex.join(c["argv"]) for c in launches] == [
        f"accelerate launch --multi_gpu --num_machines 2 --machine_rank {rank} --num_processes 16 "
        f"--main_process_ip gpu001 --main_process_port {port} --rdzv_backend static --same_network "
        f"--max_restarts 0 train.py hardware=multinode resume=auto {OVERRIDES}"
        for rank in (0, 1)]
    assert [c["node"] for c in launches] == ["0", "1"] and all(c["usr1_ignored"] for c in launches)


@pytest.mark.parametrize("script", ["slurm_1node.sbatch", "slurm_multinode.sbatch"])
@pytest.mark.parametrize("fake_exit, marker, requeued, status", [
    (REQUEUE_EXIT_CODE, False, True, 0),  # python train.py's own exit status came through
    (1, True, True, 0),  # accelerate launch turned the workers' 85 into 1; rank 0's marker says why
    (1, False, False, 1),  # a real failure: no requeue, the status is passed on
    (0, False, False, 0),  # finished
])
def test_requeue_only_after_a_preemption_stop(tmp_path, script, fake_exit, marker, requeued, status):
    got, calls = submit(tmp_path, script, "output_dir=/shared/runs/a", fake_exit=fake_exit, marker=marker)
    assert got == status
    assert (["scontrol", "requeue", str(JOB_ID)] in [c["argv"] for c in named(calls, "scontrol")]) == requeued
    assert not list((tmp_path / "submit").glob(".agenttune-requeue-*")), "the marker is consumed"
