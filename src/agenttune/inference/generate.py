"""Generation with the training template's prompt, stop words and end-of-turn token.

Stop words that are whole tokens (``<|im_end|>``, ``<|eot_id|>``) become ``eos_token_id``; the
others (ReAct's ``Observation:``) go to transformers' ``stop_strings``, which matches them even
when the tokenizer splits the word across tokens (``Ob|servat|ion|:``) or glues it to the text
before it (`` Observation``). The returned text ends before the stop word, as in the OpenAI API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from agenttune.data.schema import Conversation
from agenttune.data.templates import Template
from agenttune.inference.config import SamplingConfig


@dataclass
class Completion:
    text: str
    """Generated text, cut before the first stop word or end-of-turn token."""
    finish_reason: str
    """stop (a stop word or the end of the turn) or length (max_new_tokens ran out)."""
    stop_word: str | None
    """The stop word that ended it, e.g. ``Observation:``; None for length or end of turn."""
    prompt_tokens: int
    completion_tokens: int


def stop_ids_and_words(tokenizer, template: Template, extra: tuple[str, ...] = ()) -> tuple[list[int], list[str]]:
    """(ids, words): single-token stops go to eos_token_id, multi-token ones are stop strings."""
    ids, words = [], []
    for word in (template.eos_token, *template.stop_words, *extra):
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and tokenizer.convert_ids_to_tokens(encoded[0]) == word:
            ids += [i for i in encoded if i not in ids]
        elif word not in words:
            words.append(word)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids, words


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """``text`` up to the earliest stop, and that stop (None when there is none)."""
    best, found = len(text), None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and at < best:
            best, found = at, stop
    return text[:best], found


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop word, so streaming must wait."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest


class StopAwareStreamer(BaseStreamer):
    """Feeds ``on_text`` the new text as it is generated, never a stop word or a piece of one:
    text that might be the start of a stop word is held back until it is not, and an incomplete
    UTF-8 character (decoded as U+FFFD) waits for its remaining bytes."""

    def __init__(self, tokenizer, stops: list[str], on_text: Callable[[str], None]):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        text, stop = cut_at_stop(text, self.stops)
        if stop is not None:
            self.stopped = True
            ready = len(text)
        else:
            ready = len(text) - held_back(text, self.stops)
            while ready > self.sent and text[ready - 1] == "\ufffd":
                ready -= 1
        if ready > self.sent:
            self.on_text(text[self.sent : ready])
            self.sent = ready

    def end(self) -> None:
        if self.stopped:
            return
        text, _ = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=False), self.stops)
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)


class Generator:
    """Renders conversations with the training template and generates their next turn."""

    def __init__(self, model, tokenizer, template: Template, sampling: SamplingConfig):
        self.model, self.tokenizer, self.template, self.sampling = model, tokenizer, template, sampling
        self.device = next(model.parameters()).device

    def prompt(self, conv: Conversation) -> str:
        """The conversation so far plus the assistant header (or, for ReAct after a tool result,
        the open turn the model continues)."""
        return self.template.render_text(conv, add_generation_prompt=True)

    def complete(
        self,
        prompts: list[str],
        sampling: SamplingConfig | None = None,
        stop: tuple[str, ...] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> list[Completion]:
        """Continue each prompt text. ``stop`` adds stop words to the template's; ``on_text``
        streams (one prompt only)."""
        sampling = sampling or self.sampling
        if on_text is not None and len(prompts) != 1:
            raise ValueError("streaming generates one prompt at a time")
        eos_ids, words = stop_ids_and_words(self.tokenizer, self.template, stop)
        # Every stop, token or string, is also cut from the decoded text.
        stops = words + [self.tokenizer.convert_ids_to_tokens(i) for i in eos_ids]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_ids,
                      pad_token_id=self.tokenizer.pad_token_id, repetition_penalty=sampling.repetition_penalty)
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if words:
            kwargs.update(stop_strings=words, tokenizer=self.tokenizer)
        if on_text is not None:
            kwargs["streamer"] = StopAwareStreamer(self.tokenizer, stops, on_text)
        with torch.no_grad():
            out = self.model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        results = []
        for row, mask in zip(out, batch["attention_mask"]):
            new = row[width:].tolist()
            # A finished sequence is padded to the batch's length: keep up to its end token, or,
            # when a stop string ended it, drop the trailing pad ids.
            end = next((k + 1 for k, t in enumerate(new) if t in eos_ids), None)
            if end is not None:
                new = new[:end]
            else:
                while new and new[-1] == self.tokenizer.pad_token_id:
                    new.pop()
            text, found = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=False), stops)
            hit_eos = bool(new) and new[-1] in eos_ids
            reason = "stop" if (found is not None or hit_eos) else "length"
            results.append(Completion(text=text, finish_reason=reason, stop_word=found if found in words else None,
                                      prompt_tokens=int(mask.sum()), completion_tokens=len(new)))
        return results

    def reply(self, conv: Conversation, **kwargs) -> Completion:
        return self.complete([self.prompt(conv)], **kwargs)[0]
