"""Chat data: read JSON/JSONL conversations (formats.py), render them with the tokenizer's chat template and mark
the trained tokens (chat.py), collate padded or packed micro-batches (collate.py), the DataModule (datamodule.py),
and the converters of third-party datasets into the chat format (converters/)."""

from lightning_moe.data.collate import batch_num_examples, batch_num_tokens

__all__ = ["batch_num_examples", "batch_num_tokens"]
