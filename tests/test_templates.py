"""Templates render what the model sees at serving time, byte for byte.

Parity is checked three ways: our Python renderer against our own Jinja ``chat_template``,
against the official Qwen2.5 / Llama 3.1 templates (tests/fixtures/chat_templates), and the
ReAct template against ms-agent text written out by hand.
"""

import json
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from agenttune.data.schema import Conversation, DataError, Message, ToolCall
from agenttune.data.templates import (
    HEADER,
    TEMPLATES,
    get_template,
    react_system_prompt,
    split_react,
    to_hf_messages,
)
from agenttune.inference.parsing import parse_reply

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
OFFICIAL = {"qwen": "qwen2_5_instruct.jinja", "llama3": "llama3_1_instruct.jinja"}

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "city name"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}
TIME = {"name": "local_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def call(name, **args):
    return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))


def tool_conv(system=True):
    msgs = [
        Message("user", "  What's the weather in Zürich?\n"),
        Message("assistant", "", tool_calls=[call("get_weather", city="Zürich", unit="celsius")]),
        Message("tool", '{"temp_c": 18, "condition": "pluie légère"}'),
        Message("assistant", "It is 18°C with light rain in Zürich."),
    ]
    if system:
        msgs.insert(0, Message("system", "You are a terse weather bot. "))
    return Conversation(msgs, tools=[WEATHER, TIME], origin="tool_conv.jsonl:1")


def parallel_conv():
    return Conversation([
        Message("system", "Answer with tools."),
        Message("user", "Weather and time in Paris?"),
        Message("assistant", "Let me check both.",
                tool_calls=[call("get_weather", city="Paris"), call("local_time", city="Paris")]),
        Message("tool", '{"temp_c": 21}'),
        Message("tool", '{"time": "14:05"}'),
        Message("assistant", "21°C, and it is 14:05."),
    ], tools=[WEATHER, TIME], origin="parallel.jsonl:7")


def chat_conv(system=True):
    msgs = [Message("user", "Hi!"), Message("assistant", "Hello. How can I help?"),
            Message("user", "Name a prime."), Message("assistant", "7")]
    if system:
        msgs.insert(0, Message("system", "Be kind."))
    return Conversation(msgs, origin="chat.jsonl:3")


def reasoning_conv():
    """Reasoning on a call and on the final reply (our own templates only)."""
    return Conversation([
        Message("user", "Weather in Oslo?"),
        Message("assistant", "", reasoning="I need the weather tool.",
                tool_calls=[call("get_weather", city="Oslo")]),
        Message("tool", '{"temp_c": -3}'),
        Message("assistant", "It is -3°C.", reasoning="The tool says -3."),
    ], tools=[WEATHER], origin="reasoning.jsonl:2")


def hf_render(tokenizer, chat_template, conv, add_generation_prompt=False):
    messages, tools = to_hf_messages(conv)
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token="<|begin_of_text|>")


def prefix(conv, n):
    return Conversation(conv.messages[:n], tools=conv.tools, origin=conv.origin)


CONVS = {
    "tools": tool_conv(),
    "tools_no_system": tool_conv(system=False),
    "parallel": parallel_conv(),
    "chat": chat_conv(),
    "chat_no_system": chat_conv(system=False),
    "reasoning": reasoning_conv(),
}
# Llama 3.1 allows one call per message; neither official template has a reasoning slot.
SKIP = {("llama3", "parallel"), ("llama3", "reasoning")}
CASES = [(t, c) for t in TEMPLATES for c in CONVS if (t, c) not in SKIP]


@pytest.mark.parametrize("name,conv_name", CASES)
def test_renderer_matches_own_chat_template(tiny_tokenizer, name, conv_name):
    template, conv = TEMPLATES[name], CONVS[conv_name]
    assert template.render_text(conv) == hf_render(tiny_tokenizer, template.chat_template, conv)


@pytest.mark.parametrize("name,conv_name", CASES)
def test_generation_prompt_matches_own_chat_template(tiny_tokenizer, name, conv_name):
    template, conv = TEMPLATES[name], CONVS[conv_name]
    last_user = max(i for i, m in enumerate(conv.messages) if m.role == "user")
    for n in (last_user + 1, len(conv.messages)):
        head = prefix(conv, n)
        assert template.render_text(head, add_generation_prompt=True) == hf_render(
            tiny_tokenizer, template.chat_template, head, add_generation_prompt=True)


OFFICIAL_CASES = [(t, c) for t in OFFICIAL for c in CONVS if (t, c) not in SKIP and c != "reasoning"]


@pytest.mark.parametrize("name,conv_name", OFFICIAL_CASES)
def test_renderer_matches_official_template(tiny_tokenizer, name, conv_name):
    official = (FIXTURES / OFFICIAL[name]).read_text()
    conv = CONVS[conv_name]
    assert TEMPLATES[name].render_text(conv) == hf_render(tiny_tokenizer, official, conv)
    head = prefix(conv, 2 if conv.messages[0].role == "system" else 1)
    assert TEMPLATES[name].render_text(head, add_generation_prompt=True) == hf_render(
        tiny_tokenizer, official, head, add_generation_prompt=True)


def test_qwen_exact_text_of_a_tool_call_turn():
    text = TEMPLATES["qwen"].render_text(parallel_conv())
    assert text.startswith("<|im_start|>system\nAnswer with tools.\n\n# Tools\n\nYou may call one or more functions")
    assert json.dumps({"type": "function", "function": WEATHER}) in text
    assert (
        "<|im_start|>assistant\nLet me check both.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "local_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response>\n'
        '<tool_response>\n{"time": "14:05"}\n</tool_response><|im_end|>\n'
    ) in text


def test_qwen_default_system_prompt_and_reasoning():
    text = TEMPLATES["qwen"].render_text(reasoning_conv())
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert ("<|im_start|>assistant\n<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>assistant\n<think>\nThe tool says -3.\n</think>\n\nIt is -3°C.<|im_end|>\n" in text


def test_llama3_single_call_rule_names_the_record(tiny_tokenizer):
    with pytest.raises(DataError, match="parallel.jsonl:7") as err:
        TEMPLATES["llama3"].render(parallel_conv())
    assert "one call per message" in str(err.value)
    # The official template refuses the same conversation.
    with pytest.raises(jinja2.exceptions.TemplateError, match="single tool-calls"):
        hf_render(tiny_tokenizer, (FIXTURES / OFFICIAL["llama3"]).read_text(), parallel_conv())


def test_llama3_tool_result_is_json_encoded_and_text_beside_a_call_is_left_out(tiny_tokenizer):
    conv = tool_conv()
    conv.messages[2].content = "Checking."  # text next to the call: the official template drops it
    text = TEMPLATES["llama3"].render_text(conv)
    assert "Checking." not in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp_c\\": 18, \\"condition\\": \\"pluie légère\\"}"' \
        '<|eot_id|>' in text
    assert '{"name": "get_weather", "parameters": {"city": "Zürich", "unit": "celsius"}}<|eot_id|>' in text
    assert text == hf_render(tiny_tokenizer, (FIXTURES / OFFICIAL["llama3"]).read_text(), conv)


def test_chat_template_survives_save_and_load(tiny_tokenizer, tmp_path):
    """What infer/merge do: set tokenizer.chat_template, save, load, render."""
    for name, template in TEMPLATES.items():
        loaded = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
        loaded.chat_template = template.chat_template
        loaded.save_pretrained(tmp_path / name)
        reloaded = AutoTokenizer.from_pretrained(tmp_path / name)
        messages, tools = to_hf_messages(tool_conv())
        assert reloaded.apply_chat_template(messages, tools=tools, tokenize=False) == template.render_text(tool_conv())


# ----------------------------------------------------------------------------- chatml_compact

ORDER = {
    "name": "place_order",
    "description": "Order groceries",
    "parameters": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["sku"]}},
            "when": {"type": "string", "format": "date", "description": "delivery day"},
            "sizes": {"type": "array", "items": {"enum": ["S", "M"]}},
            "note": {"type": ["string", "null"]},
            "extra": {},
        },
        "required": ["items"],
    },
}
PING = {"name": "ping", "parameters": {"type": "object", "properties": {}}}
ODD = {"name": "odd", "parameters": {"type": "object", "properties": ["a", "b"]}}  # malformed: no parameters shown


def test_compact_listing_keeps_what_the_schema_says(tiny_tokenizer):
    conv = Conversation([Message("user", "Order two apples")], tools=[ORDER, PING, ODD, WEATHER], origin="o.jsonl:1")
    text = TEMPLATES["chatml_compact"].render_text(conv, add_generation_prompt=True)
    assert text.split("Functions:\n", 1)[1].split("<|im_end|>")[0] == (
        "// Order groceries\n"
        "// when: delivery day (date)\n"
        "place_order(items: {sku: string, qty?: integer}[], when?: string, sizes?: (\"S\" | \"M\")[], "
        "note?: string | null, extra?: any)\n"
        "ping()\n"
        "odd()\n"
        "// Get the current weather of a city\n"
        "// city: city name\n"
        'get_weather(city: string, unit?: "celsius" | "fahrenheit")'
    )
    assert text == hf_render(tiny_tokenizer, TEMPLATES["chatml_compact"].chat_template, conv, add_generation_prompt=True)
    # the same conversation costs fewer tokens than with JSON schemas, and calls look the same
    json_text = TEMPLATES["chatml"].render_text(conv, add_generation_prompt=True)
    assert len(tiny_tokenizer(text)["input_ids"]) < 0.7 * len(tiny_tokenizer(json_text)["input_ids"])


# ----------------------------------------------------------------------------- chatml_kv

# Values that each rule of chatml_kv's line format has to get right: plain text as written, and
# JSON for whatever would otherwise read back as something else.
KV_VALUES = {
    "city": "Busan", "date": "2025-08-22", "expression": "565 * 6", "chinese": "北京 中心", "nan_word": "NaN",
    "dash": "-", "hexish": "0x1", "number_text": "12", "negative_text": "-3", "exp_text": "1e5",
    "inf_text": "-inf", "underscore_number": "1_000", "true_text": "true", "null_text": "null", "empty": "",
    "trailing_blank": "x ", "leading_blank": " x", "newline": "a\nb", "quoted": '"q"', "list_text": "[1]",
    "brace": "{a", "int": 12, "float": -1.5, "bool": True, "none": None, "list": [1, "a"], "object": {"a": 1},
}


def kv_conv(arguments: dict) -> Conversation:
    return Conversation([
        Message("user", "Weather in Busan on 2025-08-22?"),
        Message("assistant", "", [ToolCall("get_weather", json.dumps(arguments))]),
        Message("tool", '{"temp_c": 21}'),
        Message("assistant", "21°C."),
    ], tools=[WEATHER], origin="kv.jsonl:1")


def test_kv_calls_write_text_as_written_and_the_rest_as_json(tiny_tokenizer):
    conv = kv_conv(KV_VALUES)
    text = TEMPLATES["chatml_kv"].render_text(conv)
    assert text == hf_render(tiny_tokenizer, TEMPLATES["chatml_kv"].chat_template, conv)
    turn = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    lines = turn.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>").split("\n")
    assert lines[0] == "get_weather"
    written = dict(line.split(": ", 1) for line in lines[1:])
    plain = {"city", "date", "expression", "chinese", "nan_word", "dash", "hexish"}
    assert {k for k, v in KV_VALUES.items() if written[k] == v} == plain
    assert all(json.loads(written[k]) == v for k, v in KV_VALUES.items() if k not in plain)
    reply = parse_reply("chatml_kv", turn)
    assert reply.ok, reply.error
    assert reply.tool_calls[0].args() == KV_VALUES


def test_kv_call_copies_the_users_tokens(tiny_tokenizer):
    """The point of the format: a name the user wrote is the same tokens in the call (after ": "),
    where Hermes JSON splits it after a quote."""
    conv = kv_conv({"city": "Busan", "date": "2025-08-22"})

    def holds_user_tokens(template):
        ids = tiny_tokenizer(TEMPLATES[template].render_text(conv))["input_ids"]
        city = tiny_tokenizer(" Busan")["input_ids"]
        return any(ids[i:i + len(city)] == city for i in range(len(ids) - len(city) + 1)
                   if i > 0 and "city" in tiny_tokenizer.decode(ids[max(0, i - 3):i]))

    assert holds_user_tokens("chatml_kv") and not holds_user_tokens("chatml_compact")


@pytest.mark.parametrize("arguments", [{"a: b": 1}, {"": 1}, {" padded": 1}, {"multi\nline": 1}])
def test_kv_falls_back_to_hermes_json_for_keys_a_line_cannot_hold(tiny_tokenizer, arguments):
    conv = kv_conv(arguments)
    text = TEMPLATES["chatml_kv"].render_text(conv)
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(arguments, ensure_ascii=False) in text
    assert text == hf_render(tiny_tokenizer, TEMPLATES["chatml_kv"].chat_template, conv)


# ----------------------------------------------------------------------------- react

# FORMATS.md §1, the ms-agent demo record, written out by hand.
MS_SYSTEM = (
    "Answer the following questions as best you can. You have access to the following APIs:\n"
    "1. weather_lookup: Call this tool to interact with the weatherlookup API. What is the weatherlookup API "
    'useful for? Look up the weather of a city. Parameters: [{"name": "city", "description": "city name", '
    '"required": "True"}]\n\n'
    "Use the following format:\n\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the above tools[weather_lookup]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n"
    "Begin!"
)
MS_VALUE = (
    "Action: weather_lookup\nAction Input: {'city': 'Hangzhou'}\n"
    "Observation: {'city': 'Hangzhou', 'condition': 'rain', 'temp_c': 18}\n"
    "Thought: I now know the final answer\nFinal Answer: Yes, it is raining in Hangzhou (18°C)."
)
LOOKUP = {"name": "weather_lookup", "description": "Look up the weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"}},
                         "required": ["city"]}}


def ms_agent_conv():
    """How a reader splits the ms-agent record: the assistant value is cut at ``Observation:``;
    each piece keeps its exact text in ``raw``."""
    return Conversation([
        Message("system", MS_SYSTEM),
        Message("user", "Is it raining in Hangzhou?"),
        Message("assistant", "", raw="Action: weather_lookup\nAction Input: {'city': 'Hangzhou'}\n",
                tool_calls=[ToolCall("weather_lookup", '{"city": "Hangzhou"}')]),
        Message("tool", "{'city': 'Hangzhou', 'condition': 'rain', 'temp_c': 18}",
                raw=" {'city': 'Hangzhou', 'condition': 'rain', 'temp_c': 18}\n"),
        Message("assistant", "Yes, it is raining in Hangzhou (18°C).",
                raw="Thought: I now know the final answer\nFinal Answer: Yes, it is raining in Hangzhou (18°C)."),
    ], tools=[LOOKUP], origin="ms_agent.jsonl:1")


def test_react_reproduces_ms_agent_record_byte_for_byte(tiny_tokenizer):
    expected = (f"<|im_start|>system\n{MS_SYSTEM}<|im_end|>\n"
                "<|im_start|>user\nIs it raining in Hangzhou?<|im_end|>\n"
                f"<|im_start|>assistant\n{MS_VALUE}<|im_end|>\n")
    conv = ms_agent_conv()
    assert TEMPLATES["react"].render_text(conv) == expected
    assert hf_render(tiny_tokenizer, TEMPLATES["react"].chat_template, conv) == expected


def test_react_builds_the_ms_agent_system_prompt_from_tools(tiny_tokenizer):
    assert react_system_prompt("", [LOOKUP]) == MS_SYSTEM
    conv = ms_agent_conv()
    conv.messages[0] = Message("system", "You are a weather agent.")
    text = TEMPLATES["react"].render_text(conv)
    assert text.startswith(f"<|im_start|>system\nYou are a weather agent.\n\n{MS_SYSTEM}<|im_end|>\n")
    assert text == hf_render(tiny_tokenizer, TEMPLATES["react"].chat_template, conv)


def test_react_synthesized_shape():
    text = TEMPLATES["react"].render_text(reasoning_conv())
    assert text.endswith(
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n"
        "Thought: I need the weather tool.\n"
        'Action: get_weather\nAction Input: {"city": "Oslo"}\n'
        'Observation: {"temp_c": -3}\n'
        "Thought: The tool says -3.\nFinal Answer: It is -3°C.<|im_end|>\n")
    # Without reasoning the final step still carries a thought; without tools it is plain chat.
    assert "Thought: I now know the final answer\nFinal Answer: It is 18°C" in TEMPLATES["react"].render_text(tool_conv())
    assert TEMPLATES["react"].render_text(chat_conv()).endswith("<|im_start|>assistant\n7<|im_end|>\n")


def test_react_generation_prompt_after_a_tool_result_continues_the_turn():
    conv = prefix(tool_conv(), 4)  # ends with the tool result
    open_turn = TEMPLATES["react"].render_text(conv, add_generation_prompt=True)
    assert open_turn.endswith('Observation: {"temp_c": 18, "condition": "pluie légère"}\n')
    closed = TEMPLATES["react"].render_text(conv)
    assert closed == open_turn + "<|im_end|>\n"


def test_split_react_labels_each_line():
    pieces = split_react(MS_VALUE)
    assert "".join(text for text, _ in pieces) == MS_VALUE
    assert pieces == [
        ("Action: weather_lookup\n", "action"),
        ("Action Input: {'city': 'Hangzhou'}\n", "action_input"),
        ("Observation:", "obs_marker"),
        (" {'city': 'Hangzhou', 'condition': 'rain', 'temp_c': 18}\n", "observation"),
        ("Thought: I now know the final answer\n", "thought"),
        ("Final Answer: Yes, it is raining in Hangzhou (18°C).", "final_answer"),
    ]
    # A multi-line Action Input stays one piece; text before any keyword is content.
    assert split_react('ok\nAction: f\nAction Input: {\n  "a": 1\n}\n') == [
        ("ok\n", "content"), ("Action: f\n", "action"), ('Action Input: {\n  "a": 1\n}\n', "action_input")]


def test_react_segments_carry_kinds():
    kinds = {(s.kind, s.text) for s in TEMPLATES["react"].render(ms_agent_conv())}
    assert ("obs_marker", "Observation:") in kinds
    assert ("observation", " {'city': 'Hangzhou', 'condition': 'rain', 'temp_c': 18}\n") in kinds
    assert ("action", "Action: weather_lookup\n") in kinds


# ----------------------------------------------------------------------------- every template

@pytest.mark.parametrize("name,conv_name", CASES)
def test_segments_are_well_formed(name, conv_name):
    conv = CONVS[conv_name]
    segments = TEMPLATES[name].render(conv)
    for seg in segments:
        assert seg.text
        if seg.kind != HEADER:  # only scaffolding may belong to no message
            assert seg.msg_index is not None
    observed = "".join(s.text for s in segments if s.kind == "observation")
    for m in conv.messages:
        if m.role == "tool":
            assert m.content in observed or json.dumps(m.content, ensure_ascii=False) in observed


@pytest.mark.parametrize("name,conv_name", CASES)
def test_ids_decode_back_to_the_rendered_text(tiny_tokenizer, name, conv_name):
    from agenttune.data.encode import encode
    from agenttune.data.options import SupervisionConfig

    text = TEMPLATES[name].render_text(CONVS[conv_name])
    enc = encode(CONVS[conv_name], tiny_tokenizer, TEMPLATES[name], SupervisionConfig(max_length=4096))
    assert tiny_tokenizer.decode(enc.input_ids) == text
    assert enc.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_eos_token_ends_every_assistant_turn():
    for name, template in TEMPLATES.items():
        segments = template.render(tool_conv())
        eots = [s for s in segments if s.kind == "eot" and s.role == "assistant"]
        assert [s.text for s in eots] == [template.eos_token] * len(eots)
        assert len(eots) >= 1


def test_to_hf_messages_shape():
    messages, tools = to_hf_messages(tool_conv())
    assert tools == [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    assert messages[2]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]
    assert "tool_calls" not in messages[4]
    assert to_hf_messages(chat_conv())[1] is None
    assert to_hf_messages(reasoning_conv())[0][1]["reasoning_content"] == "I need the weather tool."


def test_bad_arguments_and_roles_name_the_record():
    conv = tool_conv()
    conv.messages[2].tool_calls[0].arguments = "{'city': 'Zürich'}"
    with pytest.raises(DataError, match="tool_conv.jsonl:1.*not valid JSON"):
        TEMPLATES["qwen"].render(conv)
    conv = chat_conv()
    conv.messages[1].role = "bot"
    with pytest.raises(DataError, match="unknown role 'bot'"):
        TEMPLATES["chatml"].render(conv)


def test_get_template_lists_valid_names():
    assert get_template("react") is TEMPLATES["react"]
    with pytest.raises(ValueError, match="qwen, llama3, react, chatml"):
        get_template("mistral")
