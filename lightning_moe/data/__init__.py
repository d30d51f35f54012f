"""Chat data: read JSON/JSONL conversations (formats.py), render them with the tokenizer's chat template and mark
the trained tokens (chat.py), collate padded or packed micro-batches (collate.py), the DataModule (datamodule.py),
and the converters of third-party datasets into the chat format (converters/, which import neither torch nor
transformers: this file imports nothing, so `scripts/convert_*.py` start without them)."""


def __getattr__(name: str):
    # Runs saved before the callbacks named lightning_moe.data.collate.* hold lightning_moe.data.batch_num_examples
    # and .batch_num_tokens in their config.yaml: still found, imported only when asked for
    if name in ("batch_num_examples", "batch_num_tokens"):
        from lightning_moe.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
