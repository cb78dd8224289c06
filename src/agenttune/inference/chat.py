"""``mode=chat``: a multi-turn REPL on stdin/stdout with streamed replies.

When the model calls a tool (ReAct stops at ``Observation:``; Hermes/Llama turns end with the
call), you type the tool's result and the model continues from it: the ms-swift
``--stop_words Observation:`` workflow, for any template.
"""

from __future__ import annotations

from typing import TextIO

from agenttune.data.schema import Conversation, Message
from agenttune.inference.agent import assistant_message
from agenttune.inference.generate import Generator
from agenttune.inference.parsing import parse_reply
from agenttune.tools import Tool

HELP = """commands:
  /system TEXT   set the system prompt and start a new conversation
  /reset         start a new conversation (keeps the system prompt)
  /tools on|off  declare the agent.tools schemas to the model (you still type their results)
  /multi         enter several lines; finish with a line holding only /end
  /help          this text
  /exit          quit (so does end of input)"""


class _Input:
    def __init__(self, stdin: TextIO, stdout: TextIO):
        self.stdin, self.stdout = stdin, stdout

    def line(self, prompt: str) -> str | None:
        self.stdout.write(prompt)
        self.stdout.flush()
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def text(self, prompt: str) -> str | None:
        """A line, or with ``/multi`` several lines up to ``/end``."""
        line = self.line(prompt)
        if line is None or line.strip() != "/multi":
            return line
        lines = []
        while (more := self.line("... ")) is not None and more.strip() != "/end":
            lines.append(more)
        return "\n".join(lines)


def run_chat(generator: Generator, system: str | None, tools: dict[str, Tool], stdin: TextIO, stdout: TextIO) -> int:
    read = _Input(stdin, stdout)
    declared = False

    def fresh() -> Conversation:
        schemas = [t.schema for t in tools.values()] if declared else []
        return Conversation(([Message("system", system)] if system else []), tools=schemas, origin="chat")

    conv = fresh()
    stdout.write(f"agenttune chat ({generator.template.name} template). /help for commands.\n")
    while True:
        text = read.text("user> ")
        if text is None or text.strip() in ("/exit", "/quit"):
            stdout.write("\n")
            return 0
        command, _, arg = text.strip().partition(" ")
        if command == "/help":
            stdout.write(HELP + "\n")
            continue
        if command == "/system":
            system = arg or None
            conv = fresh()
            stdout.write("[system prompt set; new conversation]\n")
            continue
        if command == "/reset":
            conv = fresh()
            stdout.write("[new conversation]\n")
            continue
        if command == "/tools":
            declared = arg.strip() == "on"
            conv = fresh()
            stdout.write(f"[tools {'declared: ' + ', '.join(tools) if declared else 'off'}; new conversation]\n")
            continue
        if command.startswith("/"):
            stdout.write(f"[unknown command {command}; /help lists them]\n")
            continue
        conv.messages.append(Message("user", text))
        if not _respond(generator, conv, read, stdout):
            return 0


def _respond(generator: Generator, conv: Conversation, read: _Input, stdout: TextIO) -> bool:
    """Generate until the model stops calling tools. False when input ended mid-way."""
    def stream(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        stdout.write("assistant> ")
        completion = generator.reply(conv, on_text=stream)
        stdout.write("\n")
        reply = parse_reply(generator.template.name, completion.text)
        if not reply.ok:
            stdout.write(f"[the tool call could not be read: {reply.error}]\n")
            conv.messages.append(assistant_message(reply, generator.template.name))
            return True
        conv.messages.append(assistant_message(reply, generator.template.name))
        if not reply.tool_calls:
            return True
        for call in reply.tool_calls:
            observation = read.text(f"observation for {call.name}({call.arguments})> ")
            if observation is None:
                return False
            conv.messages.append(Message("tool", observation, name=call.name))
