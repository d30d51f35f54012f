"""Prompt files for generate.py: JSONL rows of `messages` (the chat format of data/README.md), each ending with a
user turn, checked row by row before any weights load; and the rendered, tokenised prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning_moe.config.schema import ConfigError
from lightning_moe.data.chat import assistant_spans, tokens_and_trained_mask
from lightning_moe.data.collate import IGNORE_INDEX, routing_units
from lightning_moe.data.formats import BadRow, jsonl_records

ROLES = ("system", "user", "assistant")


class PromptError(ConfigError):
    """A prompt file or row that cannot be generated from; the message names the file and row."""


def check_messages(messages, where: str, prompt: bool = True) -> list[dict]:
    """The turns of a conversation, checked; `prompt`: it must end with the user's turn (generate.py's rows)."""
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise PromptError(f"{where}: turn {i} must be {{role: {'|'.join(ROLES)}, content: str}}, got {turn!r:.80}")
        if turn["role"] == "system" and i:
            raise PromptError(f"{where}: turn {i} is a system turn; only the first turn may be")
    if prompt and messages[-1]["role"] != "user":
        raise PromptError(f"{where}: the last turn is {messages[-1]['role']!r}; a prompt ends with the user's turn")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def read_prompts(path: str | Path) -> list[dict]:
    """Every row of a JSONL prompt file (kept whole: generate.py writes each back with its reply), checked."""
    file = Path(path)
    if not file.is_file():
        raise PromptError(f"prompts: {path}: file not found")
    rows = []
    for n, row in jsonl_records(file.read_bytes()):  # the training data's line reader: blank lines, UTF-8, JSON
        if isinstance(row, BadRow):
            raise PromptError(f"{path}: row {n}: {row}")
        if not isinstance(row, dict):
            raise PromptError(f"{path}: row {n}: not a JSON object")
        row["messages"] = check_messages(row.get("messages"), f"{path}: row {n}")
        rows.append(row | {"_row": n})  # the line number, for messages that come later (dropped on output)
    if not rows:
        raise PromptError(f"prompts: {path} holds no rows")
    return rows


@dataclass
class Prompt:
    """A rendered prompt: its token ids, and its routing units as training forms them (the reply is the last)."""

    ids: list[int]
    units: list[int]  # the routing unit of each prompt token
    spans: list[tuple[int, int]]  # each unit's pooled [start, end)
    final_unit: int  # the unit of the reply


def render_prompt(tokenizer, messages: list[dict], level: str, pooling: str) -> Prompt:
    """The prompt with the generation prompt (the assistant header) appended. Earlier assistant turns are marked as
    training marks them, and the reply is one more assistant turn starting right after the prompt, so
    lightning_moe.data.collate.routing_units gives the prompt's tokens the units and pooled spans training would."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    history = assistant_spans(tokenizer, messages)[1] if any(m["role"] == "assistant" for m in messages) else []
    ids, trained = tokens_and_trained_mask(tokenizer, text, history)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, trained)] + [0]  # + the reply's first token
    units, spans = routing_units(labels, level, pooling)
    return Prompt(ids, units[:-1], spans, units[-1])


def routing_of(sections) -> tuple[str, str]:
    """(routing level, pooling) the run routes prompts by; without MoE, token level (nothing to decide)."""
    moe = sections.moe
    return (moe.routing_level, moe.pooling) if moe.enabled else ("token", "mean")


def checked_prompt(tokenizer, messages: list[dict], routing: tuple[str, str], context_length: int | None,
                   max_new_tokens: int, where: str = "prompt") -> Prompt:
    """render_prompt, refusing a prompt that leaves no room for max_new_tokens in the model's context."""
    prompt = render_prompt(tokenizer, messages, *routing)
    if context_length and len(prompt.ids) + max_new_tokens > context_length:
        raise PromptError(f"{where}: {len(prompt.ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                          f"model's context of {context_length} tokens; shorten the conversation or lower "
                          "max_new_tokens")
    return prompt
