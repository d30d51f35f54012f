"""Chat data: read JSON/JSONL conversations, render them with the tokenizer's chat template, collate."""

from lightning_moe.data.chat import ChatRenderer, TemplateError, assistant_spans
from lightning_moe.data.collate import ChatCollator, batch_num_examples, batch_num_tokens
from lightning_moe.data.formats import DataError, read_conversations

__all__ = [
    "ChatCollator",
    "ChatRenderer",
    "DataError",
    "TemplateError",
    "assistant_spans",
    "batch_num_examples",
    "batch_num_tokens",
    "read_conversations",
]
