"""Render a conversation with the tokenizer's chat template and mark the tokens the loss trains on.

The loss covers every assistant turn: its content and its turn terminator (e.g. `<|im_end|>`, `</s>`),
so the model learns to stop. Prompt tokens, the assistant header and whitespace after the terminator
are masked with -100.

Which characters belong to assistant turn i is read off the template itself: the render of
messages[:i] with the generation prompt ends where the turn starts, and the render of messages[:i+1]
ends where it stops. This works for any template that renders prefixes as prefixes (ChatML, Llama-3,
Gemma, Mistral's v7/tekken...), needs no `{% generation %}` tags, and is checked on every row; a
template that rewrites earlier turns raises TemplateError instead of producing a wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_moe.config.schema import ConfigError

IGNORE_INDEX = -100


class TemplateError(ConfigError):
    """The chat template cannot be used to build loss masks."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of each assistant turn."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise TemplateError(
                "the chat template does not render conversation prefixes as prefixes of the full conversation, "
                "so assistant turns cannot be located; pass a template that does with data.chat_template=FILE.jinja"
            )
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def tokens_and_trained_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it lies in an assistant span (is trained).
    The first token is never trained: nothing comes before it (and in a packed row it would see the previous
    conversation). Training and generation both locate turns this way."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask, s = [], 0
    for start, _ in enc["offset_mapping"]:
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        mask.append(s < len(spans) and spans[s][0] <= start < spans[s][1])
    if mask:
        mask[0] = False
    return enc["input_ids"], mask


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids that end an assistant turn: the template's terminator (the last trained token of a rendered
    assistant turn, e.g. <|im_end|> or </s>) and the tokenizer's eos. Generation stops at any of them."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, spans = assistant_spans(tokenizer, messages)
    ids, mask = tokens_and_trained_mask(tokenizer, text, spans)
    terminator = [i for i, m in zip(ids, mask) if m][-1:]
    return sorted({*terminator, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})


@dataclass
class ChatRenderer:
    """Conversation -> input_ids and labels (assistant tokens only), truncated or dropped past max_length."""

    tokenizer: object
    max_length: int
    overlong: str = "truncate"

    def __call__(self, messages: list[dict]) -> dict:
        text, spans = assistant_spans(self.tokenizer, messages)
        ids, trained = tokens_and_trained_mask(self.tokenizer, text, spans)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, trained)]
        overlong = len(ids) > self.max_length
        if overlong and self.overlong == "truncate":
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        n_target = sum(lab != IGNORE_INDEX for lab in labels)
        if overlong and self.overlong == "drop":
            dropped = "overlong"
        elif n_target == 0:  # e.g. truncation cut away every assistant token: nothing left to learn from
            dropped = "no_target_tokens"
        else:
            dropped = ""
        return {"input_ids": ids, "labels": labels, "overlong": overlong, "n_target": n_target, "dropped": dropped}
