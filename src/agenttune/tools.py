"""Real Python tools for ``infer.py mode=agent`` and the synthetic data generator.

A tools module is any importable module with a module-level ``TOOLS`` list of :class:`Tool`.
``agenttune.demo_tools`` is bundled; users name their own with ``tools=my_pkg.my_tools``::

    from agenttune.tools import Tool

    def lookup(sku: str) -> dict: ...

    TOOLS = [Tool("lookup", "Find a product by SKU.", {
        "type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}, lookup)]

The schema is the OpenAI/JSON-Schema ``parameters`` object; the agent loop validates the
model's arguments against it (``jsonschema``) before calling ``fn(**arguments)``.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import jsonschema


class ToolError(Exception):
    """A problem the model caused (unknown tool, bad arguments, a tool that raised). The agent
    loop turns it into an error observation the model sees, never a crash."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    """JSON Schema of the arguments object."""
    fn: Callable[..., Any]

    @property
    def schema(self) -> dict:
        """The ``{"name", "description", "parameters"}`` form Conversation.tools holds."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    @functools.cached_property
    def _validator(self):
        # jsonschema.validate re-checks the schema itself on every call (milliseconds); check it once.
        cls = jsonschema.validators.validator_for(self.parameters)
        cls.check_schema(self.parameters)
        return cls(self.parameters)

    def validate(self, arguments: dict) -> None:
        try:
            self._validator.validate(arguments)
        except jsonschema.ValidationError as err:
            where = "/".join(str(p) for p in err.absolute_path) or "arguments"
            raise ToolError(f"invalid arguments for {self.name} at {where}: {err.message}") from None

    def __call__(self, arguments: dict) -> str:
        """Validate, run, and return the observation text (JSON for non-string results)."""
        self.validate(arguments)
        try:
            result = self.fn(**arguments)
        except ToolError:
            raise
        except Exception as err:  # a tool's own failure is an observation too
            raise ToolError(f"{self.name} failed: {type(err).__name__}: {err}") from None
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


def load_tools(modules: list[str]) -> dict[str, Tool]:
    """Import each module and collect its ``TOOLS``; a name defined twice is an error."""
    tools: dict[str, Tool] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise ToolError(f"tools module {name!r} cannot be imported: {err}") from None
        found = getattr(module, "TOOLS", None)
        if not isinstance(found, (list, tuple)) or not all(isinstance(t, Tool) for t in found):
            raise ToolError(f"tools module {name!r} must define TOOLS = [agenttune.tools.Tool(...), ...]")
        for tool in found:
            if tool.name in tools:
                raise ToolError(f"tool {tool.name!r} is defined twice (again in {name})")
            tools[tool.name] = tool
    return tools
