"""chat.py's loop: a multi-turn conversation in the terminal (or from piped stdin) with a trained run, each reply
streamed as it is generated, stopping at the end of the assistant turn, and followed by where it was routed.

Ctrl-C while a reply streams stops that reply (what was said so far stays in the conversation); Ctrl-C or Ctrl-D at
the prompt ends the session cleanly. /save FILE keeps the conversation as one `{"messages": [...]}` JSONL row (the
format of generate.py's prompt files), /load FILE takes one back.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig
from transformers import StoppingCriteria, TextStreamer

from lightning_moe.checkpointing.load import LoadPlan, load_trained
from lightning_moe.checkpointing.outputs import check_output, write_file_atomic
from lightning_moe.config.schema import ConfigError
from lightning_moe.data.formats import BadRow, jsonl_records
from lightning_moe.generation.batch import sampling_of, with_system
from lightning_moe.generation.generate import Generator, Reply
from lightning_moe.generation.prompts import PromptError, check_messages
from lightning_moe.generation.terminal import ChatInput, Skipped, check_open

HELP = """commands:
  /help            this list
  /reset           start the conversation over
  /system TEXT     set the system prompt (and start over); /system alone removes it
  /save FILE       keep the conversation as a {"messages": [...]} JSONL row (generate.py's prompt format)
  /load FILE       continue the conversation in FILE's last row (one ending with your turn is answered)
  /exit            end (or Ctrl-D; Ctrl-C at the prompt)
a message of several lines: paste it, or type \"\"\" on a line, the lines, and \"\"\" again.
Ctrl-C while a reply streams stops the reply; the conversation goes on."""


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


class StopOnCtrlC(StoppingCriteria):
    """While a reply streams, Ctrl-C (SIGINT) ends generate() after the current token instead of raising inside it,
    so the model, the KV cache hook and the conversation stay as they were."""

    def __init__(self):
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.stopped

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopped", True))
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def load_conversation(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise PromptError(f"{path}: file not found")
    rows = [(n, r) for n, r in jsonl_records(file.read_bytes())]
    if not rows:
        raise PromptError(f"{path}: holds no rows")
    n, row = rows[-1]
    if isinstance(row, BadRow) or not isinstance(row, dict):
        raise PromptError(f"{path}: row {n}: {row if isinstance(row, BadRow) else 'not a JSON object'}")
    return check_messages(row.get("messages"), f"{path}: row {n}", prompt=False)


class Session:
    def __init__(self, gen: Generator, cfg: DictConfig, system: str | None, out):
        self.gen, self.cfg, self.system, self.out = gen, cfg, system, out
        self.history: list[dict] = []
        self.turns = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def command(self, text: str) -> bool:
        """Run a /command; False for /exit."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name == "/exit":
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.history = []
            self.say("(conversation reset)")
        elif name == "/system":
            self.system, self.history = arg or None, []
            self.say(f"(system prompt: {self.system!r}; conversation reset)")
        elif name in ("/save", "/load") and not arg:
            self.say(f"({name} needs a file: {name} FILE)")
        elif name == "/save":
            try:
                out = check_output(arg, key="/save")
                row = {"messages": with_system(self.history, self.system)}
                write_file_atomic(out, json.dumps(row, ensure_ascii=False) + "\n")
                self.say(f"(saved {len(self.history)} turns -> {out}; add a user turn to use it with generate.py)")
            except ConfigError as e:
                self.say(f"({e})")
        elif name == "/load":
            try:
                messages = load_conversation(arg)
            except ConfigError as e:
                self.say(f"({e})")
                return True
            if messages[0]["role"] == "system":
                self.system, messages = messages[0]["content"], messages[1:]
            pending = messages.pop()["content"] if messages and messages[-1]["role"] == "user" else None
            self.history = messages
            self.say(f"(loaded {len(messages)} turns from {arg}; system prompt: {self.system!r})")
            if pending is not None:
                self.reply(pending)
        else:
            self.say(f"(unknown command {name}; /help lists them)")
        return True

    def reply(self, text: str) -> None:
        with StopOnCtrlC() as ctrl_c:  # from here on, Ctrl-C stops this reply (an early one: before its first token)
            messages = with_system([*self.history, {"role": "user", "content": text}], self.system)
            try:
                prompt = self.gen.render(messages, self.cfg.max_new_tokens)
            except PromptError as e:
                self.say(f"({e}; /reset to start over)")
                return
            print("assistant> ", end="", file=self.out, flush=True)
            streamer = TextStreamer(self.gen.tok, skip_prompt=True, skip_special_tokens=True)
            reply = self.gen.generate([prompt], sampling_of(self.cfg), streamer=streamer, stopping_criteria=[ctrl_c])[0]
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        if ctrl_c.stopped:
            self.say("\n(stopped by Ctrl-C; what was said stays in the conversation)")
        elif reply.finish_reason == "length":
            self.say(f"(cut at max_new_tokens={self.cfg.max_new_tokens})")
        if self.cfg.show_routing:
            self.say(routing_line(reply))
        self.turns += 1


def chat(plan: LoadPlan, cfg: DictConfig, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    check_open(stdin)
    source = ChatInput(stdin, stdout)
    session = Session(Generator(load_trained(plan, cfg.device)), cfg, cfg.system_prompt or
                      plan.sections.data.system_prompt, stdout)
    session.say(f"chatting with {plan.run_dir} (step {plan.global_step}); /help lists the commands, /exit or Ctrl-D ends")
    while True:
        try:
            text = source.message("\nyou> " if source.interactive else "")
        except KeyboardInterrupt:  # Ctrl-C at the prompt: end cleanly
            text = None
        if text is None:
            if source.interactive:
                print(file=stdout)  # the shell's prompt starts on a fresh line
            break
        if isinstance(text, Skipped):
            session.say(text)
            continue
        if not text.strip():
            continue
        if text.strip().startswith("/") and text.strip().split()[0] in ("/exit", "/help", "/reset", "/system",
                                                                          "/save", "/load"):
            if not session.command(text.strip()):
                break
            continue
        session.reply(text.strip())
    session.say(f"(end of conversation, {session.turns} replies)")
    return session.turns
