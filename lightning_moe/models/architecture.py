"""Find a model's architecture config without touching its weights, and fail fast when they cannot be reached.

`resolve_model_config` reads config.json from a local directory, the Hugging Face cache or the Hub, or builds it
from an architecture json (lightning_moe/models/architectures/) for `model.init=random`. A machine without
network fails in seconds (a 3-second TCP probe instead of huggingface_hub's retries), naming the override that
fixes it. `missing_lora_targets` checks LoRA's target names against a (weightless) copy of the model.

Here rather than in config/ because it needs transformers: config/ stays importable without torch.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, PretrainedConfig

from lightning_moe.config.schema import ConfigError, LoRAConfig, ModelConfig
from lightning_moe.paths import architecture_file, known_architectures, resolve_path


class WeightsUnavailable(ConfigError):
    """The pretrained weights cannot be reached; the message says which override fixes it."""


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached, or None. A 3-second TCP probe instead of huggingface_hub's retries
    (about 30 s with backoff), so a machine without network fails in seconds. Behind a proxy, trust the
    proxy and let the real request decide."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e})"
    return None


def _cached_config(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return hit if isinstance(hit, str) else None


def _unavailable(m: ModelConfig, reason: str) -> WeightsUnavailable:
    arch = m.arch or "an architecture json in lightning_moe/models/architectures/"
    return WeightsUnavailable(
        f"cannot load the weights of model '{m.name_or_path}': {reason}.\n"
        f"  - point at a local copy:        model.name_or_path=/path/to/{Path(m.name_or_path).name}\n"
        f"  - or train the same architecture with random weights (dry runs, benchmarks; no download):\n"
        f"                                  model.init=random   (architecture: {arch})"
    )


def resolve_model_config(m: ModelConfig) -> PretrainedConfig:
    """The architecture config, found without touching weights; raises WeightsUnavailable fast."""
    if m.init == "random":
        src = m.arch or m.name_or_path
        path = resolve_path(src)
        if path.is_dir():
            return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
        file = architecture_file(src)
        if not file.is_file():
            raise ConfigError(f"model.arch: no architecture '{src}' (known: {', '.join(known_architectures())})")
        spec = json.loads(file.read_text())
        spec.pop("architectures", None)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)

    local = resolve_path(m.name_or_path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise _unavailable(m, f"{local} has no config.json")
        if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
            raise _unavailable(m, f"{local} has no *.safetensors or *.bin weights")
        return _config_from(local, m)
    if _cached_config(m.name_or_path, m.revision) is None:
        reason = hub_unreachable_reason()
        if reason:
            raise _unavailable(m, f"it is not in the local Hugging Face cache and {reason}")
    try:
        return _config_from(m.name_or_path, m)
    except OSError as e:
        raise _unavailable(m, str(e).splitlines()[0]) from e


def _config_from(source, m: ModelConfig) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):  # the model ships its own Python code: never run it unasked
            raise ConfigError(
                f"model.trust_remote_code: '{m.name_or_path}' needs to run Python code from its repository; "
                "set model.trust_remote_code=true only if you trust that code"
            ) from None
        raise


def hub_reachable() -> bool:
    return hub_unreachable_reason() is None


def missing_lora_targets(model, lora: LoRAConfig) -> None:
    """Raise ConfigError naming lora.target_modules if a target is not a module of `model`."""
    if lora.target_modules == ["all-linear"]:
        return
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in leaf_names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})
        raise ConfigError(
            f"lora.target_modules: {missing} not found in {type(model).__name__}; its linear layers are {linear} "
            "(or use [all-linear])"
        )
