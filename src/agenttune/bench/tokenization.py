"""Tokenization throughput of the data pipeline (read + render + tokenize + weights).

    python -m agenttune.bench.tokenization FILE [--template qwen] [--tokenizer PATH] [--repeat 3]

Single process. Reports samples/s and tokens/s for the encode step alone and for
read + encode together; the best of ``--repeat`` runs is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from ..data.encode import encode, encode_batch
from ..data.inspect import load_tokenizer
from ..data.options import SupervisionConfig
from ..data.readers import read_file
from ..data.schema import DataError
from ..data.templates import get_template


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m agenttune.bench.tokenization", description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--template", default="qwen")
    p.add_argument("--tokenizer", default=None, help="real tokenizer path (default: the offline tiny one)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    template = get_template(args.template)
    sup = SupervisionConfig(max_length=1_000_000)
    best_read = best_encode = best_batch = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        convs = [c for c in read_file(args.file) if not isinstance(c, DataError)]
        t1 = time.perf_counter()
        tokens = sum(len(encode(c, tokenizer, template, sup).input_ids) for c in convs)
        t2 = time.perf_counter()
        batched = encode_batch(convs, tokenizer, template, sup)  # what the training pipeline runs
        t3 = time.perf_counter()
        best_read, best_encode, best_batch = min(best_read, t1 - t0), min(best_encode, t2 - t1), min(best_batch, t3 - t2)
    assert sum(len(e.input_ids) for e in batched) == tokens
    n = len(convs)
    print(json.dumps({
        "file": args.file, "template": args.template, "tokenizer": args.tokenizer or "tiny", "samples": n,
        "tokens": tokens, "encode_samples_per_s": round(n / best_encode, 1),
        "encode_tokens_per_s": round(tokens / best_encode),
        "encode_batch_samples_per_s": round(n / best_batch, 1),
        "read_plus_encode_batch_samples_per_s": round(n / (best_read + best_batch), 1), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }, indent=2))


if __name__ == "__main__":
    main()
