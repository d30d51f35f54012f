"""chat.py's loop: a multi-turn conversation in the terminal (or from piped stdin) with a trained run, each reply
streamed as it is generated, stopping at the end of the assistant turn, and followed by where it was routed."""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from transformers import TextStreamer

from lightning_moe.checkpointing.load import LoadPlan, load_trained
from lightning_moe.generation.batch import sampling_of, with_system
from lightning_moe.generation.generate import Generator, Reply
from lightning_moe.generation.prompts import PromptError

HELP = "/reset starts over, /system TEXT sets the system prompt, /exit (or Ctrl-D) ends"


def routing_line(reply: Reply) -> str:
    r = reply.routing
    if not r:
        return "[no MoE layers]"
    if "expert" not in r:
        return "[no routing to report: the reply ended at once]"
    where = f"{r['domain']} (expert {r['expert']})" if r.get("domain") else f"expert {r['expert']}"
    if r["level"] == "token":
        shares = ", ".join(f"{k}: {v['share']}" for k, v in r["layers"].items())
        return f"[routed per token, mostly to {where}; expert shares {shares}]"
    layers = ", ".join(f"{k}: {v['experts']}" for k, v in r["layers"].items())
    return f"[routed to {where} ({r['level']} level); {layers}]"


def chat(plan: LoadPlan, cfg: DictConfig, stdin=sys.stdin, stdout=sys.stdout) -> int:
    gen = Generator(load_trained(plan, cfg.device))
    interactive = stdin.isatty()
    system = cfg.system_prompt or plan.sections.data.system_prompt
    history: list[dict] = []
    print(f"chatting with {plan.run_dir} (step {plan.global_step}); {HELP}", file=stdout, flush=True)
    turns = 0
    while True:
        if interactive:
            print("\nyou> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input: a clean exit
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if text.startswith("/system"):
            system = text.removeprefix("/system").strip() or None
            history = []
            print(f"(system prompt: {system!r}; conversation reset)", file=stdout, flush=True)
            continue
        messages = with_system([*history, {"role": "user", "content": text}], system)
        try:
            prompt = gen.render(messages, cfg.max_new_tokens)
        except PromptError as e:
            print(f"({e}; /reset to start over)", file=stdout, flush=True)
            continue
        print("assistant> ", end="", file=stdout, flush=True)
        streamer = TextStreamer(gen.tok, skip_prompt=True, skip_special_tokens=True)
        reply = gen.generate([prompt], sampling_of(cfg), streamer=streamer)[0]
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        if reply.finish_reason == "length":
            print(f"(cut at max_new_tokens={cfg.max_new_tokens})", file=stdout)
        if cfg.show_routing:
            print(routing_line(reply), file=stdout, flush=True)
        turns += 1
    print(f"(end of conversation, {turns} replies)", file=stdout, flush=True)
    return turns
