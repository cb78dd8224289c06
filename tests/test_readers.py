"""Readers: each input format -> the canonical Conversation, and every kind of bad input."""

import json

import pytest

from agenttune.data.readers import detect_format, read_file
from agenttune.data.schema import Conversation, DataError

MS_SYSTEM = (
    "Answer the following questions as best you can. You have access to the following APIs:\n"
    "1. weather_lookup: Call this tool to interact with the weatherlookup API. What is the weatherlookup "
    "API useful for? Look up the weather of a city. Parameters: "
    '[{"name": "city", "description": "city name", "required": "True"}]\n\n'
    "2. unit_convert: Call this tool to interact with the unitconvert API. What is the unitconvert API "
    'useful for? Convert units. Parameters: [{"name": "value", "description": "amount", "required": "True"}, '
    '{"name": "to", "description": "target unit", "required": "False"}]\n\n'
    "Use the following format:\n\nThought: you should always think about what to do\n"
    "Action: the action to take, should be one of the above tools[weather_lookup, unit_convert]\n"
    "Action Input: the input to the action\nObservation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\nFinal Answer: the final answer to the original input question\nBegin!"
)
MS_ASSISTANT = (
    "Thought: I should look it up.\nAction: weather_lookup\nAction Input: {'city': 'Hangzhou'}\n"
    "Observation: {'city': 'Hangzhou', 'condition': 'rain', 'temp_c': 18}\n"
    "Action: unit_convert\nAction Input: {\"value\": 18, \"to\": \"F\"}\nObservation: 64.4\n"
    "Thought: I now know the final answer\nFinal Answer: Yes, it is raining (18°C, 64.4°F)."
)
TOOLS = [{"name": "convert_units", "description": "Convert", "parameters": {
    "type": "object", "properties": {"value": {"type": "number"}}, "required": ["value"]}}]


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def read_one(tmp_path, record, fmt="auto", **kw) -> Conversation:
    (item,) = list(read_file(write(tmp_path, [record]), format=fmt, **kw))
    if isinstance(item, DataError):
        raise item
    return item


def read_error(tmp_path, record, fmt="auto") -> DataError:
    (item,) = list(read_file(write(tmp_path, [record]), format=fmt))
    assert isinstance(item, DataError), f"expected an error, got {item}"
    return item


# ---------------------------------------------------------------------------- readers


def test_ms_agent_splits_observations_and_parses_api_list(tmp_path):
    rec = {"conversations": [{"from": "system", "value": MS_SYSTEM}, {"from": "user", "value": "Rain in Hangzhou?"},
                             {"from": "assistant", "value": MS_ASSISTANT}]}
    conv = read_one(tmp_path, rec)
    assert [t["name"] for t in conv.tools] == ["weather_lookup", "unit_convert"]
    assert conv.tools[0]["parameters"]["required"] == ["city"]
    assert conv.tools[1]["parameters"]["required"] == ["value"]
    assert conv.messages[0].content == MS_SYSTEM  # the original system text is kept
    roles = [m.role for m in conv.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    first = conv.messages[2]
    assert first.reasoning == "I should look it up."
    assert first.tool_calls[0].name == "weather_lookup"
    assert json.loads(first.tool_calls[0].arguments) == {"city": "Hangzhou"}  # Python literal -> JSON
    assert conv.messages[3].content == "{'city': 'Hangzhou', 'condition': 'rain', 'temp_c': 18}"
    assert conv.messages[-1].content == "Yes, it is raining (18°C, 64.4°F)."
    # raw pieces + markers give the assistant value back byte for byte
    rebuilt = "".join(m.raw if m.role == "assistant" else "Observation:" + m.raw for m in conv.messages[2:])
    assert rebuilt == MS_ASSISTANT


def test_ms_bench_general_record(tmp_path):
    rec = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "Hello!"}]}
    conv = read_one(tmp_path, rec, source="general")
    assert detect_format(rec) == "ms_agent"
    assert conv.source == "general" and conv.tools == [] and conv.messages[-1].content == "Hello!"


def test_sharegpt_function_call_observation_think_and_parallel(tmp_path):
    rec = {"system": "Be brief.", "tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "12 km?"},
        {"from": "function_call", "value": json.dumps([{"name": "convert_units", "arguments": {"value": 12}},
                                                        {"name": "convert_units", "arguments": {"value": 1}}])},
        {"from": "observation", "value": "[7.456, 0.621]"},
        {"from": "gpt", "value": "<think>Tool says 7.456.</think>About 7.46 miles."}]}
    conv = read_one(tmp_path, rec)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert [c.arguments for c in conv.messages[2].tool_calls] == ['{"value": 12}', '{"value": 1}']
    assert conv.messages[-1].reasoning == "Tool says 7.456." and conv.messages[-1].content == "About 7.46 miles."
    assert conv.tools == TOOLS


def test_sharegpt_function_call_may_open_with_think(tmp_path):
    rec = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "12 km plus 3 mi, in mi?"},
        {"from": "function_call", "value": "<think>\nConvert first, then add 3.\n</think>\n\n"
                                           + json.dumps({"name": "convert_units", "arguments": {"value": 12}})},
        {"from": "observation", "value": "7.456"},
        {"from": "gpt", "value": "10.456 mi."}]}
    conv = read_one(tmp_path, rec)
    call = conv.messages[1]
    assert call.reasoning == "Convert first, then add 3." and call.content == ""
    assert [c.arguments for c in call.tool_calls] == ['{"value": 12}']
    # What follows the reasoning must still be the calls' JSON.
    rec["conversations"][1]["value"] = "<think>x</think> convert_units(12)"
    assert read_error(tmp_path, rec).kind == "bad_arguments"


def test_sharegpt_parallel_call_may_have_one_observation_turn_per_call(tmp_path):
    calls = json.dumps([{"name": "convert_units", "arguments": {"value": 12}},
                        {"name": "convert_units", "arguments": {"value": 1}}])
    rec = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "12 km and 1 km?"}, {"from": "function_call", "value": calls},
        {"from": "observation", "value": "7.456"}, {"from": "observation", "value": "0.621"},
        {"from": "gpt", "value": "7.46 and 0.62 miles."}]}
    conv = read_one(tmp_path, rec)
    assert [(m.role, m.content) for m in conv.messages[2:]] == [
        ("tool", "7.456"), ("tool", "0.621"), ("assistant", "7.46 and 0.62 miles.")]
    # One call has one result: a second observation turn still breaks the alternation.
    rec["conversations"][1]["value"] = json.dumps({"name": "convert_units", "arguments": {"value": 12}})
    assert read_error(tmp_path, rec).kind == "role_order"


def test_openai_tool_calls_and_typed_parts(tmp_path):
    rec = {"tools": [{"type": "function", "function": TOOLS[0]}], "messages": [
        {"role": "system", "content": [{"type": "text", "value": "sys"}]},
        {"role": "user", "content": "convert 3"},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "need tool"}, {"type": "text", "text": ""}],
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "convert_units", "arguments": "{\"value\": 3}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1.86"},
        {"role": "assistant", "content": "3 km is 1.86 mi.", "weight": 0.5}]}
    conv = read_one(tmp_path, rec)
    call = conv.messages[2].tool_calls[0]
    assert (call.name, call.arguments, call.id) == ("convert_units", '{"value": 3}', "c1")
    assert conv.messages[2].reasoning == "need tool"
    assert conv.messages[0].content == "sys" and conv.tools == TOOLS
    assert conv.messages[-1].weight == 0.5


def test_alpaca_history_system_and_react_output(tmp_path):
    conv = read_one(tmp_path, {"system": "S", "instruction": "Q", "input": "ctx", "output": "A",
                               "history": [["u1", "a1"]]}, source="general")
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "Q\nctx"), ("assistant", "A")]
    trace = "Thought: t\nAction: search[x y]\nObservation: found it\nThought: done\nAction: finish[z]\n" \
            "Observation: Episode finished, reward = True\n"
    conv = read_one(tmp_path, {"instruction": "Q", "input": "", "output": trace})
    roles = [m.role for m in conv.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool"]
    assert conv.messages[1].tool_calls[0].arguments == '{"input": "x y"}'
    assert conv.messages[2].content == "found it"


def test_react_messages_observation_user_turns_become_tool(tmp_path):
    rec = {"messages": [{"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "Thought: look\nAction: search[Badr Hari]"},
                        {"role": "user", "content": "Observation: Badr Hari is a kickboxer."},
                        {"role": "assistant", "content": "Thought: ok\nAction: finish[Badr Hari]"},
                        {"role": "user", "content": "Observation: Episode finished, reward = True"}]}
    assert detect_format(rec) == "react_messages"
    conv = read_one(tmp_path, rec)
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant", "tool"]
    assert conv.messages[2].content == "Badr Hari is a kickboxer." and conv.messages[2].name == "search"


def test_self_cognition_placeholders(tmp_path):
    conv = read_one(tmp_path, {"instruction": "Who are you?", "input": "", "output": "I am {{name}} by {{author}}."},
                    placeholders={"name": "Aria", "author": "ACME"})
    assert conv.messages[-1].content == "I am Aria by ACME."


def test_json_list_origins_name_lines(tmp_path):
    path = write(tmp_path, [{"instruction": "a", "input": "", "output": "b"}] * 3, name="d.json")
    origins = [c.origin for c in read_file(path)]
    text = path.read_text().splitlines()
    assert len(origins) == 3
    for origin in origins:  # each origin points at the line where the record opens
        line = int(origin.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{"


def test_explicit_format_override(tmp_path):
    rec = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}
    conv = read_one(tmp_path, rec, fmt="ms_agent")
    assert conv.messages[-1].content == "yo"
    with pytest.raises(DataError, match="unknown format `nope`"):
        list(read_file(write(tmp_path, [rec]), format="nope"))


# ---------------------------------------------------------------------------- bad input


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n')
    items = list(read_file(path))
    assert isinstance(items[0], Conversation)
    assert isinstance(items[1], DataError) and items[1].kind == "invalid_json"
    assert str(items[1]).startswith(f"{path}:2: invalid JSON")


def test_invalid_json_list(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": oops}\n]')
    items = list(read_file(path))
    assert isinstance(items[-1], DataError) and items[-1].origin == f"{path}:3"


@pytest.mark.parametrize("text, line, message", [
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"}', 3,
     "the file ends before the list's closing `]` (cut short?)"),
    ('[\n {"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}\n]', 3,
     "expected `,` or `]` after a record, found `{`"),
    ('[\n {"instruction": "a", "output": "b"}\n]\n[{"instruction": "c", "output": "d"}]\n', 4,
     "text after the list's closing `]`"),
])
def test_a_json_list_that_is_cut_short_or_run_on_is_an_error_not_fewer_records(tmp_path, text, line, message):
    """Each of these used to load as a good file of the records before the fault."""
    path = tmp_path / "bad.json"
    path.write_text(text)
    items = list(read_file(path))
    assert isinstance(items[0], Conversation) and items[0].messages[-1].content == "b"
    assert isinstance(items[-1], DataError) and items[-1].kind == "invalid_json"
    assert str(items[-1]).startswith(f"{path}:{line}: {message}")


def test_a_json_list_may_end_with_a_comma_and_whitespace(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n]\n\n')
    assert [c.messages[-1].content for c in read_file(path)] == ["b", "d"]


def test_unknown_role(tmp_path):
    err = read_error(tmp_path, {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]})
    assert err.kind == "unknown_role" and "`robot`" in str(err)
    err = read_error(tmp_path, {"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]},
                     fmt="sharegpt")
    assert err.kind == "unknown_role"


def test_observation_without_call_is_role_order_error(tmp_path):
    err = read_error(tmp_path, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                             {"role": "tool", "content": "r"}, {"role": "assistant", "content": "z"}]})
    assert err.kind == "role_order" and "answers no tool call" in str(err)
    err = read_error(tmp_path, {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                                                  {"from": "observation", "value": "r"}, {"from": "gpt", "value": "z"}]})
    assert err.kind == "role_order"
    err = read_error(tmp_path, {"conversations": [{"from": "gpt", "value": "y"}]}, fmt="sharegpt")
    assert err.kind == "role_order"
    err = read_error(tmp_path, {"conversations": [{"from": "user", "value": "q"},
                                                  {"from": "assistant", "value": "Thought: x\nObservation: y\nFinal Answer: z"}]},
                     fmt="ms_agent")
    assert err.kind in ("role_order", "bad_arguments")


def test_call_to_undeclared_tool(tmp_path):
    rec = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "x"}, {"from": "function_call", "value": '{"name": "nuke", "arguments": {}}'},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "z"}]}
    err = read_error(tmp_path, rec)
    assert err.kind == "unknown_tool" and "`nuke`" in str(err) and "convert_units" in str(err)


def test_arguments_not_json(tmp_path):
    rec = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "x"}, {"from": "function_call", "value": '{"name": "convert_units", "arguments": "{value: 3"}'},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "z"}]}
    assert read_error(tmp_path, rec).kind == "bad_arguments"
    ms = {"conversations": [{"from": "system", "value": MS_SYSTEM}, {"from": "user", "value": "q"},
                            {"from": "assistant", "value": "Action: weather_lookup\nAction Input: {'city': \nObservation: r\n"
                                                           "Final Answer: a"}]}
    err = read_error(tmp_path, ms)
    assert err.kind == "bad_arguments" and "neither JSON nor a Python literal" in str(err)


def test_empty_assistant_turn(tmp_path):
    err = read_error(tmp_path, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]})
    assert err.kind == "empty_assistant"


def test_unknown_format(tmp_path):
    err = read_error(tmp_path, {"prompt": "x", "completion": "y"})
    assert err.kind == "unknown_format" and "format=" in str(err)


def test_bad_weight(tmp_path):
    err = read_error(tmp_path, {"messages": [{"role": "user", "content": "x"},
                                             {"role": "assistant", "content": "y", "weight": -1}]})
    assert err.kind == "bad_record" and "`weight`" in str(err)


# ---------------------------------------------------------------------------- reader -> template


def test_ms_agent_record_renders_byte_for_byte_with_react(tmp_path, tiny_tokenizer):
    """Training text = the record's own text inside ChatML, so what the model learns is what it
    emits at inference (plus the observations the runner appends)."""
    from agenttune.data.templates import get_template

    turns = [{"from": "system", "value": MS_SYSTEM}, {"from": "user", "value": "Rain in Hangzhou?"},
             {"from": "assistant", "value": MS_ASSISTANT}, {"from": "user", "value": "Thanks!"},
             {"from": "assistant", "value": "You're welcome."}]
    conv = read_one(tmp_path, {"conversations": turns})
    text = get_template("react").render_text(conv)
    expected = "".join(f"<|im_start|>{t['from']}\n{t['value']}<|im_end|>\n" for t in turns)
    assert text == expected
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
