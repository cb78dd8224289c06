"""``mode=serve``: an OpenAI-compatible chat API (FastAPI + uvicorn, SSE via sse-starlette).

    GET  /v1/models
    POST /v1/chat/completions   messages, tools, stop, temperature, top_p, max_tokens, seed, stream

Requests are rendered with the training template. When a request declares ``tools``, the
model's calls come back as OpenAI ``tool_calls`` (``finish_reason: "tool_calls"``), and the
``<think>`` reasoning a ChatML-family turn opens with as ``reasoning_content`` (streamed as
``reasoning_content`` deltas), which the server reads back from the history it is sent: a model
that plans before its first call sees its plan at the next step, as in training. Without
tools the text is returned as written, so ReAct clients can send ``stop=["Observation:"]`` and
read the Action themselves (ms-swift's deploy workflow). One model serves one request at a time:
others wait in a queue of ``max_queue``, beyond which they get 503. Bad requests get 400.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from agenttune.data.readers import read_openai
from agenttune.data.schema import Conversation, DataError
from agenttune.inference.config import SamplingConfig
from agenttune.inference.generate import Completion, Generator, held_back
from agenttune.inference.parsing import parse_reply

# Text from which a tool call begins, per template: streamed content stops there.
CALL_MARKERS = {"qwen": "<tool_call>", "chatml": "<tool_call>", "chatml_compact": "<tool_call>",
                "chatml_kv": "<tool_call>", "llama3": "{",
                "react": "Action:"}
# Templates whose assistant turn may open with <think>...</think> (templates._chatml_assistant).
THINKING = ("qwen", "chatml", "chatml_compact", "chatml_kv")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs=false, ...)

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def to_conversation(request: ChatRequest) -> Conversation:
    record: dict = {"messages": request.messages}
    if request.tools:
        record["tools"] = request.tools
    try:
        conv = read_openai(record, "request")
    except DataError as err:
        raise BadRequest(f"{err.reason}" + (f" ({err.hint})" if err.hint else ""), "messages") from None
    pending = False
    for i, m in enumerate(conv.messages):
        if m.role == "tool" and not pending:
            raise BadRequest(f"messages[{i}] is a tool result that follows no assistant tool call", f"messages[{i}]")
        pending = (m.role == "assistant" and bool(m.tool_calls)) or (m.role == "tool" and pending)
        if m.role == "system" and i != 0:
            raise BadRequest(f"messages[{i}]: a system message must come first", f"messages[{i}]")
    if conv.messages[-1].role == "assistant":
        raise BadRequest("the last message is the assistant's; end with a user or tool message", "messages")
    return conv


def sampling_for(request: ChatRequest, defaults: SamplingConfig) -> SamplingConfig:
    return replace(
        defaults,
        max_new_tokens=request.max_completion_tokens or request.max_tokens or defaults.max_new_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        seed=defaults.seed if request.seed is None else request.seed,
    )


def stop_words(request: ChatRequest) -> tuple[str, ...]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise BadRequest("stop takes up to 4 non-empty strings", "stop")
    return tuple(stops)


def open_reasoning(text: str) -> str | None:
    """The reasoning of a turn that opens with ``<think>`` and never closes it, as ContentGate
    streams it (without the template's newline after ``<think>``); None for any other turn."""
    head = text.lstrip()
    if not head.startswith(THINK_OPEN) or THINK_CLOSE in head:
        return None
    body = head[len(THINK_OPEN):]
    return body[1:] if body.startswith("\n") else body


def message_of(completion: Completion, template: str, with_tools: bool) -> tuple[dict, str]:
    """(the OpenAI assistant message, finish_reason)."""
    finish = "length" if completion.finish_reason == "length" else "stop"
    if not with_tools:
        return {"role": "assistant", "content": completion.text}, finish
    reply = parse_reply(template, completion.text)
    if template in THINKING and (unfinished := open_reasoning(completion.text)) is not None:
        # Cut off (or stopped) inside its reasoning: what streaming sent as reasoning, no content.
        return {"role": "assistant", "content": "", "reasoning_content": unfinished}, finish
    reasoning = {"reasoning_content": reply.reasoning} if reply.reasoning and template in THINKING else {}
    if not reply.ok or not reply.tool_calls:
        content = completion.text if not reply.ok else (reply.final_answer if reply.final_answer is not None else reply.content)
        return {"role": "assistant", "content": content, **(reasoning if reply.ok else {})}, finish
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
    return {"role": "assistant", "content": reply.content or None, **reasoning, "tool_calls": calls}, "tool_calls"


class ModelQueue:
    """Generations run one at a time on a single worker thread, so the event loop keeps serving
    and a cancelled request never lets two generations share the model. ``limit`` requests may
    wait behind the running one; more are turned away."""

    def __init__(self, limit: int):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.limit, self.pending = limit, 0  # pending: submitted and not finished

    def full(self) -> bool:
        return self.pending > self.limit

    async def run(self, fn):
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn)
        future.add_done_callback(lambda _: setattr(self, "pending", self.pending - 1))
        return await future


class ContentGate:
    """Which streamed text is reasoning and which is content. Without tools, all of it is content.
    With tools, a ChatML-family turn that opens with ``<think>`` streams what is inside as
    reasoning; then content is Hermes text up to ``<tool_call>`` and Llama text that does not open
    with ``{``. ReAct text is held back whole, because its content (the thought, or the final
    answer) is only known once the step is read."""

    def __init__(self, template: str, with_tools: bool):
        self.marker = CALL_MARKERS[template] if with_tools else None
        self.hold_all = with_tools and template == "react"
        self.thinks = with_tools and template in THINKING
        self.text, self.sent, self.closed = "", 0, False
        self.body: int | None = None if self.thinks else 0
        """Where the text after the reasoning starts; None while the turn may still open with it."""
        self.thought = 0  # how much of the reasoning went out: an index into text

    def feed(self, piece: str) -> tuple[str, str]:
        """(reasoning, content) to send for a new piece of text."""
        self.text += piece
        reasoning = self._reasoning() if self.body is None else ""
        return reasoning, ("" if self.body is None else self._content())

    def _reasoning(self) -> str:
        head = self.text.lstrip()
        if len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
            return ""  # "<thi": not known yet
        if not head.startswith(THINK_OPEN):
            self.body = 0
            return ""
        start = len(self.text) - len(head) + len(THINK_OPEN)
        if self.text[start:start + 1] == "\n":  # the template writes "<think>\n" ... "\n</think>"
            start += 1
        elif start == len(self.text):
            return ""
        end = self.text.find(THINK_CLOSE, start)
        if end == -1:
            stop = len(self.text) - held_back(self.text, [THINK_CLOSE])
            if self.text[start:stop].endswith("\n"):
                stop -= 1  # it may be the newline before </think>
        else:
            self.body = self.sent = end + len(THINK_CLOSE)
            stop = end - 1 if end > start and self.text[end - 1] == "\n" else end
        out = self.text[max(start, self.thought):stop]
        self.thought = max(self.thought, stop)
        return out

    def _content(self) -> str:
        if self.marker is None:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        if self.closed or self.hold_all:
            return ""
        if self.sent == self.body and self.body > 0:  # the blank line after the reasoning is not content
            rest = self.text[self.sent:]
            if not rest.strip():
                return ""
            self.sent = self.body = len(self.text) - len(rest.lstrip())
        if self.marker == "{":  # llama3: a call is the whole turn
            stripped = self.text.lstrip()
            if not stripped:
                return ""
            self.closed = stripped.startswith("{") or stripped.startswith("<|python_tag|>")
            end = self.sent if self.closed else len(self.text)
        else:
            at = self.text.find(self.marker, self.body)
            self.closed = at != -1
            end = at if self.closed else len(self.text) - held_back(self.text, [self.marker])
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def rest(self, message: dict, text: str) -> tuple[str, str]:
        """(reasoning, content) left to send once the turn ended without calls; ``text`` is the
        whole completion, which the streamer may not have passed on to its end."""
        self.text = text
        if self.hold_all:
            return "", message["content"]
        if self.body is None:  # ended inside the reasoning, or before it could open
            if self.thought:
                return self.text[self.thought:], ""
            return "", self.text
        if self.thinks and self.sent == self.body:
            self.sent = len(self.text) - len(self.text[self.sent:].lstrip())
        return "", self.text[self.sent:]


def build_app(generator: Generator, model_name: str, max_queue: int) -> FastAPI:
    app = FastAPI(title="agenttune", description=f"OpenAI-compatible API for {model_name}")
    queue = ModelQueue(max_queue)
    template = generator.template.name

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{where}: {first['msg']}" if where else first["msg"], where or None)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "agenttune"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "pending": queue.pending}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        try:
            conv = to_conversation(request)
            stops = stop_words(request)
            prompt = generator.prompt(conv)
        except BadRequest as err:
            return _error(400, str(err), err.param)
        except DataError as err:
            return _error(400, str(err).removeprefix("request: "), "messages")
        sampling = sampling_for(request, generator.sampling)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        with_tools = bool(request.tools)
        if queue.full():
            return _error(503, f"the server is busy: {max_queue} requests are already waiting", kind="server_busy")
        if request.stream:
            return EventSourceResponse(_stream(generator, queue, prompt, sampling, stops, head, template, with_tools))
        completion = await queue.run(lambda: generator.complete([prompt], sampling, stops)[0])
        message, finish = message_of(completion, template, with_tools)
        usage = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                 "total_tokens": completion.prompt_tokens + completion.completion_tokens}
        return {**head, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}]}

    return app


async def _stream(generator: Generator, queue: ModelQueue, prompt: str, sampling: SamplingConfig,
                  stops: tuple[str, ...], head: dict, template: str, with_tools: bool):
    """SSE chunks: a role delta, content deltas, then (with tools) the calls, then finish_reason."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def chunk(delta: dict, finish: str | None = None) -> str:
        return json.dumps({**head, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}, ensure_ascii=False)

    def work() -> Completion:
        try:
            return generator.complete([prompt], sampling, stops,
                                      on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))[0]
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, None)

    task = asyncio.ensure_future(queue.run(work))
    gate = ContentGate(template, with_tools)
    yield chunk({"role": "assistant", "content": ""})
    while (piece := await pieces.get()) is not None:
        reasoning, content = gate.feed(piece)
        if reasoning:
            yield chunk({"reasoning_content": reasoning})
        if content:
            yield chunk({"content": content})
    completion = await task
    message, finish = message_of(completion, template, with_tools)
    if finish == "tool_calls":
        yield chunk({"tool_calls": [{**call, "index": k} for k, call in enumerate(message["tool_calls"])]})
    else:
        reasoning, content = gate.rest(message, completion.text)
        if reasoning:
            yield chunk({"reasoning_content": reasoning})
        if content:
            yield chunk({"content": content})
    yield chunk({}, finish)
    yield "[DONE]"
