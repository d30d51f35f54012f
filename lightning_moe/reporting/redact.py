"""Keep secrets out of everything a run writes or uploads: config.yaml, Hydra's .hydra/ files, the hyperparameters
in checkpoints and sent to loggers, summary.json, log lines.

A value is masked when its key is named like a secret, when it equals (or contains) the value of a secret
environment variable, or when it looks like a known token format (Hugging Face, OpenAI, GitHub, AWS, wandb).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "LIGHTNING_API_KEY",
              "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN")
# a key named like a secret: token, hf_token, api_key, wandb_api_key, secret, password (not tokenizer, num_tokens)
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd)$", re.IGNORECASE)
MASK = "***"
# token formats, by their documented prefixes and lengths
TOKEN_PATTERNS = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|AKIA[0-9A-Z]{16}|wandb_[A-Za-z0-9_]{30,}|lit_[A-Za-z0-9]{20,})\b")  # not bare hex: commit ids look alike


def secret_values() -> list[str]:
    return [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 6]


def redact_text(text: str) -> str:
    """A string with every secret value and token-shaped substring replaced by ***."""
    for value in secret_values():
        text = text.replace(value, MASK)
    return TOKEN_PATTERNS.sub(MASK, text)


def redact(obj):
    """A copy of a nested dict/list with secret-looking keys masked, and any string holding the value of a
    secret environment variable masked too (it can arrive through ${oc.env:...})."""
    values = secret_values()

    def walk(x, key=""):
        # any mapping or sequence: Hydra hands a logger's nested arguments over as DictConfig / ListConfig
        if isinstance(x, Mapping):
            return {k: (MASK if SECRET_KEY.search(str(k)) and v else walk(v, k)) for k, v in x.items()}
        if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
            return [walk(v) for v in x]
        if isinstance(x, str) and (any(v in x for v in values) or TOKEN_PATTERNS.search(x)):
            return MASK
        return x

    return walk(obj)


class RedactingFilter(logging.Filter):
    """Masks secrets in every log line before a handler writes it (the console, Hydra's <run_dir>/train.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def redact_logs() -> None:
    """Put a RedactingFilter on the root logger's handlers (call after Hydra configured logging)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
