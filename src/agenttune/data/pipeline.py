"""Files -> conversations -> tokenized ``datasets.Dataset`` for training and eval.

Errors are never silent: with ``on_error: raise`` the first bad records (up to 20) stop
the run with ``file:line: reason``; with ``skip`` they are counted by reason and written
to a rejects file. Samples dropped for length are counted and reported too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..storage import free_space_line, is_write_error
from .encode import encode_batch
from .options import DataConfig, DatasetSpec, SupervisionConfig
from .readers import read_file
from .schema import SOURCE_IDS, Conversation, DataError, DataErrors
from .templates import get_template

log = logging.getLogger(__name__)

MAX_LISTED_ERRORS = 20


@dataclass
class LoadReport:
    records: Counter = field(default_factory=Counter)  # path -> conversations read
    errors: Counter = field(default_factory=Counter)  # kind -> count
    dropped: Counter = field(default_factory=Counter)  # reason -> count (length, ...)
    truncated: int = 0
    rejects: list[DataError] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"records": dict(self.records), "errors": dict(self.errors), "dropped": dict(self.dropped),
                "truncated": self.truncated}


def resolve_path(path: str) -> list[Path]:
    """``pkg://data/demo/x.jsonl`` points inside the installed package; ``synth://NAME`` is a file
    of the synthetic tool-use world (``agenttune.data.synth`` at its default seed and sizes,
    generated into the cache on first use); a directory means every .json/.jsonl file in it,
    in sorted order."""
    if path.startswith("pkg://"):
        p = Path(str(resources.files("agenttune").joinpath(path[len("pkg://"):])))
    elif path.startswith("synth://"):
        from agenttune.data.synth import default_dir

        p = default_dir() / path[len("synth://"):]
    else:
        p = Path(path).expanduser()
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix in (".json", ".jsonl"))
    return [p]


def read_spec(spec: DatasetSpec, placeholders: dict[str, str], report: LoadReport,
              seed: int) -> list[Conversation]:
    convs: list[Conversation] = []
    for path in resolve_path(spec.path):
        for item in read_file(path, spec.format, spec.source, placeholders, spec.balance_by):
            if isinstance(item, DataError):
                report.errors[item.kind] += 1
                report.rejects.append(item)
            else:
                report.records[str(path)] += 1
                convs.append(item)
    if spec.sample is not None and convs:
        rng = random.Random(f"{seed}:{spec.path}")
        n = int(spec.sample)
        # Counts set mixes (ms-agent : ms-bench = 1 : 2); upsampling repeats records.
        convs = rng.sample(convs, n) if n <= len(convs) else [rng.choice(convs) for _ in range(n)]
    return convs


def check_errors(report: LoadReport, on_error: str, rejects_file: str | None) -> None:
    if not report.rejects:
        return
    if on_error == "raise":
        raise DataErrors(report.rejects[:MAX_LISTED_ERRORS], len(report.rejects))
    if rejects_file:
        Path(rejects_file).parent.mkdir(parents=True, exist_ok=True)
        with open(rejects_file, "w", encoding="utf-8") as f:
            for e in report.rejects:
                f.write(json.dumps({"origin": e.origin, "kind": e.kind, "reason": str(e)}, ensure_ascii=False) + "\n")


def load_conversations(specs: list[DatasetSpec], data: DataConfig, report: LoadReport) -> list[Conversation]:
    placeholders = {"name": data.model_name, "author": data.model_author}
    convs: list[Conversation] = []
    for spec in specs:
        convs += read_spec(spec, placeholders, report, data.seed)
    return convs


def encode_all(convs: list[Conversation], tokenizer, template: str, sup: SupervisionConfig,
               report: LoadReport, batch_size: int = 256) -> dict[str, list]:
    """Tokenize every conversation. Too-long samples are dropped and counted; a sample with
    no trained token is a data error (never trained silently at zero loss)."""
    tmpl = get_template(template)
    columns: dict[str, list] = {"input_ids": [], "labels": [], "weights": [], "source": [], "length": [], "group": []}
    for lo in range(0, len(convs), batch_size):
        batch = convs[lo : lo + batch_size]
        for conv, enc in zip(batch, encode_batch(batch, tokenizer, tmpl, sup)):
            if isinstance(enc, DataError):
                if enc.kind == "too_long":
                    report.dropped["too_long"] += 1
                else:
                    report.errors[enc.kind] += 1
                    report.rejects.append(enc)
                continue
            report.truncated += int(enc.truncated)
            columns["input_ids"].append(enc.input_ids)
            columns["labels"].append(enc.labels)
            columns["weights"].append(enc.weights)
            columns["source"].append(SOURCE_IDS[enc.source])
            columns["length"].append(len(enc.input_ids))
            columns["group"].append(conv.meta.get("group", conv.source))
    return columns


@dataclass
class DataBundle:
    train: object  # datasets.Dataset
    eval: object | None
    report: dict


def cache_key(data: DataConfig, template: str, tokenizer) -> str:
    """Everything the tokenized datasets depend on: the data config, every input file's
    identity (path, size, mtime), the tokenizer, the template, and the pipeline's own source
    code (so a change to a reader or template never serves stale samples)."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(data), sort_keys=True, default=str).encode())
    h.update(template.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    for spec in [*data.datasets, *data.eval_datasets]:
        for path in resolve_path(spec.path):
            st = path.stat() if path.exists() else None
            h.update(f"{path.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        h.update(module.read_bytes())
    return h.hexdigest()[:24]


def build_datasets(data: DataConfig, template: str, tokenizer) -> DataBundle:
    """Read, validate, split and tokenize. Columns: input_ids, labels (unshifted, -100 where
    untrained), weights (per-token loss weight), source (0 agent, 1 general), length, group
    (the sampling group of train.sampler=balanced: the source, then the values of the dataset's
    balance_by fields, joined by ``/``).

    With ``data.cache`` the result is saved under ``$AGENTTUNE_CACHE/datasets/<key>`` (Arrow,
    via ``datasets.save_to_disk``) and reused while nothing it depends on changes: under
    ``accelerate launch`` rank 0 builds it and the other ranks load it instead of re-tokenizing.
    """
    import datasets

    from ..tiny import cache_dir

    target = cache_dir() / "datasets" / cache_key(data, template, tokenizer) if data.cache else None
    if target is not None and (target / "report.json").exists():
        report = json.loads((target / "report.json").read_text())
        eval_ds = datasets.load_from_disk(str(target / "eval")) if (target / "eval").exists() else None
        return DataBundle(datasets.load_from_disk(str(target / "train")), eval_ds, {**report, "cache": str(target)})

    report = LoadReport()
    train = load_conversations(data.datasets, data, report)
    evals = load_conversations(data.eval_datasets, data, report)
    if not data.eval_datasets and data.eval_ratio > 0 and len(train) > 1:
        rng = random.Random(data.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, round(len(train) * data.eval_ratio))
        held = set(order[:n_eval])
        evals = [c for i, c in enumerate(train) if i in held]
        train = [c for i, c in enumerate(train) if i not in held]
    train_cols = encode_all(train, tokenizer, template, data.supervision, report)
    eval_cols = encode_all(evals, tokenizer, template, data.supervision, report)
    check_errors(report, data.on_error, data.rejects_file)
    if not train_cols["input_ids"]:
        raise DataError("data.datasets", "no training samples are left after reading and filtering",  # not a bad record
                        "check the files' paths and contents, and data.supervision.max_length", "empty")
    train_ds = datasets.Dataset.from_dict(train_cols)
    eval_ds = datasets.Dataset.from_dict(eval_cols) if eval_cols["input_ids"] else None
    summary = report.as_dict()
    summary.update(train_samples=len(train_ds), eval_samples=len(eval_ds) if eval_ds is not None else 0,
                   train_tokens=sum(train_cols["length"]), train_groups=dict(sorted(Counter(train_cols["group"]).items())),
                   trained_tokens=sum(sum(1 for w in ws if w > 0) for ws in train_cols["weights"]))
    if target is not None:
        save_bundle(target, train_ds, eval_ds, summary)
    return DataBundle(train_ds, eval_ds, summary)


def save_bundle(target: Path, train_ds, eval_ds, summary: dict) -> None:
    """Write to a temp dir and rename: a killed run never leaves a half-written cache entry
    that a later run would load (report.json, written last, marks it complete)."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        train_ds.save_to_disk(str(tmp / "train"))
        if eval_ds is not None:
            eval_ds.save_to_disk(str(tmp / "eval"))
        (tmp / "report.json").write_text(json.dumps(summary, default=str))
    except Exception as e:  # the data is in memory and the run can go on: the cache only saves time
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_error(e):
            raise
        log.warning("could not cache the tokenized data in %s (%s; %s); going on without it, so the next "
                    "run tokenizes again (or set data.cache=false)", target, e, free_space_line(target.parent))
        return
    try:
        os.rename(tmp, target)
    except OSError:  # another process saved the same key first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
