"""Supervision: which tokens are trained, with what weight, and what happens at the edges.

Assertions read the decoded text of trained and untrained token runs, so they check what
the model actually learns from rather than internal flags.
"""

import itertools
import json

import numpy as np
import pytest

from agenttune.data.encode import (
    IGNORE_INDEX,
    encode,
    encode_batch,
    token_weights,
    weighted_segments,
)
from agenttune.data.options import SupervisionConfig
from agenttune.data.schema import Conversation, DataError, Message, ToolCall
from agenttune.data.templates import TEMPLATES

QWEN, LLAMA3, REACT = TEMPLATES["qwen"], TEMPLATES["llama3"], TEMPLATES["react"]
WEATHER = {"name": "get_weather", "description": "Get the weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OBSERVATION = '{"temp_c": 18, "condition": "rain"}'


def sup(**kw):
    return SupervisionConfig(**{"max_length": 4096, **kw})


def call(name, **args):
    return ToolCall(name=name, arguments=json.dumps(args))


def agent_conv():
    """Two user turns; the second needs a tool."""
    return Conversation([
        Message("system", "You are a weather bot."),
        Message("user", "Hello there"),
        Message("assistant", "Hi, ask me about weather."),
        Message("user", "Weather in Paris?"),
        Message("assistant", "Checking now.", tool_calls=[call("get_weather", city="Paris")]),
        Message("tool", OBSERVATION),
        Message("assistant", "It is 18 degrees and rainy."),
    ], tools=[WEATHER], origin="agent.jsonl:5", source="agent")


def ms_agent_conv():
    return Conversation([
        Message("user", "Is it raining in Hangzhou?"),
        Message("assistant", "", raw="Action: weather_lookup\nAction Input: {'city': 'Hangzhou'}\n",
                tool_calls=[ToolCall("weather_lookup", '{"city": "Hangzhou"}')]),
        Message("tool", "{'condition': 'rain'}", raw=" {'condition': 'rain'}\n"),
        Message("assistant", "Yes.", raw="Thought: I now know the final answer\nFinal Answer: Yes, it rains."),
    ], tools=[{"name": "weather_lookup", "description": "Weather", "parameters": {}}], origin="ms.jsonl:2")


def runs(enc, tokenizer):
    """Consecutive tokens of equal weight, decoded: [(text, weight), ...]."""
    pairs = zip(enc.input_ids, enc.weights)
    return [(tokenizer.decode([i for i, _ in group]), w) for w, group in itertools.groupby(pairs, key=lambda p: p[1])]


def trained(enc, tokenizer):
    # Runs are joined with a separator so a substring can never span two separate runs.
    return "\x00".join(text for text, w in runs(enc, tokenizer) if w > 0)


def untrained(enc, tokenizer):
    return "\x00".join(text for text, w in runs(enc, tokenizer) if w == 0)


def weight_of(enc, tokenizer, text):
    """The weights of the run(s) whose decoded text contains ``text``."""
    return {w for t, w in runs(enc, tokenizer) if text in t}


# ----------------------------------------------------------------------------- train_on


def test_train_on_assistant(tiny_tokenizer):
    enc = encode(agent_conv(), tiny_tokenizer, QWEN, sup())
    yes, no = trained(enc, tiny_tokenizer), untrained(enc, tiny_tokenizer)
    for reply in ("Hi, ask me about weather.", "Checking now.", "It is 18 degrees and rainy.",
                  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'):
        assert reply in yes
    for prompt in ("You are a weather bot.", "Hello there", "Weather in Paris?", OBSERVATION):
        assert prompt in no and prompt not in yes
    assert "temp_c" not in yes and "rain\"" not in yes
    assert "<|im_start|>" not in yes  # headers never
    assert yes.count("<|im_end|>") == 3  # one per assistant message
    ids, labels = np.array(enc.input_ids), np.array(enc.labels)
    w = np.array(enc.weights)
    assert (labels[w == 0] == IGNORE_INDEX).all() and (labels[w > 0] == ids[w > 0]).all()
    assert enc.num_trained == int((w > 0).sum()) > 0
    assert enc.source == "agent" and not enc.truncated


def test_train_on_last_assistant(tiny_tokenizer):
    enc = encode(agent_conv(), tiny_tokenizer, QWEN, sup(train_on="last_assistant"))
    yes, no = trained(enc, tiny_tokenizer), untrained(enc, tiny_tokenizer)
    assert "Hi, ask me about weather." in no and "Hi, ask" not in yes
    assert "Checking now." in yes and "It is 18 degrees and rainy." in yes
    assert OBSERVATION in no
    assert yes.count("<|im_end|>") == 2


def test_train_on_all_trains_prompts_but_not_observations_or_headers(tiny_tokenizer):
    enc = encode(agent_conv(), tiny_tokenizer, QWEN, sup(train_on="all"))
    yes, no = trained(enc, tiny_tokenizer), untrained(enc, tiny_tokenizer)
    for text in ("You are a weather bot.", "Hello there", "Weather in Paris?", "It is 18 degrees and rainy."):
        assert text in yes
    assert OBSERVATION in no and "temp_c" not in yes
    assert "<|im_start|>" not in yes and "# Tools" not in yes


# ----------------------------------------------------------------------------- loss_scale


def test_loss_scale_default_is_one(tiny_tokenizer):
    enc = encode(agent_conv(), tiny_tokenizer, QWEN, sup())
    assert set(enc.weights) == {0.0, 1.0}


def test_loss_scale_hermes_doubles_tool_calls(tiny_tokenizer):
    enc = encode(agent_conv(), tiny_tokenizer, QWEN, sup(loss_scale="hermes"))
    assert weight_of(enc, tiny_tokenizer, '{"name": "get_weather", "arguments": {"city": "Paris"}}') == {2.0}
    assert weight_of(enc, tiny_tokenizer, "It is 18 degrees and rainy.") == {1.0}
    assert weight_of(enc, tiny_tokenizer, OBSERVATION) == {0.0}


def tripled_tokens(conv, tokenizer, template: str, weight: str):
    """``conv`` encoded with ``weight`` at 3.0, and the tokens whose weight that changed. The
    tokens and labels stay those of the plain encoding, and each changed weight is exactly 3x."""
    from agenttune.data.templates import get_template

    tpl = get_template(template)
    plain = encode(conv, tokenizer, tpl, sup())
    enc = encode(conv, tokenizer, tpl, sup(**{weight: 3.0}))
    assert enc.input_ids == plain.input_ids and enc.labels == plain.labels
    changed = [i for i, (a, b) in enumerate(zip(plain.weights, enc.weights)) if a != b]
    assert all(enc.weights[i] == 3.0 * plain.weights[i] > 0 for i in changed)
    return enc, changed


@pytest.mark.parametrize("template", ["qwen", "chatml_compact", "react"])
def test_after_call_weight_scales_the_token_that_follows_each_call(tiny_tokenizer, template):
    """Two parallel calls: after the first comes the second (\n<tool_call>), after the second the
    end of the turn. In react one Action per step, followed by the Observation: marker."""
    conv = Conversation([
        Message("user", "Weather in Paris and Rome?"),
        Message("assistant", "", tool_calls=[call("get_weather", city="Paris"), call("get_weather", city="Rome")]),
        Message("tool", OBSERVATION), Message("tool", OBSERVATION),
        Message("assistant", "Both rainy."),
    ], tools=[{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        origin="t.jsonl:1")
    enc, changed = tripled_tokens(conv, tiny_tokenizer, template, "after_call_weight")
    # the token before each changed one closes a call
    closing = [tiny_tokenizer.decode(enc.input_ids[max(0, i - 3):i]) for i in changed]
    if template == "react":
        # react writes parallel calls as two Action / Action Input pairs, then the Observation: markers
        assert len(changed) == 2 and all(c.endswith("}\n") for c in closing), closing
        following = [tiny_tokenizer.decode(enc.input_ids[i:i + 3]) for i in changed]
        assert following[0].startswith("Action") and following[1].startswith("Obs"), following
    else:
        assert len(changed) == 2 and all("</tool_call>" in c or "call>" in c for c in closing), closing
        following = [tiny_tokenizer.decode(enc.input_ids[i:i + 6]) for i in changed]
        assert following[0].startswith("\n<tool_call>") and following[1].startswith("<|im_end|>"), following
    with pytest.raises(ValueError, match="after_call_weight"):
        sup(after_call_weight=0)


@pytest.mark.parametrize("template", ["qwen", "chatml_kv", "llama3", "react"])
def test_name_weight_scales_the_tokens_of_each_called_function_name(tiny_tokenizer, template):
    conv = Conversation([
        Message("user", "Weather in Paris, and then in Rome?"),
        Message("assistant", "", tool_calls=[call("get_weather", city="Paris")]),
        Message("tool", OBSERVATION),
        Message("assistant", "", tool_calls=[call("get_weather", city="Rome")]),
        Message("tool", OBSERVATION),
        Message("assistant", "Both rainy; get_weather says so."),
    ], tools=[WEATHER], origin="t.jsonl:1")
    enc, changed = tripled_tokens(conv, tiny_tokenizer, template, "name_weight")
    # the two calls' names, and nothing else: not the arguments, not the name in the answer
    runs = [tiny_tokenizer.decode([enc.input_ids[i] for i in group])
            for group in np.split(np.array(changed), np.nonzero(np.diff(changed) > 1)[0] + 1)]
    assert [r.strip().strip('"') for r in runs] == ["get_weather", "get_weather"], runs
    with pytest.raises(ValueError, match="name_weight"):
        sup(name_weight=0)


def test_first_token_weight_scales_the_first_token_of_each_assistant_turn(tiny_tokenizer):
    conv = agent_conv()
    plain = encode(conv, tiny_tokenizer, QWEN, sup(loss_scale="hermes"))
    enc = encode(conv, tiny_tokenizer, QWEN, sup(loss_scale="hermes", first_token_weight=3.0))
    assert enc.input_ids == plain.input_ids and enc.labels == plain.labels
    changed = [i for i, (a, b) in enumerate(zip(plain.weights, enc.weights)) if a != b]
    assert len(changed) == 3  # one per assistant message: greeting, call, answer
    for i in changed:
        assert enc.weights[i] == 3.0 * plain.weights[i] and plain.weights[i - 1] == 0.0  # right after the header
    firsts = [tiny_tokenizer.decode([enc.input_ids[i]]) for i in changed]
    assert "Hi, ask me about weather.".startswith(firsts[0]) and "It is 18".startswith(firsts[2])
    # A message masked out (train_on=last_assistant) has no trained first token to scale.
    last = encode(conv, tiny_tokenizer, QWEN, sup(train_on="last_assistant", first_token_weight=3.0))
    assert sum(w > 1.0 for w in last.weights) == 2
    with pytest.raises(ValueError, match="first_token_weight"):
        sup(first_token_weight=0)


def test_loss_scale_react(tiny_tokenizer):
    enc = encode(ms_agent_conv(), tiny_tokenizer, REACT, sup(loss_scale="react"))
    r = runs(enc, tiny_tokenizer)
    assert ("Action: weather_lookup\nAction Input: {'city': 'Hangzhou'}\nObservation:", 2.0) in r
    assert (" {'condition': 'rain'}\n", 0.0) in r
    assert ("Thought: I now know the final answer\nFinal Answer: Yes, it rains.<|im_end|>", 1.0) in r
    pieces = weighted_segments(ms_agent_conv(), REACT, sup(loss_scale="react"))
    assert ("Action Input: {'city': 'Hangzhou'}\n", 2.0) in pieces
    assert ("Final Answer: Yes, it rains.", 1.0) in pieces
    assert "".join(t for t, _ in pieces) == REACT.render_text(ms_agent_conv())


def test_observation_pasted_inside_assistant_text_is_never_trained(tiny_tokenizer):
    conv = ms_agent_conv()
    conv.messages[1].raw = "Action: weather_lookup\nAction Input: {}\nObservation: leaked tool output\n"
    conv.messages[1].weight = 1.0
    enc = encode(conv, tiny_tokenizer, REACT, sup(loss_scale="react"))
    assert "leaked tool output" in untrained(enc, tiny_tokenizer)
    assert "leaked" not in trained(enc, tiny_tokenizer)


# ----------------------------------------------------------------------------- observations, overrides, reasoning


def test_observation_weight(tiny_tokenizer):
    enc = encode(agent_conv(), tiny_tokenizer, QWEN, sup(observation_weight=0.25))
    assert weight_of(enc, tiny_tokenizer, OBSERVATION) == {0.25}
    assert "<tool_response>" in untrained(enc, tiny_tokenizer)  # the wrapper is scaffolding
    for name in ("llama3", "react", "chatml"):
        enc = encode(agent_conv(), tiny_tokenizer, TEMPLATES[name], sup(observation_weight=0.25))
        assert 0.25 in enc.weights
        assert "temp_c" in "".join(t for t, w in runs(enc, tiny_tokenizer) if w == 0.25)


def test_message_weight_overrides_train_on_scale_and_observation_weight(tiny_tokenizer):
    conv = agent_conv()
    conv.messages[2].weight = 0.0   # an assistant reply we do not want to learn
    conv.messages[3].weight = 0.5   # a user prompt we do
    conv.messages[5].weight = 1.5   # a tool result we do
    enc = encode(conv, tiny_tokenizer, QWEN, sup(loss_scale="hermes"))
    assert weight_of(enc, tiny_tokenizer, "Hi, ask me about weather.") == {0.0}
    assert weight_of(enc, tiny_tokenizer, "Weather in Paris?") == {0.5}
    assert weight_of(enc, tiny_tokenizer, OBSERVATION) == {1.5}
    assert weight_of(enc, tiny_tokenizer, "<|im_start|>user\n") == {0.0}  # headers stay untrained
    assert weight_of(enc, tiny_tokenizer, '<tool_call>\n{"name": "get_weather"') == {2.0}  # others untouched


def reasoning_conv():
    return Conversation([
        Message("user", "First question"),
        Message("assistant", "First answer", reasoning="old thoughts"),
        Message("user", "Second question"),
        Message("assistant", "Second answer", reasoning="new thoughts"),
    ], origin="reason.jsonl:1")


def test_reasoning_is_trained_and_history_reasoning_can_be_dropped(tiny_tokenizer):
    enc = encode(reasoning_conv(), tiny_tokenizer, QWEN, sup())
    yes = trained(enc, tiny_tokenizer)
    assert "<think>\nold thoughts\n</think>" in yes and "<think>\nnew thoughts\n</think>" in yes
    enc = encode(reasoning_conv(), tiny_tokenizer, QWEN, sup(reasoning_in_history=False))
    text = tiny_tokenizer.decode(enc.input_ids)
    assert "old thoughts" not in text and "First answer" in trained(enc, tiny_tokenizer)
    assert "<think>\nnew thoughts\n</think>\n\nSecond answer" in trained(enc, tiny_tokenizer)


# ----------------------------------------------------------------------------- turn ends and headers


def test_eot_trained_headers_untrained(tiny_tokenizer):
    im_end, im_start = tiny_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    enc = encode(agent_conv(), tiny_tokenizer, QWEN, sup())
    text = tiny_tokenizer.decode(enc.input_ids)
    # im_end after an assistant message is trained; after system, user and tool turns it is not.
    end_weights = [w for i, w in zip(enc.input_ids, enc.weights) if i == im_end]
    assert end_weights == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert text.count("<|im_end|>") == len(end_weights)
    assert all(w == 0 for i, w in zip(enc.input_ids, enc.weights) if i == im_start)

    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    enc = encode(agent_conv(), tiny_tokenizer, LLAMA3, sup())
    assert "<|start_header_id|>" not in trained(enc, tiny_tokenizer)
    assert [w for i, w in zip(enc.input_ids, enc.weights) if i == eot] == [0, 0, 1, 0, 1, 0, 1]


def test_react_turn_end_is_trained_only_after_an_assistant_message(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    conv = ms_agent_conv()
    enc = encode(conv, tiny_tokenizer, REACT, sup())
    assert [w for i, w in zip(enc.input_ids, enc.weights) if i == im_end][-1] == 1.0
    conv.messages = conv.messages[:3]  # the turn now ends on the tool result
    enc = encode(conv, tiny_tokenizer, REACT, sup())
    assert [w for i, w in zip(enc.input_ids, enc.weights) if i == im_end][-1] == 0.0
    assert "Action: weather_lookup" in trained(enc, tiny_tokenizer)


# ----------------------------------------------------------------------------- truncation and errors


def test_truncation_drop_raises_too_long(tiny_tokenizer):
    with pytest.raises(DataError, match="agent.jsonl:5") as err:
        encode(agent_conv(), tiny_tokenizer, QWEN, sup(max_length=60))
    assert err.value.kind == "too_long"
    assert "max_length=60" in str(err.value)


def test_truncation_keep_turns_keeps_whole_leading_turns(tiny_tokenizer):
    conv = agent_conv()
    full = encode(conv, tiny_tokenizer, QWEN, sup())
    first_turn = Conversation(conv.messages[:3], tools=conv.tools, origin=conv.origin)
    expected = encode(first_turn, tiny_tokenizer, QWEN, sup())
    limit = len(expected.input_ids) + 5
    assert limit < len(full.input_ids)
    enc = encode(conv, tiny_tokenizer, QWEN, sup(max_length=limit, truncation="keep_turns"))
    assert enc.truncated and len(enc.input_ids) <= limit
    assert enc.input_ids == expected.input_ids and enc.weights == expected.weights
    assert tiny_tokenizer.decode(enc.input_ids).endswith("Hi, ask me about weather.<|im_end|>\n")
    # Not even the first turn fits: the sample is too long.
    with pytest.raises(DataError) as err:
        encode(conv, tiny_tokenizer, QWEN, sup(max_length=limit - 10, truncation="keep_turns"))
    assert err.value.kind == "too_long"


def test_keep_turns_never_cuts_a_tool_call_from_its_result(tiny_tokenizer):
    conv = agent_conv()
    conv.messages[-1].content = "It is 18 degrees and rainy. " * 20
    up_to_call = Conversation(conv.messages[:5], tools=conv.tools)  # ends on the call, before the result
    limit = len(encode(up_to_call, tiny_tokenizer, QWEN, sup()).input_ids)
    enc = encode(conv, tiny_tokenizer, QWEN, sup(max_length=limit, truncation="keep_turns"))
    text = tiny_tokenizer.decode(enc.input_ids)
    assert enc.truncated and "Weather in Paris?" not in text
    assert text.endswith("Hi, ask me about weather.<|im_end|>\n")


def test_keep_turns_needs_a_prefix_with_trained_tokens(tiny_tokenizer):
    conv = agent_conv()
    conv.messages[2].weight = 0.0  # the only turn that fits trains nothing
    limit = len(encode(Conversation(conv.messages[:3], tools=conv.tools), tiny_tokenizer, QWEN,
                       sup(train_on="all")).input_ids) + 5
    with pytest.raises(DataError) as err:
        encode(conv, tiny_tokenizer, QWEN, sup(max_length=limit, truncation="keep_turns"))
    assert err.value.kind == "too_long"


def test_no_trained_tokens_is_an_error(tiny_tokenizer):
    prompt_only = Conversation([Message("system", "S"), Message("user", "Q")], origin="p.jsonl:9")
    with pytest.raises(DataError, match="p.jsonl:9") as err:
        encode(prompt_only, tiny_tokenizer, QWEN, sup())
    assert err.value.kind == "no_trained_tokens"
    assert err.value.origin == "p.jsonl:9" and err.value.hint
    conv = agent_conv()
    conv.messages.append(Message("user", "Thanks"))
    with pytest.raises(DataError, match="last_assistant") as err:
        encode(conv, tiny_tokenizer, QWEN, sup(train_on="last_assistant"))
    assert err.value.kind == "no_trained_tokens"
    assert encode(prompt_only, tiny_tokenizer, QWEN, sup(train_on="all")).num_trained > 0


def test_encode_batch_matches_encode_and_keeps_errors_in_place(tiny_tokenizer):
    bad = Conversation([Message("user", "only a question")], origin="bad.jsonl:1")
    convs = [agent_conv(), bad, ms_agent_conv()]
    out = encode_batch(convs, tiny_tokenizer, REACT, sup())
    assert isinstance(out[1], DataError) and out[1].kind == "no_trained_tokens"
    for conv, got in zip([convs[0], convs[2]], [out[0], out[2]]):
        want = encode(conv, tiny_tokenizer, REACT, sup())
        assert (got.input_ids, got.labels, got.weights) == (want.input_ids, want.labels, want.weights)


# ----------------------------------------------------------------------------- the min-weight rule


def test_token_weight_is_the_minimum_over_its_characters():
    seg_ends = np.array([5, 10, 12])
    seg_weights = np.array([1.0, 0.0, 2.0])
    offsets = np.array([[0, 3], [3, 7], [7, 10], [10, 12], [9, 11], [4, 4], [12, 12], [0, 5]])
    got = token_weights(offsets, seg_ends, seg_weights)
    # inside, straddling 1|0, inside 0, inside 2, straddling 0|2, zero-width -> its start char,
    # zero-width at the very end -> last segment, exactly the first segment
    assert got.tolist() == [1.0, 0.0, 0.0, 2.0, 0.0, 1.0, 2.0, 1.0]


def test_token_straddling_tool_output_and_reply_is_not_trained(tiny_tokenizer):
    """A tool result glued to the next word: one token covers both, so it must stay untrained."""
    conv = ms_agent_conv()
    conv.messages[2].raw = " the answer is th"
    conv.messages[3].raw = "ought: done\nFinal Answer: Yes, it rains."
    text = REACT.render_text(conv)
    boundary = text.index("ought: done")
    enc = tiny_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    straddling = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if s < boundary < e]
    assert straddling, "the fixture must put one token across the boundary"
    encoded = encode(conv, tiny_tokenizer, REACT, sup())
    assert all(encoded.weights[t] == 0.0 for t in straddling)
    assert encoded.weights[straddling[-1] + 1] == 1.0  # the reply right after it is trained
