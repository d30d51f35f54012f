"""Keep secrets out of what a run writes (config.yaml, hyperparameters sent to loggers, summary.json)."""

from __future__ import annotations

import os
import re

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "LIGHTNING_API_KEY",
              "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN")
# a key named like a secret: token, hf_token, api_key, wandb_api_key, secret, password (not tokenizer, num_tokens)
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd)$", re.IGNORECASE)
MASK = "***"


def redact(obj):
    """A copy of a nested dict/list with secret-looking keys masked, and any string holding the value of a
    secret environment variable masked too (it can arrive through ${oc.env:...})."""
    values = [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 6]

    def walk(x, key=""):
        if isinstance(x, dict):
            return {k: (MASK if SECRET_KEY.search(str(k)) and v else walk(v, k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, str) and any(v in x for v in values):
            return MASK
        return x

    return walk(obj)
