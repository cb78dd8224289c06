"""Typed options of the data pipeline. These dataclasses are also the Hydra schema of
the ``data`` config group (``agenttune.config`` registers them), so each default lives here once."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("auto", "ms_agent", "sharegpt", "openai", "alpaca", "react_messages")
TRAIN_ON = ("assistant", "last_assistant", "all")
LOSS_SCALES = ("default", "react", "hermes")
TRUNCATION = ("drop", "keep_turns")
ON_ERROR = ("raise", "skip")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass
class SupervisionConfig:
    """What is trained, and how much each token weighs."""

    train_on: str = "assistant"
    """assistant: every assistant turn; last_assistant: only the final assistant turn
    (LLaMA-Factory mask_history / ms-swift last_round); all: prompts too (train_on_prompt).
    Tool observations are never trained unless observation_weight > 0."""
    loss_scale: str = "default"
    """default: 1.0 on trained tokens; react: Action/Action Input and the Observation: marker 2.0,
    Thought/Final Answer 1.0; hermes: <tool_call>...</tool_call> 2.0."""
    first_token_weight: float = 1.0
    """Multiplies the weight of the first trained token of each assistant turn. In tool-call
    templates (hermes, qwen, llama3) that token decides between calling a tool and answering;
    above 1 it puts more of the loss on that decision (ReAct turns start with ``Thought``)."""
    after_call_weight: float = 1.0
    """Multiplies the weight of the first trained token after each tool call of an assistant
    turn. In the `<tool_call>` templates (qwen, chatml, chatml_compact, chatml_kv) it decides between another
    parallel call (``\\n<tool_call>``) and ending the turn; in react it is the ``Observation:`` marker."""
    name_weight: float = 1.0
    """Multiplies the weight of the tokens of each trained tool call's function name: the tokens
    that choose the tool."""
    observation_weight: float = 0.0
    """Weight of tool-result tokens. 0 means never trained."""
    reasoning_in_history: bool = True
    """Render reasoning of assistant turns before the last user turn. False drops it (as Qwen3 does)."""
    max_length: int = 1500
    """Token budget per sample."""
    truncation: str = "drop"
    """drop: discard longer samples; keep_turns: keep the longest prefix of whole turns that fits."""

    def __post_init__(self) -> None:
        _check("train_on", self.train_on, TRAIN_ON)
        _check("loss_scale", self.loss_scale, LOSS_SCALES)
        _check("truncation", self.truncation, TRUNCATION)
        for name in ("first_token_weight", "after_call_weight", "name_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.observation_weight < 0:
            raise ValueError(f"observation_weight must be >= 0, got {self.observation_weight}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")


@dataclass
class DatasetSpec:
    """One input file (or directory of files) and how to read it."""

    path: str = "???"
    """A .json or .jsonl file (a list of records, or one a line); ``pkg://data/...`` names a file
    that ships inside agenttune, ``synth://NAME`` one of the synthetic world's files."""
    format: str = "auto"
    """auto-detected from the first record unless set: one of FORMATS."""
    source: str = "agent"
    """agent or general: which side of L = λ·L_agent + (1-λ)·L_general its tokens join."""
    sample: float | None = None
    """None: use every record once. A number n: draw n records (with replacement when n exceeds
    the file) so mixes like ms-agent : ms-bench = 1 : 2 are set by counts."""
    balance_by: list[str] = field(default_factory=list)
    """Fields of each raw record (a dotted path reaches into objects: ``meta.task``) whose values
    split this file's records into groups for train.sampler=balanced, which spreads every group
    evenly over each epoch. Empty: the file joins its source's group. A record without one of
    the fields is a data error."""

    def __post_init__(self) -> None:
        _check("format", self.format, FORMATS)
        _check("source", self.source, ("agent", "general"))
        for key in self.balance_by:
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"balance_by: {key!r} is not a field path like meta.task")


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    """The training files, each with its format, source (agent or general) and sample count."""
    eval_datasets: list[DatasetSpec] = field(default_factory=list)
    """Explicit eval files. When empty, eval_ratio of the training records is held out."""
    eval_ratio: float = 0.1
    """Without eval_datasets: this fraction of the training records, drawn with data.seed, is held
    out for eval/loss (at least one record). 0: no evaluation."""
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    on_error: str = "raise"
    """raise: stop at the first bad records (up to 20 listed); skip: drop them, count them
    by reason and write them to rejects_file."""
    rejects_file: str | None = None
    """With on_error=skip: a .jsonl file that receives each dropped record's origin (file and line
    or record index), kind and reason. None: they are only counted, by reason."""
    model_name: str = "agenttune"
    """Fills {{name}} in self-cognition data."""
    model_author: str = "agenttune"
    """Fills {{author}} in self-cognition data."""
    seed: int = 42
    """Seeds the held-out draw of eval_ratio and each dataset's ``sample`` draw."""
    cache: bool = True
    """Save the tokenized datasets under $AGENTTUNE_CACHE/datasets and reuse them while the
    files, this config, the tokenizer and the pipeline code are unchanged. A cache that cannot
    be written (a full disk) is a warning: the run goes on with the data in memory."""

    def __post_init__(self) -> None:
        _check("on_error", self.on_error, ON_ERROR)
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ValueError(f"eval_ratio must be in [0, 1), got {self.eval_ratio}")
