"""The typed config of ``infer.py``, registered as ``infer_schema`` for ``conf/infer.yaml``.

``model`` is the same group (and ModelConfig) as in training, so ``model=qwen7b`` or
``model.path=merged/dir`` work unchanged. With ``adapter=``, the base model and template come
from the run's saved config instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from agenttune.config import TEMPLATES, ConfigError, ModelConfig, register_help
from agenttune.data.options import FORMATS

MODES = ("chat", "agent", "predict", "serve")
DEVICES = ("auto", "cpu", "cuda")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class SamplingConfig:
    """Decoding defaults; serve's requests override them per call."""

    max_new_tokens: int = 512
    """Most tokens generated for one model turn."""
    temperature: float = 0.0
    """0 decodes greedily (reproducible; what predict should use)."""
    top_p: float = 1.0
    """Nucleus sampling when temperature > 0: sample from the smallest set of tokens whose
    probabilities sum to top_p. 1: all tokens."""
    seed: int = 0
    """Seeds sampling when temperature > 0."""
    repetition_penalty: float = 1.0
    """Penalizes tokens already in the sequence, as transformers' repetition_penalty does (a positive
    logit divided by it, a negative one multiplied); 1: off."""

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, "generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature >= 0, "generation.temperature", f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.repetition_penalty > 0, "generation.repetition_penalty", "must be > 0")


@dataclass
class AgentConfig:
    tools: list[str] = field(default_factory=lambda: ["agenttune.demo_tools"])
    """Python modules whose ``TOOLS`` list the agent may call (see agenttune/tools.py)."""
    offer: list[str] | None = None
    """Names of the tools to declare to the model; None declares every tool of agent.tools. A model
    trained on prompts that list a few tools does best when it is offered a few."""
    max_turns: int = 6
    """Model turns per question before giving up without a final answer."""
    query: str | None = None
    """One question to answer; None reads questions from stdin, one per line."""
    save: str | None = None
    """Append each trajectory to this JSONL file as a ShareGPT training record."""

    def __post_init__(self) -> None:
        _require(self.max_turns >= 1, "agent.max_turns", f"must be >= 1, got {self.max_turns}")
        _require(bool(self.tools), "agent.tools", "name at least one tools module, e.g. agenttune.demo_tools")


@dataclass
class PredictConfig:
    input: list[str] = field(default_factory=list)
    """Eval files, any supported format (ms_agent, sharegpt, openai, alpaca, react_messages)."""
    format: str = "auto"
    """The input files' format; auto detects it from each file's first record."""
    source: str | None = None
    """agent or general for every record; None: agent when a record declares tools, else general."""
    output_dir: str = "predictions"
    """Gets predictions.jsonl and metrics.json."""
    batch_size: int = 8
    """Prompts generated together (left-padded)."""
    limit: int = 0
    """Score only the first N records of each input file; 0 scores all."""
    baseline: bool = False
    """With adapter=: also score the base model and print a before/after table. A LoRA/DoRA run's
    base is the same model with its adapter switched off; a tuner=full run's is the model its saved
    config names, loaded beside the tuned one."""
    compare: str | None = None
    """A metrics.json (or the dir holding it) from an earlier predict run: printed as "before"."""

    def __post_init__(self) -> None:
        _require(self.format in FORMATS, "predict.format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        _require(self.source in (None, "agent", "general"), "predict.source", "must be agent, general or null")
        _require(self.batch_size >= 1, "predict.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.limit >= 0, "predict.limit", f"must be >= 0, got {self.limit}")


@dataclass
class InferConfig:
    mode: str = "chat"
    """chat (interactive REPL), agent (call real tools), predict (score an eval file), serve (OpenAI API)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: str | None = None
    """A run's final/ dir or checkpoints/step-N dir; the base model and template come from its config."""
    template: str | None = None
    """Overrides the chat template; None: the run's (with adapter=), the one a merged dir was saved
    with, else model.template."""
    system: str | None = None
    """System prompt for chat and agent."""
    device: str = "auto"
    """auto (CUDA when there is a GPU, else CPU), cpu or cuda."""
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    host: str = "127.0.0.1"
    """mode=serve: the address to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """mode=serve: the TCP port."""
    served_name: str | None = None
    """Model id /v1/models reports; None uses model.name."""
    max_queue: int = 64
    """Requests waiting for the model beyond this get 503 rather than piling up."""

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        _require(self.template is None or self.template in TEMPLATES, "template",
                 f"{self.template!r} is not one of {', '.join(TEMPLATES)}")
        _require(self.device in DEVICES, "device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        _require(0 < self.port < 65536, "port", f"must be a TCP port, got {self.port}")
        _require(self.max_queue >= 1, "max_queue", f"must be >= 1, got {self.max_queue}")
        if self.mode == "predict":
            _require(bool(self.predict.input), "predict.input", "name the eval file(s): predict.input=[a.jsonl,b.json]")


INFER_USAGE = """
infer.py: talk to a tuned agent: chat with it, let it call real tools, score it on an eval file,
or serve it behind an OpenAI-compatible API.

    python infer.py adapter=outputs/demo/RUN/final                  # mode=chat: a REPL on stdin
    python infer.py mode=agent adapter=RUN/final "agent.query='Weather in Oslo on 2025-05-02?'"
    python infer.py mode=predict adapter=RUN/final predict.input=[eval.jsonl] predict.baseline=true
    python infer.py mode=serve model.path=merged/a port=8000        # then openai.OpenAI(base_url=...)

adapter= loads a run's final/ or checkpoints/step-N with the base model and template from its
config; model= or model.path= loads a base or merged model.
"""

ConfigStore.instance().store(name="infer_schema", node=InferConfig)
register_help("agenttune_infer", "infer.py", INFER_USAGE, InferConfig, groups="infer.py reads only model=option")
