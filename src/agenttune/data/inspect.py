"""See exactly what the model will be trained on.

    python -m agenttune.data.inspect FILE [--format F] [--template T] [--loss-scale S]
        [--train-on X] [--max-length N] [--index I] [--json] [--stats] [--tokenizer PATH]

Default: print rendered samples with the trained spans and their weights marked (colours in
a terminal, ``[[w=...|text]]`` markers otherwise). ``--json``: one object per sample whose
segment texts concatenate to the rendered text (weight 0 = not trained). ``--stats``:
counts, trained-token fraction, truncation and errors by reason. Exits 1 on data errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .encode import encode
from .options import FORMATS, LOSS_SCALES, TRAIN_ON, TRUNCATION, SupervisionConfig
from .pipeline import resolve_path
from .readers import read_file
from .schema import DataError
from .templates import TEMPLATES, get_template

_COLORS = {0.0: "", 1.0: "\033[42;30m", 2.0: "\033[43;30m"}
_OTHER = "\033[45;30m"
_RESET = "\033[0m"


def token_segments(text: str, offsets: list[tuple[int, int]], weights: list[float]) -> list[dict]:
    """Merge consecutive tokens of equal weight into ``{"text", "weight"}`` segments that
    cover ``text`` exactly; these show what the *tokens* train, after tokenization."""
    segments: list[dict] = []
    pos = 0
    for (start, end), w in zip(offsets, weights):
        end = max(end, start)
        if start > pos:  # characters no token claims (should not happen) stay untrained
            segments.append({"text": text[pos:start], "weight": 0.0})
        piece = text[max(start, pos):end]
        if not piece:
            continue
        if segments and segments[-1]["weight"] == w:
            segments[-1]["text"] += piece
        else:
            segments.append({"text": piece, "weight": float(w)})
        pos = end
    if pos < len(text):
        segments.append({"text": text[pos:], "weight": 0.0})
    return segments


def show(segments: list[dict], color: bool) -> str:
    out = []
    for seg in segments:
        w, t = seg["weight"], seg["text"]
        if w == 0:
            out.append(t)
        elif color:
            out.append(_COLORS.get(w, _OTHER) + t + _RESET + ("" if w == 1.0 else f"\033[2m(x{w:g})\033[0m"))
        else:
            out.append(f"[[w={w:g}|{t}]]")
    return "".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agenttune.data.inspect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a .json or .jsonl data file (or pkg://..., synth://NAME)")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--source", default="agent", choices=["agent", "general"])
    p.add_argument("--template", default="qwen", choices=sorted(TEMPLATES))
    p.add_argument("--loss-scale", default="default", choices=LOSS_SCALES)
    p.add_argument("--train-on", default="assistant", choices=TRAIN_ON)
    p.add_argument("--truncation", default="drop", choices=TRUNCATION)
    p.add_argument("--max-length", type=int, default=SupervisionConfig.max_length)
    p.add_argument("--observation-weight", type=float, default=0.0)
    p.add_argument("--first-token-weight", type=float, default=1.0,
                   help="weight multiplier of each assistant turn's first token (the call-or-answer decision)")
    p.add_argument("--after-call-weight", type=float, default=1.0,
                   help="weight multiplier of the first token after each tool call (another call, or the end of the turn)")
    p.add_argument("--name-weight", type=float, default=1.0,
                   help="weight multiplier of the tokens of each called function's name")
    p.add_argument("--index", type=int, action="append", help="sample index to show (repeatable)")
    p.add_argument("--limit", type=int, default=3, help="samples to show when no --index is given")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.add_argument("--stats", action="store_true", help="summary counts only")
    p.add_argument("--tokenizer", help="path of a real tokenizer (default: the offline tiny one)")
    p.add_argument("--name", default="agenttune", help="fills {{name}} in self-cognition data")
    p.add_argument("--author", default="agenttune", help="fills {{author}} in self-cognition data")
    return p.parse_args(argv)


def load_tokenizer(path: str | None):
    """The tiny tokenizer, or the one at ``path``: whatever ``model.path`` accepts (a directory,
    ``tiny``, ``python-package:NAME``). A directory holding a GGUF and no tokenizer files is read
    from the GGUF, as ``model.gguf_file`` would."""
    if path is None:
        from ..tiny import load_tiny_tokenizer

        return load_tiny_tokenizer()
    from transformers import AutoTokenizer

    from ..config import ModelConfig
    from ..modeling import load_pretrained, resolve_model_path

    where = Path(resolve_model_path(path)).expanduser()
    if path.startswith(("/", ".", "~")) and not where.exists():
        raise FileNotFoundError(f"no such directory: {where}")
    gguf = None
    if where.is_dir() and not (where / "tokenizer_config.json").exists():
        gguf = next(iter(sorted(where.glob("*.gguf"))), None)
    return load_pretrained(AutoTokenizer, str(where), ModelConfig(path=path, gguf_file=gguf and gguf.name))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sup = SupervisionConfig(train_on=args.train_on, loss_scale=args.loss_scale, max_length=args.max_length,
                                truncation=args.truncation, observation_weight=args.observation_weight,
                                first_token_weight=args.first_token_weight,
                                after_call_weight=args.after_call_weight,
                                name_weight=args.name_weight)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:  # FileNotFoundError included
        print(f"error: --tokenizer {args.tokenizer}: {e}", file=sys.stderr)
        return 2
    template = get_template(args.template)
    stats = Counter()
    errors: Counter = Counter()
    wanted = set(args.index) if args.index else set(range(args.limit))
    try:
        (path,) = resolve_path(args.file)  # pkg:// and synth:// as in data configs
        items = list(read_file(path, args.format, args.source, {"name": args.name, "author": args.author}))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    color = sys.stdout.isatty() and not args.json
    for index, item in enumerate(items):
        if isinstance(item, DataError):
            errors[item.kind] += 1
            print(f"error: {item}", file=sys.stderr)
            continue
        try:
            enc = encode(item, tokenizer, template, sup)
        except DataError as e:
            if e.kind == "too_long":
                stats["dropped_too_long"] += 1
            else:
                errors[e.kind] += 1
                print(f"error: {e}", file=sys.stderr)
            continue
        stats["samples"] += 1
        stats["tokens"] += len(enc.input_ids)
        stats["trained_tokens"] += enc.num_trained
        stats["truncated"] += int(enc.truncated)
        if args.stats or (index not in wanted and not args.json):
            continue
        text = tokenizer.decode(enc.input_ids)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        segments = token_segments(text, offsets, enc.weights)
        if args.json:
            print(json.dumps({"index": index, "origin": item.origin, "source": item.source, "segments": segments},
                             ensure_ascii=False))
        else:
            print(f"=== sample {index} ({item.origin}, source={item.source}, {len(enc.input_ids)} tokens, "
                  f"{enc.num_trained} trained) ===")
            print(show(segments, color))
    if args.stats:
        fraction = stats["trained_tokens"] / stats["tokens"] if stats["tokens"] else 0.0
        summary = {"records": len(items), "samples": stats["samples"], "tokens": stats["tokens"],
                   "trained_tokens": stats["trained_tokens"], "trained_fraction": round(fraction, 4),
                   "truncated": stats["truncated"], "dropped_too_long": stats["dropped_too_long"],
                   "errors": dict(errors)}
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `inspect FILE --json | head`: the reader left, nothing is wrong
        sys.stderr.close()
        sys.exit(0)
