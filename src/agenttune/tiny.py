"""A tiny tokenizer and model built offline, for tests, `inspect` and the CPU default.

Both are written to disk and loaded back with ``from_pretrained``, so everything
downstream (PEFT, Accelerate, datasets) takes exactly the path a 7B model takes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Bump when the recipe below changes, so stale caches are never reused.
TINY_VERSION = "v1"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
]

# Text the BPE is trained on: template scaffolding, ReAct keywords, JSON punctuation
# and everyday words, so rendered samples tokenize into a few hundred ids, not bytes.
_SEED_TEXT = """
system user assistant tool ipython Thought: Action: Action Input: Observation: Final Answer:
<tool_call> </tool_call> <tool_response> </tool_response> <tools> </tools> <think> </think>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web",
"parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
You are a helpful assistant. Answer the following questions as best you can.
You have access to the following APIs: Use the following format: Begin!
I now know the final answer. The answer is 42. What is the weather in Hangzhou today?
Call this tool to interact with the API. What is the API useful for? Parameters:
Environment: ipython Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024
the of and to in is that for it as with was on be by this are or from at an but not
have has had will would can could should may might must one two three four five six
seven eight nine ten hundred thousand million first second third city country price
weather temperature rain sunny cloudy wind km miles meters kilograms pounds dollars
flight hotel date time day week month year search find convert calculate lookup result
product sku catalog grocery apple banana milk bread rice chicken order total error
0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 50 100 2024 2025 3.14 0.5 -1 true false null
"""


def cache_dir() -> Path:
    """Where built artifacts live: ``$AGENTTUNE_CACHE`` or ``~/.cache/agenttune``."""
    root = os.environ.get("AGENTTUNE_CACHE") or os.path.join(Path.home(), ".cache", "agenttune")
    return Path(root)


def atomic_build(target: Path, build) -> Path:
    """Build into a temp dir next to ``target`` and rename, so concurrent ranks or an
    interrupted build never leave a half-written cache entry behind."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tokenizer(out: Path, texts: list[str] | None = None, vocab_size: int = 1024,
                     split_digits: bool = False) -> None:
    """A byte-level BPE (any text encodes, CJK included) trained on ``texts``; with
    ``split_digits`` every digit is its own token, as in Qwen's and Llama 3's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else [_SEED_TEXT] * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=32768,
    )
    fast.save_pretrained(out)


def tiny_tokenizer_dir() -> Path:
    return atomic_build(cache_dir() / f"tiny-tokenizer-{TINY_VERSION}", _build_tokenizer)


def load_tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


def build_tiny_model(out: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0, tokenizer_dir: Path | None = None,
                     intermediate: int | None = None, heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a randomly initialised Qwen2 model plus its tokenizer (the tiny one by default) to ``out``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or tiny_tokenizer_dir())
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_model_dir(hidden: int = 64, layers: int = 2) -> Path:
    name = f"tiny-qwen2-h{hidden}-l{layers}-{TINY_VERSION}"
    return atomic_build(cache_dir() / name, lambda p: build_tiny_model(p, hidden=hidden, layers=layers))


# ----------------------------------------------------------------------------- the demo model
# The README's main command trains a model from scratch on the synthetic tool-use world
# (agenttune.data.synth). It gets its own tokenizer, trained on that world's *training* split, so
# the template scaffolding and tool schemas take a third fewer tokens than with the tiny one.
# Names (cities, products, SKUs) are cut out of the tokenizer's text and digits are split: a
# held-out name or number then tokenizes into the same kind of pieces as a training one, and
# what the model learns about copying them carries over. A BPE that had merged "Lima" into one
# token would teach copying a token, and leave "Sao Paulo" (five pieces) to chance.
DEMO_VERSION = "v2"
DEMO_VOCAB = 2048
DEMO_HIDDEN = 128
DEMO_LAYERS = 4


def _demo_texts() -> list[str]:
    import re

    from agenttune.data.readers import read_file
    from agenttune.data.synth import default_dir
    from agenttune.data.templates import get_template
    from agenttune.demo_tools import CITIES, PRODUCTS

    names = sorted({*CITIES, *(p["name"] for p in PRODUCTS), *(p["sku"] for p in PRODUCTS)}, key=len, reverse=True)
    blank = re.compile("|".join(map(re.escape, names)))
    texts = [_SEED_TEXT]
    for name, template in (("agent_train.sharegpt.jsonl", "qwen"), ("agent_train.ms_agent.jsonl", "react"),
                           ("general_train.jsonl", "qwen")):
        texts += [blank.sub(" ", get_template(template).render_text(conv)) for conv in read_file(default_dir() / name)]
    return texts


def _build_demo_model(out: Path) -> None:
    import tempfile as _tempfile

    with _tempfile.TemporaryDirectory() as tok_dir:
        _build_tokenizer(Path(tok_dir), _demo_texts(), DEMO_VOCAB, split_digits=True)
        build_tiny_model(out, hidden=DEMO_HIDDEN, layers=DEMO_LAYERS, tokenizer_dir=Path(tok_dir),
                         intermediate=DEMO_HIDDEN * 3)


def demo_model_dir() -> Path:
    """``model.path=tiny-demo``: a random-init Qwen2 (h128, 4 layers, ~1M parameters) with a BPE
    trained on the synthetic world's training split; built once into the cache."""
    from agenttune.data.synth import _code_hash

    # Named by the generator's code hash too: its tokenizer is trained on that data.
    name = f"tiny-demo-qwen2-h{DEMO_HIDDEN}-l{DEMO_LAYERS}-{TINY_VERSION}-{DEMO_VERSION}-{_code_hash()}"
    return atomic_build(cache_dir() / name, _build_demo_model)
