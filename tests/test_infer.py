"""infer.py end to end with real models: the tiny model is trained (real train.py loop) until it
has memorized three conversations (a calculator call, two parallel calls, a greeting), once with
the qwen template and a LoRA adapter, once with the react template and full fine-tuning. Greedy
decoding then reproduces them exactly, so every mode can be checked against known answers:
predict (metrics and the before/after table), chat through stdin, agent against the real
calculator, and serve through the official ``openai`` client."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from agenttune.data.readers import read_file
from agenttune.data.templates import react_system_prompt
from agenttune.demo_tools import TOOLS as DEMO_TOOLS
from test_train_support import ROOT, compose, env, load_train_module

INFER_PY = ROOT / "infer.py"
CALCULATOR = next(t for t in DEMO_TOOLS if t.name == "calculator")
TOOLS_MODULE = "infer_test_tools"  # the calculator alone, so prompts match the memorized ones


def _call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def memorized_records() -> list[dict]:
    tools = [{"type": "function", "function": CALCULATOR.schema}]
    return [
        {"tools": tools, "messages": [
            {"role": "user", "content": "What is 12*7?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("calculator", {"expression": "12*7"})]},
            {"role": "tool", "content": CALCULATOR({"expression": "12*7"})},
            {"role": "assistant", "content": "12*7 = 84."}]},
        {"tools": tools, "messages": [
            {"role": "user", "content": "What are 3+4 and 5+6?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("calculator", {"expression": "3+4"}),
                                                                _call("calculator", {"expression": "5+6"})]},
            {"role": "tool", "content": CALCULATOR({"expression": "3+4"})},
            {"role": "tool", "content": CALCULATOR({"expression": "5+6"})},
            {"role": "assistant", "content": "3+4 = 7 and 5+6 = 11."}]},
        {"messages": [{"role": "user", "content": "Say hello."},
                      {"role": "assistant", "content": "Hello! How can I help?"}]},
    ]


RUNS = {
    # LoRA on the tiny random model must adapt the embeddings too to memorize quickly.
    "qwen": ["tuner=lora", "tuner.r=16", "tuner.dropout=0", "tuner.include_embeddings=true", "train.lr=1e-2"],
    "react": ["tuner=full", "train.lr=5e-3"],
}
STEPS = 80


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data = root / "memorized.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in memorized_records()))
    (root / f"{TOOLS_MODULE}.py").write_text(
        "from agenttune.demo_tools import TOOLS as _ALL\nTOOLS = [t for t in _ALL if t.name == 'calculator']\n")
    module = load_train_module()
    runs = {}
    for template, tuner in RUNS.items():
        out = root / f"run-{template}"
        module.train(compose([
            "model=tiny", "hardware=cpu", "wandb.mode=disabled", f"model.template={template}", *tuner,
            f"data.datasets=[{{path:{data},format:openai,source:agent}}]", "data.eval_ratio=0", "data.cache=false",
            f"train.max_steps={STEPS}", "train.global_batch_size=3", "train.micro_batch_size=3",
            "train.warmup_ratio=0", f"train.save_steps={STEPS}", f"output_dir={out}",
        ]))
        runs[template] = out
    return {"root": root, "data": data, **runs}


def infer_env(workspace) -> dict:
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(workspace["root"]), e["PYTHONPATH"]])
    return e


def run_infer(workspace, args: list[str], stdin: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INFER_PY), *args], input=stdin, capture_output=True, text=True,
                          env=infer_env(workspace), cwd=workspace["root"], timeout=timeout)


# ----------------------------------------------------------------------------- predict


def predict_with_baseline(workspace, run: str, out: Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """infer.py mode=predict predict.baseline=true on a run's final/: (process, after, before)."""
    result = run_infer(workspace, ["mode=predict", f"adapter={workspace[run]}/final",
                                   f"predict.input=[{workspace['data']}]", f"predict.output_dir={out}",
                                   "predict.baseline=true", "generation.max_new_tokens=96"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result, *(json.loads((out / name).read_text()) for name in ("metrics.json", "metrics_base.json"))


def test_predict_scores_the_memorized_run_and_prints_before_after(workspace):
    out = workspace["root"] / "pred"
    result, after, before = predict_with_baseline(workspace, "qwen", out)
    assert after["steps"] == {"call": 2, "final": 2, "general": 1} and after["records"] == 3
    for name in ("format_validity", "tool_name_accuracy", "argument_exact_match", "argument_kv_f1",
                 "final_answer_exact_match", "final_answer_rouge_l", "general_rouge_l"):
        assert after[name] == 1.0, (name, after)
    # Without its adapter the random tiny model gets none of it right.
    assert before["tool_name_accuracy"] == 0.0 and before["final_answer_exact_match"] == 0.0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    parallel = next(r for r in rows if r["kind"] == "call" and len(r["reference"]["tool_calls"]) == 2)
    assert parallel["prediction"]["tool_calls"] == parallel["reference"]["tool_calls"]
    table = result.stdout[result.stdout.index("metric"):]
    assert "before" in table and "after" in table and "+1.000" in table


def test_predict_loads_a_checkpoint_and_compares_with_an_earlier_run(workspace):
    out = workspace["root"] / "pred-ckpt"
    result = run_infer(workspace, ["mode=predict", f"adapter={workspace['react']}/checkpoints/step-{STEPS}",
                                   f"predict.input=[{workspace['data']}]", f"predict.output_dir={out}",
                                   f"predict.compare={workspace['root'] / 'pred'}", "generation.max_new_tokens=96"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["template"] == "react" and metrics["argument_exact_match"] == 1.0
    assert metrics["final_answer_exact_match"] == 1.0 and "change" in result.stdout


def test_predict_baseline_of_a_full_fine_tune_loads_the_base_it_started_from(workspace):
    out = workspace["root"] / "pred-full"
    _, after, before = predict_with_baseline(workspace, "react", out)
    assert after["argument_exact_match"] == 1.0 and after["final_answer_exact_match"] == 1.0
    # the random tiny model the run started from, not the tuned weights again
    assert before["argument_exact_match"] == 0.0 and before["final_answer_exact_match"] == 0.0
    assert before["model"] == "tiny, the base of run-react/final" and before["template"] == "react"
    result = run_infer(workspace, ["mode=predict", "model=tiny", f"predict.input=[{workspace['data']}]",
                                   f"predict.output_dir={out}", "predict.baseline=true"])
    assert result.returncode == 1 and "predict.baseline: needs adapter=" in result.stderr


@pytest.mark.parametrize("run", ["qwen", "react"])
def test_model_dtype_applies_to_a_run_and_its_base(workspace, run):
    """adapter= takes the model from the run's config; model.dtype= on the command line still sets
    the weights' dtype (the run's auto would load float32 on a CPU), for the base of a full run too."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from agenttune.inference.loading import load_for_inference, load_run_base

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for dtype, expected in (("bfloat16", torch.bfloat16), ("auto", torch.float32)):
            cfg = OmegaConf.to_object(hydra_compose("infer", overrides=[
                "mode=chat", f"adapter={workspace[run]}/final", f"model.dtype={dtype}"]))
            assert next(load_for_inference(cfg).model.parameters()).dtype == expected
            assert next(load_run_base(cfg, "qwen").model.parameters()).dtype == expected


@pytest.mark.parametrize(("trained", "cpu_bf16_faster", "expected"), [
    ("bf16", True, "bfloat16"),   # the precision its matmuls trained in, where this CPU runs it fast
    ("bf16", False, "auto"),      # float32 on this CPU: bf16 would be slower here
    ("no", True, "auto"),         # trained in float32: stays float32
])
def test_auto_dtype_follows_the_runs_autocast_where_the_cpu_is_fast(tmp_path, monkeypatch, trained, cpu_bf16_faster,
                                                                  expected):
    from agenttune import cpu
    from agenttune.config import ModelConfig
    from agenttune.inference.config import InferConfig
    from agenttune.inference.loading import with_asked_dtype

    run_config = tmp_path / "config.yaml"
    run_config.write_text(f"hardware:\n  mixed_precision: {trained}\n")
    monkeypatch.setattr(cpu, "bf16_is_faster", lambda: (cpu_bf16_faster, {"bf16": 2.0, "fp32": 1.0}))
    monkeypatch.setattr("agenttune.inference.loading.bf16_is_faster", cpu.bf16_is_faster)
    run_model = ModelConfig(name="m", path="tiny")
    assert with_asked_dtype(run_model, InferConfig(device="cpu"), run_config).dtype == expected
    asked = InferConfig(device="cpu", model=ModelConfig(dtype="float32"))
    assert with_asked_dtype(run_model, asked, run_config).dtype == "float32"  # model.dtype= always wins


def test_predictions_that_cannot_be_written_are_one_message_after_the_metrics(workspace):
    """The kernel refuses writes past 1 KB (RLIMIT_FSIZE, as a full disk refuses any); the
    predictions file is larger. The scores were printed before the write, so they are not lost."""
    out = workspace["root"] / "pred-no-room"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # noqa: E731
    result = subprocess.run([sys.executable, str(INFER_PY), "mode=predict", f"adapter={workspace['qwen']}/final",
                             f"predict.input=[{workspace['data']}]", f"predict.output_dir={out}",
                             "generation.max_new_tokens=96"], capture_output=True, text=True,
                            env=infer_env(workspace), cwd=workspace["root"], timeout=180, preexec_fn=limit)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert json.loads(result.stdout[result.stdout.index("{"):])["argument_exact_match"] == 1.0
    assert result.stderr.splitlines()[-1].startswith(
        f"infer.py: error: could not write the predictions to {out}: [Errno 27] File too large")
    assert "set predict.output_dir to another disk" in result.stderr


def test_predict_names_bad_eval_records(workspace):
    bad = workspace["root"] / "bad.jsonl"
    bad.write_text(json.dumps(memorized_records()[2]) + "\n" + '{"messages": [{"role": "wizard", "content": "x"}]}\n')
    result = run_infer(workspace, ["mode=predict", f"predict.input=[{bad}]"])
    assert result.returncode == 1
    assert f"{bad}:2: unknown role `wizard`" in result.stderr and "Traceback" not in result.stderr


def test_bad_infer_config_names_the_key(workspace):
    result = run_infer(workspace, ["mode=bogus"])
    assert result.returncode == 1 and "mode: 'bogus' is not one of chat, agent, predict, serve" in result.stderr
    result = run_infer(workspace, ["adapter=/no/such/run/final"])
    assert result.returncode == 1 and "adapter=/no/such/run/final: no such directory" in result.stderr


# ----------------------------------------------------------------------------- chat and agent


def test_chat_through_stdin_with_a_manual_observation(workspace):
    stdin = "\n".join([
        "/tools on",
        "What is 12*7?",
        '{"result": 84}',  # typed by the user when the model stops at its tool call
        "/tools off",
        "/multi", "Say hello.", "/end",
        "/exit",
    ]) + "\n"
    result = run_infer(workspace, [f"adapter={workspace['qwen']}/final", f"agent.tools=[{TOOLS_MODULE}]",
                                   "generation.max_new_tokens=96"], stdin=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>' in out
    assert 'observation for calculator({"expression": "12*7"})> ' in out
    assert "assistant> 12*7 = 84.\n" in out  # generated after the typed observation
    assert "assistant> Hello! How can I help?\n" in out  # the multi-line entry, after /tools off


def test_agent_mode_calls_the_real_tool_and_saves_a_training_record(workspace):
    saved = workspace["root"] / "trajectories.jsonl"
    result = run_infer(workspace, ["mode=agent", f"adapter={workspace['react']}/final",
                                   f"agent.tools=[{TOOLS_MODULE}]", "agent.query='What is 12*7?'",
                                   f"agent.save={saved}", "generation.max_new_tokens=96"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert '[call] calculator({"expression": "12*7"})' in result.stdout
    assert '[observation] {"result": 84}' in result.stdout and "[answer] 12*7 = 84." in result.stdout
    record = json.loads(saved.read_text())
    assert record["reward"] is True
    (conv,) = list(read_file(saved))  # a valid training record in the OpenAI format
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.messages[1].tool_calls[0].args() == {"expression": "12*7"}


# ----------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_on_a_port_in_use_stops_before_loading_the_model(workspace):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_infer(workspace, ["mode=serve", f"adapter={workspace['react']}/final", f"port={port}"], timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"infer.py: error: port: cannot listen on 127.0.0.1:{port} "
                                              "(Address already in use); choose another port= (or host=)")
    assert "loaded" not in result.stdout + result.stderr, "the port is checked before the model loads"


@pytest.fixture(scope="module")
def server(workspace):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(INFER_PY), "mode=serve", f"adapter={workspace['react']}/final",
                             f"port={port}", "served_name=tiny-react", "generation.max_new_tokens=96",
                             "max_queue=8"],
                            env=infer_env(workspace), cwd=workspace["root"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("the server did not come up in 120 s")
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    import openai  # a dev requirement: the client users call the server with

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0)


HELLO = [{"role": "user", "content": "Say hello."}]
CALC_TOOLS = [{"type": "function", "function": CALCULATOR.schema}]


def test_serve_lists_the_model_and_answers(client):
    assert [m.id for m in client.models.list().data] == ["tiny-react"]
    response = client.chat.completions.create(model="tiny-react", messages=HELLO, temperature=0, seed=1)
    assert response.choices[0].message.content == "Hello! How can I help?"
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens > 0


def test_serve_streams_the_same_text(client):
    chunks = list(client.chat.completions.create(model="tiny-react", messages=HELLO, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Hello! How can I help?" and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_serve_stops_at_observation_like_ms_swift_deploy(client):
    # A ReAct client writes the tool list into the system prompt itself and reads the Action.
    messages = [{"role": "system", "content": react_system_prompt("", [CALCULATOR.schema])},
                {"role": "user", "content": "What is 12*7?"}]
    response = client.chat.completions.create(model="tiny-react", messages=messages, stop=["Observation:"])
    content = response.choices[0].message.content
    assert "Action: calculator\nAction Input: " in content and "Observation" not in content
    assert response.choices[0].finish_reason == "stop"


def test_serve_returns_tool_calls_and_continues_after_the_result(client):
    ask = [{"role": "user", "content": "What is 12*7?"}]
    first = client.chat.completions.create(model="tiny-react", messages=ask, tools=CALC_TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "12*7"}
    follow = ask + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": CALCULATOR({"expression": "12*7"})}]
    second = client.chat.completions.create(model="tiny-react", messages=follow, tools=CALC_TOOLS)
    assert second.choices[0].message.content == "12*7 = 84." and second.choices[0].finish_reason == "stop"
    # Parallel calls, streamed: sent whole at the end, in order.
    chunks = list(client.chat.completions.create(
        model="tiny-react", messages=[{"role": "user", "content": "What are 3+4 and 5+6?"}], tools=CALC_TOOLS,
        stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [json.loads(c.function.arguments) for c in calls] == [{"expression": "3+4"}, {"expression": "5+6"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("kwargs,needle", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role `wizard`"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "follows no assistant tool call"),
    ({"messages": []}, "messages"),
    ({"messages": HELLO, "temperature": 5}, "temperature"),
    ({"messages": HELLO, "n": 2}, "n:"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop takes up to 4"),
])
def test_serve_rejects_bad_requests_with_400(client, kwargs, needle):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-react", **kwargs)
    assert info.value.status_code == 400 and needle in info.value.message


def test_serve_queues_concurrent_requests(client):
    answers, errors = [], []

    def ask():
        try:
            answers.append(client.chat.completions.create(model="tiny-react", messages=HELLO).choices[0].message.content)
        except Exception as err:  # collected, so the assertion below shows it
            errors.append(err)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and answers == ["Hello! How can I help?"] * 6
