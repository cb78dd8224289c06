"""Keep the agent trajectories worth training on; count and explain every one dropped.

    python -m agenttune.data.filter INPUT [INPUT ...] --out FILE [--rejects FILE] [--report FILE]
        [--format auto|fireact_trajectories|ms_agent|sharegpt|openai|alpaca|react_messages]
        [--tools MODULE] [--tool-names NAME,...] [--max-chars N] [--max-tokens N [--tokenizer PATH]] [--template T]
        [--min-reward X] [--allow-unrewarded]

A record is kept when it passes every check below; the first one it fails is its reject reason:

1. it decodes (``invalid_json``);
2. it is marked successful: a ``reward`` (or ``success``) field that is true, or a number
   >= --min-reward (``no_reward``, ``bad_reward``, ``failed``);
3. our readers read it (their kinds: ``role_order``, ``bad_arguments``, ``unknown_tool``, ...);
4. it ends with a final answer: a reply without tool calls, or a ``finish[...]`` action
   (the ReAct/FireAct convention) (``no_final_answer``);
5. every tool call names a known tool and its arguments are valid against that tool's JSON
   schema (``unknown_tool``, ``invalid_arguments``). Schemas come from the record's own
   ``tools`` and from --tools modules; --tool-names lists names allowed where no schema
   exists (FireAct's ``search[...]`` actions have none). Calls with no known schema are
   counted as ``unchecked_calls`` in the report, not rejected;
6. its rendering with --template fits --max-chars / --max-tokens (``too_long``);
7. it is not a duplicate of a record kept before it: same messages after whitespace
   normalisation (``duplicate``).

Kept records are written as they were read, except FireAct trajectory records (``{"reward",
"traj", ...}``), which become ``react_messages`` records: the question as the user turn, each
``Thought/Action`` step as an assistant turn and each result as an ``Observation:`` user turn,
which the reader turns into tool messages that are never trained. The grader's
``Observation: Episode finished, reward = ...`` after ``finish[...]`` is left out: it is not
environment output a deployed agent sees, and without it the model learns to end its turn
after ``finish[...]``. Rejects go to --rejects as ``{"origin", "kind", "reason"}`` lines, the
shape the training pipeline writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from .options import FORMATS
from .react import ReActError, parse_step, split_observations
from .readers import READERS, detect_format, iter_records, validate
from .schema import Conversation, DataError, canonical_json
from .templates import TEMPLATES, get_template

FIREACT = "fireact_trajectories"
FILTER_FORMATS = (*FORMATS, FIREACT)
FINISH = "finish"
"""The ReAct action that ends an episode; its argument is the final answer."""

_FIREACT_PROMPT = re.compile(r"### Instruction:\n(.*?)\n+### Response:\n", re.S)


@dataclass
class FilterConfig:
    format: str = "auto"
    """auto-detected per record unless set: one of FILTER_FORMATS."""
    tools: dict[str, dict] = field(default_factory=dict)
    """Known tool schemas by name (from --tools modules)."""
    tool_names: tuple[str, ...] = ()
    """More allowed tool names, without schemas (FireAct: search, lookup, finish)."""
    min_reward: float = 1.0
    """A numeric reward counts as success at or above this."""
    require_reward: bool = True
    """False keeps records that carry no reward/success field (their other checks still apply)."""
    max_chars: int | None = None
    max_tokens: int | None = None
    template: str = "qwen"
    """Template whose rendering the length caps measure."""

    def __post_init__(self) -> None:
        if self.format not in FILTER_FORMATS:
            raise ValueError(f"format={self.format!r} is not one of {', '.join(FILTER_FORMATS)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} is not one of {', '.join(TEMPLATES)}")
        for name in ("max_chars", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass
class FilterReport:
    records: Counter = field(default_factory=Counter)
    """path -> records seen."""
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    """reason -> records."""
    checked_calls: int = 0
    unchecked_calls: int = 0
    """Calls whose tool has no known schema: kept, but not validated."""

    def as_dict(self) -> dict:
        return {"records": dict(self.records), "kept": self.kept, "rejected": dict(sorted(self.rejected.items())),
                "checked_calls": self.checked_calls, "unchecked_calls": self.unchecked_calls}


# ----------------------------------------------------------------------------- checks


def check_success(record: dict, origin: str, cfg: FilterConfig) -> None:
    key = next((k for k in ("reward", "success") if k in record), None)
    if key is None:
        if cfg.require_reward:
            raise DataError(origin, "the record has no `reward` or `success` field",
                            "only trajectories marked successful are kept; pass --allow-unrewarded to keep "
                            "records without one", "no_reward")
        return
    value = record[key]
    if isinstance(value, bool):
        ok = value
    elif isinstance(value, (int, float)):
        ok = value >= cfg.min_reward
    else:
        raise DataError(origin, f"`{key}` must be true/false or a number, got {value!r}", kind="bad_reward")
    if not ok:
        need = "true" if isinstance(value, bool) else f">= {cfg.min_reward:g} (--min-reward)"
        raise DataError(origin, f"`{key}` is {json.dumps(value)}", f"only trajectories with {key} {need} are kept",
                        "failed")


def fireact_record(record: dict, origin: str) -> dict:
    """A FireAct trajectory ``{"reward", "traj", ...}`` -> a ``react_messages`` record."""
    traj = record.get("traj")
    if not isinstance(traj, str):
        raise DataError(origin, "a FireAct trajectory needs a `traj` string", kind="bad_record")
    header = _FIREACT_PROMPT.search(traj)
    if header is None:
        raise DataError(origin, "`traj` has no `### Instruction:` ... `### Response:` header",
                        "FireAct trajectories start with the Alpaca prompt around the question", "bad_record")
    steps, observations = split_observations(traj[header.end():])
    messages = [{"role": "user", "content": header.group(1).strip()}]
    for i, step in enumerate(steps):
        if step.strip():
            messages.append({"role": "assistant", "content": step.strip()})
        if i >= len(observations):
            break
        try:
            call = parse_step(step).call
        except ReActError:
            call = None  # the reader reports it, with the record's origin
        if call is not None and call.name == FINISH:
            break  # the grader's verdict, not an observation (see the module docstring)
        messages.append({"role": "user", "content": "Observation:" + observations[i].rstrip("\n")})
    meta = {"origin": origin, **{k: record[k] for k in ("gt", "pred") if k in record}}
    return {"messages": messages, "meta": meta}


def read_record(record: dict, origin: str, fmt: str) -> tuple[Conversation, dict]:
    """Decode with our readers; returns the conversation and the record to write if kept."""
    detected = fmt if fmt != "auto" else (FIREACT if isinstance(record.get("traj"), str) else detect_format(record))
    if detected is None:
        raise DataError(origin, "cannot tell the record's format", f"pass --format, one of {', '.join(FILTER_FORMATS)}",
                        "unknown_format")
    if detected == FIREACT:
        record = fireact_record(record, origin)
        conv = READERS["react_messages"](record, origin)
    else:
        conv = READERS[detected](record, origin)
    conv.origin = origin
    validate(conv)
    return conv, record


def final_answer(conv: Conversation) -> str | None:
    """The final answer, or None when the trajectory stops without one."""
    msgs = conv.messages
    i = len(msgs) - 1
    while i >= 0 and msgs[i].role == "tool":  # results of a trailing finish[...] (FireAct)
        i -= 1
    if i < 0 or msgs[i].role != "assistant":
        return None
    m = msgs[i]
    if m.tool_calls:
        if [c.name for c in m.tool_calls] != [FINISH]:
            return None  # the trajectory ends waiting for a tool result
        value = m.tool_calls[0].args().get("input")
        if not isinstance(value, str):
            return None
        return value.strip() or None
    return m.content.strip() or None


_VALIDATORS: dict[str, object] = {}
"""Compiled validators by schema text: building one per call would dominate the run time."""


def _validator(schema: dict, origin: str, name: str):
    key = canonical_json(schema)
    if key not in _VALIDATORS:
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as err:
            raise DataError(origin, f"the schema of tool `{name}` is not valid JSON Schema: {err.message}",
                            "fix the tool definition", "bad_tools") from None
        _VALIDATORS[key] = cls(schema)
    return _VALIDATORS[key]


def check_calls(conv: Conversation, cfg: FilterConfig, report: FilterReport) -> None:
    declared = {t["name"]: t for t in conv.tools}
    known = set(cfg.tools) | set(cfg.tool_names)
    for m in conv.messages:
        for call in m.tool_calls:
            if declared and call.name not in declared:
                raise DataError(conv.origin, f"calls tool `{call.name}`, which the record's `tools` do not declare",
                                f"declared: {', '.join(sorted(declared))}", "unknown_tool")
            if known and call.name not in known:
                raise DataError(conv.origin, f"calls tool `{call.name}`, which is not a known tool",
                                f"known tools (--tools, --tool-names): {', '.join(sorted(known))}", "unknown_tool")
            # The implementation's schema (--tools) is the authority; ms-agent prompts, for one,
            # declare parameters without types.
            tool = cfg.tools.get(call.name) or declared.get(call.name)
            schema = (tool or {}).get("parameters")
            if schema is None:
                report.unchecked_calls += 1
                continue
            error = next(iter(_validator(schema, conv.origin, call.name).iter_errors(call.args())), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "arguments"
                raise DataError(conv.origin, f"arguments of `{call.name}` do not match its schema at {where}: "
                                f"{error.message}", f"arguments: {call.arguments[:120]}", "invalid_arguments")
            report.checked_calls += 1


def conversation_key(conv: Conversation) -> str:
    """Hash of what is trained on: roles, texts (whitespace collapsed) and calls (keys sorted)."""
    norm = lambda text: " ".join((text or "").split())  # noqa: E731
    payload = [[m.role, norm(m.content), norm(m.reasoning),
                [[c.name, json.dumps(c.args(), sort_keys=True, ensure_ascii=False)] for c in m.tool_calls]]
               for m in conv.messages]
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def length_checker(cfg: FilterConfig, tokenizer=None) -> Callable[[Conversation], None] | None:
    """A function that raises ``too_long`` for conversations over the caps, or None without caps."""
    if cfg.max_chars is None and cfg.max_tokens is None:
        return None
    if cfg.max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer")
    template = get_template(cfg.template)

    def check(conv: Conversation) -> None:
        text = template.render_text(conv)
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            raise DataError(conv.origin, f"{len(text)} characters rendered with {cfg.template} exceed "
                            f"--max-chars {cfg.max_chars}", kind="too_long")
        if cfg.max_tokens is not None:
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > cfg.max_tokens:
                raise DataError(conv.origin, f"{n} tokens rendered with {cfg.template} exceed "
                                f"--max-tokens {cfg.max_tokens}", kind="too_long")

    return check


# ----------------------------------------------------------------------------- filtering


def filter_records(paths: list[str | Path], cfg: FilterConfig, report: FilterReport,
                   tokenizer=None) -> Iterator[dict | DataError]:
    """Yield each record to keep (as it should be written) or the DataError that rejects it."""
    check_length = length_checker(cfg, tokenizer)
    seen: dict[str, str] = {}  # conversation key -> origin of the first record kept with it
    for path in paths:
        if not Path(path).is_file():
            raise DataError(str(path), "file not found", "check the input path", "missing_file")
        for origin, record in iter_records(path):
            report.records[str(path)] += 1
            try:
                if isinstance(record, DataError):
                    raise record
                if not isinstance(record, dict):
                    raise DataError(origin, "a record must be a JSON object", kind="bad_record")
                check_success(record, origin, cfg)
                conv, out = read_record(record, origin, cfg.format)
                if final_answer(conv) is None:
                    raise DataError(origin, "the trajectory ends without a final answer",
                                    "it must end with a reply that calls no tool, or with finish[...]",
                                    "no_final_answer")
                check_calls(conv, cfg, report)
                if check_length is not None:
                    check_length(conv)
                key = conversation_key(conv)
                if key in seen:
                    raise DataError(origin, f"duplicate of {seen[key]}", "only the first copy is kept", "duplicate")
                seen[key] = origin
            except DataError as err:
                report.rejected[err.kind] += 1
                yield err
                continue
            report.kept += 1
            yield out


def _write_rejects(path: Path, rejects: list[DataError]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in rejects:
            f.write(json.dumps({"origin": e.origin, "kind": e.kind, "reason": str(e)}, ensure_ascii=False) + "\n")


def run(paths: list[str | Path], out: str | Path, cfg: FilterConfig, rejects: str | Path | None = None,
        tokenizer=None) -> FilterReport:
    """Filter ``paths`` into ``out`` (JSON lines); write rejects if asked. Returns the counts."""
    report = FilterReport()
    kept, rejected = [], []
    for item in filter_records(paths, cfg, report, tokenizer):
        (rejected if isinstance(item, DataError) else kept).append(item)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if rejects is not None:
        _write_rejects(Path(rejects), rejected)
    return report


def format_report(report: FilterReport, out: str, rejects: str | None) -> str:
    total = sum(report.records.values())
    lines = [f"read {total} records from {len(report.records)} file(s)"]
    lines += [f"  {n:6d}  {path}" for path, n in report.records.items()]
    lines.append(f"kept {report.kept} -> {out}")
    lines.append(f"rejected {total - report.kept}" + (f" -> {rejects}" if rejects else ""))
    lines += [f"  {n:6d}  {kind}" for kind, n in sorted(report.rejected.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines.append(f"tool calls validated against a schema: {report.checked_calls}; "
                 f"without a known schema: {report.unchecked_calls}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="python -m agenttune.data.filter", description=head,
                                epilog=rest.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="trajectory files (.json or .jsonl)")
    p.add_argument("--out", required=True, help="where to write the kept records (JSON lines)")
    p.add_argument("--rejects", help="where to write one {origin, kind, reason} line per rejected record")
    p.add_argument("--report", help="where to write the counts as JSON")
    p.add_argument("--format", default="auto", choices=FILTER_FORMATS, help="input format (default: per record)")
    p.add_argument("--tools", action="append", default=[], metavar="MODULE",
                   help="module with TOOLS = [Tool, ...] whose schemas validate the calls (repeatable), "
                        "e.g. agenttune.demo_tools")
    p.add_argument("--tool-names", default="", metavar="NAME,...",
                   help="tool names allowed without a schema, e.g. search,lookup,finish for FireAct")
    p.add_argument("--max-chars", type=int, help="drop records whose rendering is longer (characters)")
    p.add_argument("--max-tokens", type=int, help="drop records whose rendering is longer (tokens)")
    p.add_argument("--tokenizer", help="tokenizer for --max-tokens (default: the offline tiny one)")
    p.add_argument("--template", default="qwen", choices=sorted(TEMPLATES), help="rendering the caps measure")
    p.add_argument("--min-reward", type=float, default=1.0, help="numeric rewards at or above this succeed")
    p.add_argument("--allow-unrewarded", action="store_true",
                   help="keep records without a reward/success field (other checks still apply)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..tools import ToolError, load_tools

    try:
        tools = {name: tool.schema for name, tool in load_tools(args.tools).items()}
        names = tuple(n.strip() for n in args.tool_names.split(",") if n.strip())
        cfg = FilterConfig(format=args.format, tools=tools, tool_names=names, min_reward=args.min_reward,
                           require_reward=not args.allow_unrewarded, max_chars=args.max_chars,
                           max_tokens=args.max_tokens, template=args.template)
    except (ToolError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.max_tokens is not None:
        from .inspect import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    for flag, path in (("--out", args.out), ("--rejects", args.rejects), ("--report", args.report)):
        try:  # before the run, which may take minutes on a large corpus
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"error: {flag} {path}: cannot make its directory {Path(path).parent} ({err.strerror or err})",
                  file=sys.stderr)
            return 2
    try:
        report = run(args.inputs, args.out, cfg, args.rejects, tokenizer)
        print(format_report(report, args.out, args.rejects))
        if args.report:
            Path(args.report).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk while writing
        print(f"error: could not write the output: {err}", file=sys.stderr)
        return 1
    if report.kept == 0:
        print("error: no record passed the filter", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
