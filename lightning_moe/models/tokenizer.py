"""The tokenizer and its chat template: the model's own, a path, or the bundled one (`model.tokenizer=bundled`)."""

from __future__ import annotations

import logging

from transformers import AutoTokenizer

from lightning_moe.config.schema import ConfigError, ModelConfig
from lightning_moe.models.architecture import hub_reachable
from lightning_moe.paths import BUNDLED_TOKENIZER, resolve_path

log = logging.getLogger(__name__)


def tokenizer_source(m: ModelConfig) -> str:
    """Where the tokenizer comes from: `model.tokenizer` ('bundled' is lightning_moe/assets/tokenizer), else the
    model's own; a random-init run whose model tokenizer cannot be reached falls back to the bundled one."""
    source = m.tokenizer or m.name_or_path
    if source == "bundled" or source is None:
        return str(BUNDLED_TOKENIZER)
    if m.init == "random" and not _reachable(source, m.revision):
        log.warning("tokenizer of '%s' not reachable: using the bundled tokenizer %s", source, BUNDLED_TOKENIZER)
        return str(BUNDLED_TOKENIZER)
    return source


def load_tokenizer(m: ModelConfig, chat_template: str | None = None):
    source = tokenizer_source(m)
    path = resolve_path(source)
    tok = AutoTokenizer.from_pretrained(
        path if path.exists() else source, revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    if chat_template:
        tok.chat_template = resolve_path(chat_template).read_text()
    if not tok.chat_template:
        raise ConfigError(f"data.chat_template: tokenizer '{source}' has no chat template; give one (a .jinja file)")
    if tok.pad_token_id is None:  # padding positions are masked everywhere, so any id serves
        tok.pad_token = tok.eos_token
    return tok


def _reachable(source: str, revision: str | None) -> bool:
    if resolve_path(source).exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "tokenizer_config.json", revision=revision), str):
        return True
    return hub_reachable()
