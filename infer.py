"""Talk to a tuned agent: chat with it, let it call real tools, score it on an eval file,
or serve it behind an OpenAI-compatible API.

    python infer.py adapter=outputs/demo/RUN/final                          # mode=chat: REPL on stdin
    python infer.py mode=agent adapter=RUN/final "agent.query='Weather in Oslo on 2025-05-02?'"
    python infer.py mode=agent adapter=RUN/final agent.tools=[agenttune.demo_tools,my_pkg.tools]
    python infer.py mode=predict adapter=RUN/final predict.input=[eval.jsonl] predict.baseline=true
    python infer.py mode=serve model.path=merged/a port=8000                # then: openai.OpenAI(base_url=...)

Loading: adapter= (a run's final/ or checkpoints/step-N; base and template from its config), or
model=/model.path= for a base or merged model. The schema is agenttune/inference/config.py.
Reading order: load -> one function per mode -> exit status (1 for errors the user can fix).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agenttune.config import ConfigError
from agenttune.data.schema import to_openai_record
from agenttune.inference.agent import Event, new_conversation, run_agent
from agenttune.inference.chat import run_chat
from agenttune.inference.config import InferConfig
from agenttune.inference.generate import Generator
from agenttune.inference.loading import LoadError, load_for_inference, load_run_base
from agenttune.inference.metrics import comparison_table
from agenttune.inference.predict import EvalDataError, load_eval, predict, read_metrics, write_predictions
from agenttune.storage import SaveError
from agenttune.tools import ToolError, load_tools

log = logging.getLogger("infer")


def chat(cfg: InferConfig, generator: Generator) -> int:
    return run_chat(generator, cfg.system, load_tools(cfg.agent.tools), sys.stdin, sys.stdout)


def agent(cfg: InferConfig, generator: Generator) -> int:
    tools = load_tools(cfg.agent.tools)
    if cfg.agent.offer is not None:
        unknown = sorted(set(cfg.agent.offer) - set(tools))
        if unknown:
            raise ConfigError(f"agent.offer: no tool named {', '.join(unknown)} in {cfg.agent.tools}")
        tools = {name: tools[name] for name in cfg.agent.offer}
    questions = [cfg.agent.query] if cfg.agent.query else (line.strip() for line in sys.stdin if line.strip())
    labels = {"assistant": "thought", "call": "call", "observation": "observation", "error": "error", "final": "answer"}

    def show(event: Event) -> None:
        print(f"  [{labels[event.kind]}] {event.text}", flush=True)

    for question in questions:
        print(f"question: {question}", flush=True)
        result = run_agent(lambda conv: generator.reply(conv).text, new_conversation(question, tools, cfg.system),
                           tools, generator.template.name, cfg.agent.max_turns, show)
        if result.stopped == "max_turns":
            print(f"  [stopped] no final answer after {cfg.agent.max_turns} turns (agent.max_turns)", flush=True)
        if cfg.agent.save:
            record = to_openai_record(result.conversation)
            # reward: a final answer with no error observation, so the filter can keep the good runs
            record["reward"] = result.stopped == "final" and not any(e.kind == "error" for e in result.events)
            with open(cfg.agent.save, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


def predict_mode(cfg: InferConfig, generator: Generator, has_adapter: bool, name: str) -> int:
    convs = load_eval(cfg.predict)
    out = Path(cfg.predict.output_dir)
    rows, metrics = predict(generator, convs, cfg.predict.batch_size, label=name)
    metrics.update(model=name, template=generator.template.name, inputs=list(cfg.predict.input))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("inputs",)}, indent=1))  # before a write can fail
    write_predictions(out, rows, metrics)
    before = base_rows = None
    if cfg.predict.baseline:
        if has_adapter:
            with generator.model.disable_adapter():
                base_rows, before = predict(generator, convs, cfg.predict.batch_size, label="base")
            base_name = f"{name} without adapter"
        elif cfg.adapter:  # tuner=full: the run's base model, loaded beside the tuned one
            base = load_run_base(cfg, generator.template.name)
            base_generator = Generator(base.model, base.tokenizer, base.template, cfg.generation)
            base_rows, before = predict(base_generator, convs, cfg.predict.batch_size, label="base")
            base_name = f"{base.name}, the base of {name}"
        else:
            raise ConfigError("predict.baseline: needs adapter= (a run's final/ or checkpoints/step-N): "
                              "the base is the model that run started from")
        before.update(model=base_name, template=generator.template.name)
    elif cfg.predict.compare:
        before = read_metrics(cfg.predict.compare)
    if before is not None:
        print(comparison_table(before, metrics, "before", "after"))
    if base_rows is not None:
        write_predictions(out, base_rows, before, suffix="_base")
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """Take host:port before the model loads (a minute for a 7B), so a port in use is one message
    at once, and no other process can take it while the model loads."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not past a live listener: only TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"port: cannot listen on {host}:{port} ({e.strerror or e}); choose another port= "
                          "(or host=)") from None
    return sock


def serve(cfg: InferConfig, generator: Generator, name: str, sock: socket.socket) -> int:
    import uvicorn

    from agenttune.inference.serve import build_app

    app = build_app(generator, cfg.served_name or name, cfg.max_queue)
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info")).run(sockets=[sock])
    return 0


def run(cfg: InferConfig) -> int:
    sock = listen_socket(cfg.host, cfg.port) if cfg.mode == "serve" else None
    loaded = load_for_inference(cfg)
    generator = Generator(loaded.model, loaded.tokenizer, loaded.template, cfg.generation)
    if cfg.mode == "chat":
        return chat(cfg, generator)
    if cfg.mode == "agent":
        return agent(cfg, generator)
    if cfg.mode == "predict":
        return predict_mode(cfg, generator, loaded.has_adapter, loaded.name)
    return serve(cfg, generator, loaded.name, sock)


def to_infer_config(dcfg: DictConfig) -> InferConfig:
    try:
        return OmegaConf.to_object(dcfg)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None


@hydra.main(config_path="conf", config_name="infer", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        code = run(to_infer_config(dcfg))
    except (ConfigError, LoadError, ToolError, FileNotFoundError, EvalDataError, SaveError) as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
