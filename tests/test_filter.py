"""Trajectory filtering: every reject reason, dedupe, length caps, the rejects file, the
synthetic trajectories and (when ../shared/corpora is present) the real FireAct file."""

import copy
import json
import random
from pathlib import Path

import pytest

from agenttune.data import synth
from agenttune.data.encode import encode
from agenttune.data.filter import FilterConfig, FilterReport, filter_records, main, run
from agenttune.data.options import SupervisionConfig
from agenttune.data.readers import read_file
from agenttune.data.schema import DataError
from agenttune.data.templates import get_template
from agenttune.demo_tools import TOOLS, TOOLS_BY_NAME

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
FIREACT = CORPORA / "fireact" / "hotpotqa_dev_trajectories_llama2_7b.json"
DEMO_SCHEMAS = {t.name: t.schema for t in TOOLS}

WEATHER = {"city": "Oslo", "date": "2025-01-05"}
GOOD = {
    "conversations": [
        {"from": "human", "value": "Weather in Oslo on 2025-01-05?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": WEATHER})},
        {"from": "observation", "value": TOOLS_BY_NAME["get_weather"](WEATHER)},
        {"from": "gpt", "value": "Oslo on 2025-01-05: sunny, 0°C."},
    ],
    "system": "You are a helpful assistant with tools.",
    "tools": json.dumps([DEMO_SCHEMAS["get_weather"], DEMO_SCHEMAS["calculator"]]),
    "reward": True,
}


def variant(*changes, **fields) -> dict:
    record = copy.deepcopy(GOOD)
    record.update(fields)
    for change in changes:
        change(record)
    return record


def set_call(arguments, name="get_weather"):
    def change(record):
        record["conversations"][1]["value"] = json.dumps({"name": name, "arguments": arguments})
    return change


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def filtered(tmp_path, records, **cfg) -> tuple[list[dict], list[DataError], FilterReport]:
    path = write(tmp_path / "in.jsonl", records)
    report = FilterReport()
    tokenizer = cfg.pop("tokenizer", None)
    items = list(filter_records([path], FilterConfig(**cfg), report, tokenizer))
    kept = [i for i in items if not isinstance(i, DataError)]
    return kept, [i for i in items if isinstance(i, DataError)], report


def only_reject(tmp_path, record, **cfg) -> DataError:
    kept, rejects, _ = filtered(tmp_path, [record], **cfg)
    assert not kept and len(rejects) == 1
    assert rejects[0].origin == f"{tmp_path / 'in.jsonl'}:1"
    return rejects[0]


# ----------------------------------------------------------------------------- every reason


def test_good_record_is_kept_unchanged(tmp_path):
    kept, rejects, report = filtered(tmp_path, [GOOD], tools=DEMO_SCHEMAS)
    assert kept == [GOOD] and not rejects
    assert report.kept == 1 and report.checked_calls == 1 and report.unchecked_calls == 0


def _drop(key):
    return lambda r: r.pop(key)


@pytest.mark.parametrize("record, cfg, kind, words", [
    (variant(reward=False), {}, "failed", "`reward` is false"),
    (variant(reward=0.5), {}, "failed", ">= 1 (--min-reward)"),
    (variant(reward=0.5), {"min_reward": 0.6}, "failed", ">= 0.6"),
    (variant(_drop("reward"), success=False), {}, "failed", "`success` is false"),
    (variant(_drop("reward")), {}, "no_reward", "no `reward` or `success` field"),
    (variant(reward="yes"), {}, "bad_reward", "must be true/false or a number"),
    (variant(lambda r: r["conversations"].pop()), {}, "no_final_answer", "ends without a final answer"),
    (variant(set_call(WEATHER, "get_forecast")), {}, "unknown_tool", "`get_forecast`"),
    (variant(set_call(WEATHER, "get_forecast"), tools="[]"), {}, "unknown_tool", "`get_forecast`"),
    (variant(set_call(WEATHER, "get_forecast"), _drop("tools")), {"tools": DEMO_SCHEMAS}, "unknown_tool",
     "not a known tool"),
    (variant(set_call({"city": "Oslo"})), {}, "invalid_arguments", "'date' is a required property"),
    (variant(set_call({"city": "Oslo", "date": "2025-01-05", "unit": "F"})), {}, "invalid_arguments",
     "Additional properties"),
    (variant(set_call({"city": 7, "date": "2025-01-05"})), {}, "invalid_arguments", "at city"),
    (variant(lambda r: r["conversations"][1].update(value="get_weather(Oslo)")), {}, "bad_arguments",
     "not valid JSON"),
    (variant(tools=json.dumps([{"name": "get_weather", "parameters": {"type": "objekt"}}])), {}, "bad_tools",
     "not valid JSON Schema"),
    (variant(lambda r: r["conversations"].insert(0, {"from": "gpt", "value": "Hi"})), {}, "role_order",
     "breaks the alternation"),
    ({"question": "?", "reward": True}, {}, "unknown_format", "cannot tell the record's format"),
    ([1, 2], {}, "bad_record", "must be a JSON object"),
    ("{not json", {}, "invalid_json", "invalid JSON"),
])
def test_reject_reasons(tmp_path, record, cfg, kind, words):
    err = only_reject(tmp_path, record, **cfg)
    assert err.kind == kind and words in str(err), str(err)


def test_numeric_and_success_rewards_and_unrewarded_records(tmp_path):
    kept, _, _ = filtered(tmp_path, [variant(reward=1), variant(reward=0.7, system="other")], min_reward=0.7)
    assert len(kept) == 2
    kept, _, _ = filtered(tmp_path, [variant(_drop("reward"), success=True)])
    assert len(kept) == 1
    kept, _, _ = filtered(tmp_path, [variant(_drop("reward"))], require_reward=False)
    assert len(kept) == 1


def test_module_schema_checks_ms_agent_calls(tmp_path):
    """ms-agent prompts declare parameters without types; the --tools schema still checks them."""
    ep = synth.task_convert(synth.Ctx(random.Random(0), synth.agent_pools("train"), "en", "train"))
    synth.offer_tools(ep, random.Random(0))
    record = synth.ms_agent_record(ep, {}) | {"reward": True}
    kept, _, report = filtered(tmp_path, [record], tools=DEMO_SCHEMAS)
    assert len(kept) == 1 and report.checked_calls == 1
    text = record["conversations"][-1]["value"]
    record["conversations"][-1]["value"] = text.replace('"value": ', '"value": "', 1).replace(', "from_unit"',
                                                                                              '", "from_unit"', 1)
    assert len(filtered(tmp_path, [record])[0]) == 1  # the declared schema has no types
    assert only_reject(tmp_path, record, tools=DEMO_SCHEMAS).kind == "invalid_arguments"


def test_duplicates_keep_the_first(tmp_path):
    spaced = variant(lambda r: r["conversations"][3].update(value="Oslo  on 2025-01-05:\nsunny, 0°C. "))
    reordered = variant(set_call({"date": "2025-01-05", "city": "Oslo"}))
    different = variant(lambda r: r["conversations"][3].update(value="Oslo: sunny."))
    kept, rejects, report = filtered(tmp_path, [GOOD, spaced, reordered, different])
    assert kept == [GOOD, different]
    assert [e.kind for e in rejects] == ["duplicate", "duplicate"]
    assert f"duplicate of {tmp_path / 'in.jsonl'}:1" in str(rejects[0])
    assert report.rejected == {"duplicate": 2}


def test_a_rejected_record_does_not_claim_its_key(tmp_path):
    kept, rejects, _ = filtered(tmp_path, [variant(reward=False), GOOD])
    assert kept == [GOOD] and [e.kind for e in rejects] == ["failed"]


def test_length_caps(tmp_path, tiny_tokenizer):
    text = get_template("qwen").render_text(next(iter(read_file(write(tmp_path / "one.jsonl", [GOOD])))))
    n_tokens = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(filtered(tmp_path, [GOOD], max_chars=len(text))[0]) == 1
    err = only_reject(tmp_path, GOOD, max_chars=len(text) - 1)
    assert err.kind == "too_long" and f"{len(text)} characters" in str(err)
    assert len(filtered(tmp_path, [GOOD], max_tokens=n_tokens, tokenizer=tiny_tokenizer)[0]) == 1
    err = only_reject(tmp_path, GOOD, max_tokens=n_tokens - 1, tokenizer=tiny_tokenizer)
    assert err.kind == "too_long" and f"{n_tokens} tokens" in str(err)
    react = get_template("react").render_text(next(iter(read_file(tmp_path / "one.jsonl"))))
    assert len(filtered(tmp_path, [GOOD], max_chars=len(react), template="react")[0]) == 1
    with pytest.raises(ValueError, match="max_tokens needs a tokenizer"):
        filtered(tmp_path, [GOOD], max_tokens=10)


def test_rejects_file_and_report(tmp_path, capsys):
    path = write(tmp_path / "mixed.jsonl", [GOOD, variant(reward=False), "{oops", variant(reward=True)])
    out, rejects, report = tmp_path / "o" / "kept.jsonl", tmp_path / "o" / "rejects.jsonl", tmp_path / "o" / "r.json"
    assert main([str(path), "--out", str(out), "--rejects", str(rejects), "--report", str(report)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [GOOD]
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["origin"], r["kind"]) for r in lines] == [(f"{path}:2", "failed"), (f"{path}:3", "invalid_json"),
                                                         (f"{path}:4", "duplicate")]
    assert all(r["reason"].startswith(r["origin"] + ": ") for r in lines)
    assert json.loads(report.read_text()) == {"records": {str(path): 4}, "kept": 1, "rejected": {
        "duplicate": 1, "failed": 1, "invalid_json": 1}, "checked_calls": 2, "unchecked_calls": 0}
    printed = capsys.readouterr().out
    assert "kept 1" in printed and "rejected 3" in printed and "invalid_json" in printed


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
    path = write(tmp_path / "in.jsonl", [variant(reward=False)])
    assert main([str(path), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "no record passed the filter" in capsys.readouterr().err
    assert main([str(path), "--out", str(tmp_path / "o.jsonl"), "--tools", "no.such.module"]) == 2
    assert "cannot be imported" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")  # an output under a file: its directory cannot be made
    for flag in ("--out", "--rejects", "--report"):
        args = {"--out": str(tmp_path / "o.jsonl"), flag: str(tmp_path / "a-file" / "x.jsonl")}
        assert main([str(path), *[item for pair in args.items() for item in pair]]) == 2
        assert capsys.readouterr().err == (f"error: {flag} {tmp_path / 'a-file' / 'x.jsonl'}: cannot make its directory "
                                           f"{tmp_path / 'a-file'} (File exists)\n")


# ----------------------------------------------------------------------------- synthetic trajectories


def test_synthetic_trajectories_lose_exactly_the_failed(tmp_path):
    synth.generate(tmp_path, seed=3, train=60, heldout=36, general=20, general_heldout=16, failed=24)
    cfg = FilterConfig(tools=DEMO_SCHEMAS)
    report = run([tmp_path / "trajectories.jsonl"], tmp_path / "kept.jsonl", cfg, tmp_path / "rejects.jsonl")
    assert report.kept == 60 and report.rejected == {"failed": 24} and report.unchecked_calls == 0
    kept_ids = sorted(json.loads(line)["meta"]["id"] for line in (tmp_path / "kept.jsonl").read_text().splitlines())
    train_ids = sorted(json.loads(line)["meta"]["id"]
                       for line in (tmp_path / "agent_train.sharegpt.jsonl").read_text().splitlines())
    assert kept_ids == train_ids
    # Without their reward, half the failures still break a check: no final answer, or
    # arguments the schema refuses (wrong-tool and wrong-answer attempts look well formed).
    records = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    failed = [{k: v for k, v in r.items() if k != "reward"} for r in records if r["reward"] is False]
    report = run([write(tmp_path / "failed.jsonl", failed)], tmp_path / "f.jsonl",
                 FilterConfig(tools=DEMO_SCHEMAS, require_reward=False))
    assert report.rejected == {"no_final_answer": 6, "invalid_arguments": 6} and report.kept == 12
    # both training formats pass every check, arguments validated against the real tools
    report = run([tmp_path / "agent_train.sharegpt.jsonl", tmp_path / "agent_train.ms_agent.jsonl"],
                 tmp_path / "train.jsonl", FilterConfig(tools=DEMO_SCHEMAS, require_reward=False))
    assert report.kept == 120 and not report.rejected and report.checked_calls > 100


# ----------------------------------------------------------------------------- FireAct (real corpus)

needs_corpora = pytest.mark.skipif(not FIREACT.is_file(), reason=f"shared corpora not found at {CORPORA}")


@pytest.fixture(scope="module")
def fireact_kept(tmp_path_factory):
    out = tmp_path_factory.mktemp("fireact")
    report = run([FIREACT], out / "kept.jsonl", FilterConfig(), out / "rejects.jsonl")
    return report, out / "kept.jsonl", out / "rejects.jsonl"


@needs_corpora
def test_fireact_keeps_exactly_the_successful(fireact_kept):
    report, kept, rejects = fireact_kept
    source = json.loads(FIREACT.read_text())
    successful = {key for key, r in source.items() if r["reward"] is True}
    assert len(successful) == 131
    assert report.kept == 131 and report.rejected == {"failed": 369}
    assert report.checked_calls == 0 and report.unchecked_calls > 131  # FireAct actions have no schemas
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    assert {r["meta"]["origin"].rsplit("#", 1)[1] for r in records} == successful
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert {r["origin"].rsplit("#", 1)[1] for r in rejected} == set(source) - successful


@needs_corpora
def test_fireact_tool_names_reject_the_reflect_calls(tmp_path):
    """FireAct's environment answered `reflect[...]` with "Unknown tool name"; naming the
    action space drops the three successful trajectories that tried it."""
    report = FilterReport()
    items = list(filter_records([FIREACT], FilterConfig(tool_names=("search", "lookup", "finish")), report))
    unknown = [e for e in items if isinstance(e, DataError) and e.kind == "unknown_tool"]
    assert report.kept == 128 and len(unknown) == 3 and all("`reflect`" in str(e) for e in unknown)


@needs_corpora
@pytest.mark.parametrize("template", ["react", "qwen"])
def test_fireact_output_reads_back_with_observations_masked(fireact_kept, template, tiny_tokenizer):
    _, kept, _ = fireact_kept
    items = list(read_file(kept))
    assert len(items) == 131 and not [e for e in items if isinstance(e, DataError)]
    tmpl = get_template(template)
    sup = SupervisionConfig(max_length=100_000)
    for conv in items:
        roles = [m.role for m in conv.messages]
        assert roles[0] == "user" and "tool" in roles and roles[-1] == "assistant"
        assert [c.name for c in conv.messages[-1].tool_calls] == ["finish"]
        assert not any("Episode finished" in m.content for m in conv.messages)
        segments = tmpl.render(conv)
        enc = encode(conv, tiny_tokenizer, tmpl, sup)
        text = "".join(s.text for s in segments)
        offsets = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        pos, observation_weights, call_weights = 0, [], []
        for seg in segments:
            lo, hi = pos, pos + len(seg.text)
            weights = [w for (a, b), w in zip(offsets, enc.weights) if a < hi and b > lo]
            if seg.kind == "observation":
                observation_weights += weights
            if seg.kind in ("action", "tool_call"):
                call_weights += weights
            pos = hi
        assert observation_weights and all(w == 0 for w in observation_weights), conv.origin
        assert call_weights and all(w > 0 for w in call_weights), conv.origin
