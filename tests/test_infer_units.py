"""infer.py's parts without a model: the reply parsers (and their round trip with every
template), stop-word handling on real token splits, the agent loop driven by scripted model
turns, and the metrics on hand-made predictions."""

from __future__ import annotations

import json

import pytest
import torch

from agenttune.data.schema import Conversation, Message, ToolCall, canonical_json
from agenttune.data.templates import TEMPLATES, get_template
from agenttune.inference.agent import new_conversation, run_agent, run_tool
from agenttune.inference.generate import StopAwareStreamer, cut_at_stop, held_back, stop_ids_and_words
from agenttune.inference.metrics import aggregate, comparison_table, rouge_l, score_step
from agenttune.inference.parsing import Reply, parse_reply
from agenttune.tools import Tool, ToolError, load_tools

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city"], "additionalProperties": False}}


def call(name: str, **args) -> ToolCall:
    return ToolCall(name=name, arguments=canonical_json(args))


# ----------------------------------------------------------------------------- round trip


def assistant_text(template: str, conv: Conversation, index: int) -> str:
    """What the template renders as message ``index``'s trained text: exactly what the model learns
    to generate there (headers and the end-of-turn token excluded)."""
    segments = get_template(template).render(conv)
    return "".join(s.text for s in segments if s.msg_index == index and s.role == "assistant"
                   and s.kind not in ("header", "eot", "obs_marker"))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("calls", [
    [call("get_weather", city="Paris")],
    [call("get_weather", city="北京", days=3)],
    [call("get_weather", city="Oslo"), call("get_weather", city="Rome", days=2)],
], ids=["one", "unicode", "parallel"])
def test_a_rendered_call_parses_back_to_the_same_call(template, calls):
    if template == "llama3" and len(calls) > 1:
        pytest.skip("Llama 3.1's format has one call per message (the template refuses more)")
    conv = Conversation([
        Message("user", "weather?"),
        Message("assistant", "Let me look that up." if template != "llama3" else "", calls),
        *[Message("tool", '{"ok": true}') for _ in calls],
        Message("assistant", "Done."),
    ], tools=[WEATHER])
    reply = parse_reply(template, assistant_text(template, conv, 1))
    assert reply.ok, reply.error
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [(c.name, c.args()) for c in calls]
    final = parse_reply(template, assistant_text(template, conv, len(conv.messages) - 1))
    assert final.ok and not final.tool_calls and final.final_answer == "Done."


# ----------------------------------------------------------------------------- parsers


def test_react_reads_python_dict_action_input_without_eval():
    reply = parse_reply("react", "Thought: check\nAction: get_weather\nAction Input: {'city': 'Paris', 'days': 2}\n")
    assert reply.ok and reply.tool_calls[0].args() == {"city": "Paris", "days": 2} and reply.reasoning == "check"
    evil = parse_reply("react", "Action: get_weather\nAction Input: __import__('os').system('true')\n")
    assert not evil.ok and "neither JSON nor a Python literal" in evil.error


def test_react_text_without_keywords_is_not_an_answer():
    reply = parse_reply("react", "just some words")
    assert reply.ok and reply.final_answer is None and reply.content == "just some words"


@pytest.mark.parametrize("template,text,needle", [
    ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', "not valid JSON"),
    ("qwen", '<tool_call>\n{"arguments": {}}\n</tool_call>', '"name"'),
    ("qwen", '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', "must be a JSON object"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"', "not valid JSON"),
    ("chatml_kv", "<tool_call>\nget_weather\ncity Paris\n</tool_call>", "not `argument: value`"),
    ("chatml_kv", "<tool_call>\nget_weather\ncity: Paris\ncity: Rome\n</tool_call>", "'city' twice"),
    ("chatml_kv", '<tool_call>\nget_weather\ncity: "Paris\n</tool_call>', "starts as JSON but is not JSON"),
    ("chatml_kv", "<tool_call>\ncity: Paris\n</tool_call>", "function's name on its own line"),
    ("react", "Action: get_weather\n", "no `Action Input:`"),
])
def test_malformed_calls_are_reported_not_raised(template, text, needle):
    reply = parse_reply(template, text)
    assert not reply.ok and needle in reply.error and reply.tool_calls == []


def test_kv_reads_hermes_json_and_lines_without_the_blank():
    reply = parse_reply("chatml_kv", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert reply.ok and reply.tool_calls[0].args() == {"city": "Paris"}
    # as JSON reads the same with or without blanks, a line reads the same without the one after the colon
    reply = parse_reply("chatml_kv", "<tool_call>\nget_weather\ncity:Paris\ndays:2\n</tool_call>")
    assert reply.ok and reply.tool_calls[0].args() == {"city": "Paris", "days": 2}


def test_hermes_reads_reasoning_and_string_arguments():
    reply = parse_reply("qwen", '<think>\nneed data\n</think>\n\nOne moment.\n<tool_call>\n'
                                '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>')
    assert reply.reasoning == "need data" and reply.content == "One moment."
    assert reply.tool_calls[0].args() == {"city": "Paris"}


# ----------------------------------------------------------------------------- stop words


def test_stop_words_split_across_tokens_are_found_and_held_back(tiny_tokenizer):
    template = get_template("react")
    ids, words = stop_ids_and_words(tiny_tokenizer, template)
    assert words == ["Observation:"]  # not one token in this vocabulary
    assert tiny_tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_end|>"
    text = "Thought: look\nAction: get_weather\nAction Input: {\"city\": \"Paris\"}\nObservation: sunny"
    pieces = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer.encode(text)]
    assert "Observation:" not in pieces, "the test needs the stop word split across tokens"
    streamed = []
    streamer = StopAwareStreamer(tiny_tokenizer, ["Observation:"], streamed.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() pushes first
    for token in tiny_tokenizer.encode(text):
        streamer.put(torch.tensor([token]))
        assert "Ob" not in "".join(streamed), "no piece of the stop word may reach the user"
    streamer.end()
    assert "".join(streamed) == text[: text.index("Observation:")]


def test_cut_and_hold_back():
    assert cut_at_stop("abc Observation: x", ["Observation:", "<|im_end|>"]) == ("abc ", "Observation:")
    assert cut_at_stop("done<|im_end|>", ["Observation:", "<|im_end|>"]) == ("done", "<|im_end|>")
    assert cut_at_stop("plain", ["Observation:"]) == ("plain", None)
    assert held_back("text Obser", ["Observation:"]) == 5
    assert held_back("text", ["Observation:"]) == 0


# ----------------------------------------------------------------------------- the agent loop


def weather(city: str, days: int = 1) -> dict:
    if city == "Atlantis":
        raise KeyError("no such city")
    return {"city": city, "sky": "sunny", "days": days}


TOOLS = {"get_weather": Tool("get_weather", WEATHER["description"], WEATHER["parameters"], weather)}


def scripted(turns: list[str]):
    """A stand-in model: returns the given turns in order and records each prompt it saw."""
    seen = []

    def respond(conv: Conversation) -> str:
        seen.append(get_template("qwen").render_text(conv, add_generation_prompt=True))
        return turns[len(seen) - 1]

    respond.seen = seen
    return respond


def hermes(name: str, args) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


def test_agent_loop_recovers_from_every_kind_of_bad_call():
    model = scripted([
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',  # malformed JSON
        hermes("get_forecast", {"city": "Paris"}),                                     # unknown tool
        hermes("get_weather", {"city": "Paris", "days": "two"}),                       # fails the schema
        hermes("get_weather", {"town": "Paris"}),                                      # missing required key
        hermes("get_weather", {"city": "Atlantis"}),                                   # the tool raises
        hermes("get_weather", {"city": "Paris", "days": 2}),                           # good
        "It is sunny in Paris for 2 days.",
    ])
    result = run_agent(model, new_conversation("Weather in Paris?", TOOLS, None), TOOLS, "qwen", max_turns=10)
    assert result.stopped == "final" and result.final_answer == "It is sunny in Paris for 2 days."
    assert result.turns == 7
    observations = [m.content for m in result.conversation.messages if m.role == "tool"]
    assert "not valid JSON" in observations[0]
    assert "unknown tool 'get_forecast'" in observations[1] and "get_weather" in observations[1]
    assert "at days" in observations[2] and "is not of type 'integer'" in observations[2]
    assert "'city' is a required property" in observations[3]
    assert "get_weather failed: KeyError" in observations[4]
    assert json.loads(observations[5]) == {"city": "Paris", "sky": "sunny", "days": 2}
    # The model saw each error before its next turn.
    assert "unknown tool" in model.seen[2] and "is not of type" in model.seen[3]
    assert [e.kind for e in result.events].count("error") == 5


def test_agent_loop_stops_at_max_turns():
    model = scripted([hermes("get_weather", {"city": "Paris"})] * 3)
    result = run_agent(model, new_conversation("?", TOOLS, None), TOOLS, "qwen", max_turns=3)
    assert result.stopped == "max_turns" and result.final_answer is None and result.turns == 3


def test_agent_loop_with_react_parallel_actions_and_python_dict_input():
    turns = ["Thought: two cities\nAction: get_weather\nAction Input: {'city': 'Oslo'}\n"
             "Action: get_weather\nAction Input: {\"city\": \"Rome\"}\n",
             "Thought: I now know the final answer\nFinal Answer: Sunny in both."]
    seen = []

    def respond(conv):
        seen.append(get_template("react").render_text(conv, add_generation_prompt=True))
        return turns[len(seen) - 1]

    result = run_agent(respond, new_conversation("Oslo and Rome?", TOOLS, None), TOOLS, "react", max_turns=4)
    assert result.final_answer == "Sunny in both."
    # The second prompt continues the open ReAct turn right after both observations.
    assert seen[1].endswith('Observation: {"city": "Rome", "sky": "sunny", "days": 1}\n')
    turn = seen[1].split("<|im_start|>assistant\n")
    assert len(turn) == 2 and turn[1].count("Observation:") == 2 and turn[1].startswith(turns[0])


def test_run_tool_and_load_tools_errors():
    assert run_tool(call("nope"), TOOLS)[1] is False
    with pytest.raises(ToolError, match="cannot be imported"):
        load_tools(["no_such_module_xyz"])
    with pytest.raises(ToolError, match="must define TOOLS"):
        load_tools(["json"])
    assert "calculator" in load_tools(["agenttune.demo_tools"])


# ----------------------------------------------------------------------------- metrics


def test_rouge_l_by_hand():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0
    assert rouge_l("北京晴天", "北京下雨") == pytest.approx(0.5)  # CJK characters are tokens


def test_metrics_on_hand_made_predictions():
    gold2 = [call("get_weather", city="Oslo"), call("get_weather", city="Rome", days=2)]
    scores = [
        # call steps: exact; names right but one argument wrong; wrong tool; unreadable
        score_step("call", Reply("", [call("get_weather", city="Oslo")]), [call("get_weather", city="Oslo")], ""),
        score_step("call", Reply("", [call("get_weather", city="Rome", days=3), call("get_weather", city="Oslo")]), gold2, ""),
        score_step("call", Reply("", [call("get_time", city="Oslo")]), [call("get_weather", city="Oslo")], ""),
        score_step("call", Reply("", error="bad json"), [call("get_weather", city="Oslo")], ""),
        # final steps: exact up to spaces; a call where an answer was due
        score_step("final", Reply("It is  sunny.", final_answer="It is  sunny."), [], "It is sunny."),
        score_step("final", Reply("", [call("get_weather", city="Oslo")]), [], "It is sunny."),
        score_step("general", Reply("a b c d"), [], "a c d e"),
    ]
    m = aggregate(scores)
    assert m["steps"] == {"call": 4, "final": 2, "general": 1}
    assert m["format_validity"] == pytest.approx(4 / 6)  # the unreadable call and the misplaced call fail
    assert m["tool_name_accuracy"] == pytest.approx(2 / 4)
    assert m["argument_exact_match"] == pytest.approx(1 / 4)
    # (name, key, value) triples: hits 1 + 2 (both cities) + 0 + 0 = 3; predicted 1 + 3 + 1 + 0 = 5;
    # gold 1 + 3 + 1 + 1 = 6. P = 3/5, R = 3/6, F1 = 6/11.
    assert m["argument_kv_f1"] == pytest.approx(6 / 11)
    assert m["final_answer_exact_match"] == pytest.approx(0.5)
    assert m["final_answer_rouge_l"] == pytest.approx(0.5)
    assert m["general_rouge_l"] == pytest.approx(0.75)
    table = comparison_table({"tool_name_accuracy": 0.1}, m)
    assert "tool_name_accuracy" in table and "+0.400" in table and "general_rouge_l" in table


# ----------------------------------------------------------------------------- serve: reasoning and content

PLANNED = ("<think>\nCheapest flight first, then its price times 6.\n</think>\n\n"
           "<tool_call>\nsearch_flights\norigin: Oslo\ndestination: Rome\ndate: 2025-03-01\n</tool_call>")


def stream_through_gate(text: str, template: str, with_tools: bool, final: bool) -> tuple[str, str]:
    """Feed ``text`` a character at a time, as tokens arrive; then what a turn without calls sends last."""
    from agenttune.inference.generate import Completion
    from agenttune.inference.serve import ContentGate, message_of

    gate = ContentGate(template, with_tools)
    reasoning = content = ""
    for ch in text:
        r, c = gate.feed(ch)
        reasoning, content = reasoning + r, content + c
    if final:
        message, _ = message_of(Completion(text, "stop", None, 1, 1), template, with_tools)
        r, c = gate.rest(message, text)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def test_serve_returns_a_plan_before_calls_as_reasoning_and_reads_it_back():
    from agenttune.inference.generate import Completion
    from agenttune.inference.serve import ChatRequest, message_of, to_conversation

    message, finish = message_of(Completion(PLANNED, "stop", None, 1, 1), "chatml_kv", True)
    assert finish == "tool_calls" and message["content"] is None
    assert message["reasoning_content"] == "Cheapest flight first, then its price times 6."
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["origin"] == "Oslo"
    # The client sends the message back with the tool's result: the plan is in the next prompt.
    tool = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "{}"}
    conv = to_conversation(ChatRequest(messages=[{"role": "user", "content": "6 people, Oslo to Rome?"}, message, tool],
                                       tools=[{"type": "function", "function": {"name": "search_flights"}}]))
    assert conv.messages[1].reasoning == "Cheapest flight first, then its price times 6."
    assert "<think>\nCheapest flight first" in get_template("chatml_kv").render_text(conv, add_generation_prompt=True)
    # Streamed: the plan as reasoning deltas, no content (the calls go out whole at the end).
    assert stream_through_gate(PLANNED, "chatml_kv", True, final=False) == (
        "Cheapest flight first, then its price times 6.", "")


@pytest.mark.parametrize("text,expected", [
    ("<think>\nAll done.\n</think>\n\nIt is 84.", ("All done.", "It is 84.")),
    ("It is 84.", ("", "It is 84.")),
    ("<b>84</b>", ("", "<b>84</b>")),  # opens like <think>, then is not
    ("<think>\nStill thinking", ("Still thinking", "")),  # ran out of tokens inside the reasoning
    ("<think>Two\nlines</think>84.", ("Two\nlines", "84.")),  # written without the template's newlines
])
def test_serve_streams_reasoning_apart_from_an_answer(text, expected):
    from agenttune.inference.generate import Completion
    from agenttune.inference.serve import message_of

    assert stream_through_gate(text, "chatml_kv", True, final=True) == expected
    message, _ = message_of(Completion(text, "length", None, 1, 1), "chatml_kv", True)
    assert (message.get("reasoning_content", ""), message["content"]) == expected  # the same, not streamed


def test_serve_without_tools_returns_the_text_as_written():
    text = "<think>\nx\n</think>\n\nHi."
    assert stream_through_gate(text, "chatml_kv", False, final=True) == ("", text)
