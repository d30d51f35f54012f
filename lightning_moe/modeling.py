"""Build the trained model: HF causal LM (pretrained or random) -> optional 4-bit -> optional Liger kernels ->
LoRA (peft) -> MoE blocks.

Order matters: peft wraps the model before the MoE blocks go in, so `all-linear` LoRA never adapts a
router, and the routers/experts (created after peft froze the base) are the only new trainable weights
besides LoRA's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from lightning_moe.config import ConfigError, LoRAConfig, ModelConfig, MoEConfig, resolve_moe_layers, spread_layers
from lightning_moe.moe import MoEBlock, RoutingContext, inject_moe
from lightning_moe.upstream import disable_bnb_cpu_packing
from lightning_moe.paths import BUNDLED_TOKENIZER, architecture_file, known_architectures, resolve_path

log = logging.getLogger(__name__)


class WeightsUnavailable(RuntimeError):
    """The pretrained weights cannot be reached; the message says which override fixes it."""


def _hub_unreachable_reason(timeout: float = 3.0) -> str | None:
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
    arch = m.arch or "an architecture json in lightning_moe/architectures/"
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
        reason = _hub_unreachable_reason()
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


def load_tokenizer(m: ModelConfig, chat_template: str | None = None):
    """The model's tokenizer (or model.tokenizer); a random-init run without it uses the bundled one."""
    source = m.tokenizer or m.name_or_path
    if source is None or (m.init == "random" and not _tokenizer_reachable(source, m.revision)):
        if source is not None:
            log.warning("tokenizer of '%s' not reachable: using the bundled tokenizer %s", source, BUNDLED_TOKENIZER)
        source = str(BUNDLED_TOKENIZER)
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


def _tokenizer_reachable(source: str, revision: str | None) -> bool:
    if resolve_path(source).exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "tokenizer_config.json", revision=revision), str):
        return True
    return _hub_unreachable_reason() is None


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def build_model(
    m: ModelConfig,
    lora: LoRAConfig,
    moe: MoEConfig,
    config: PretrainedConfig,
    context: RoutingContext,
    vocab_size: int,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, list[MoEBlock]]:
    """The trainable model and its MoE blocks. `vocab_size`: the tokenizer's; a random model is made
    at least that large so every token id has an embedding."""
    layers = resolve_moe_layers(moe, config.num_hidden_layers) if moe.enabled else []
    kwargs = {"dtype": _dtype(m.dtype), "attn_implementation": m.attn_implementation}
    if m.load_in_4bit:
        if m.init == "random":
            raise ConfigError(
                "model.load_in_4bit: 4-bit loading quantises pretrained weights; use model.init=pretrained "
                "(a local directory works: save a random model with save_pretrained first)"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=m.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=_dtype(m.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        )
        kwargs["device_map"] = {"": device or "cpu"}  # bitsandbytes >= 0.46 quantises on CPU too

    if m.init == "random":
        if config.vocab_size < vocab_size:
            config.vocab_size = -(-vocab_size // 64) * 64
        with torch.device(device) if device is not None else contextlib.nullcontext():  # no 12B init on CPU
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code, **kwargs)
    else:
        source = resolve_path(m.name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            source if source.is_dir() else m.name_or_path,
            revision=m.revision,
            trust_remote_code=m.trust_remote_code,
            **kwargs,
        )
    # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode: the decoder would
    # train with checkpointing, dropout and Liger's fused loss off (all three look at .training)
    model.train()
    model.config.use_cache = False
    if m.load_in_4bit:
        disable_bnb_cpu_packing(model)
    if m.liger_kernel:  # before LoRA and MoE wrap the MLPs: Liger patches the model's own modules
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    gc_kwargs = {"use_reentrant": False}  # reentrant checkpointing would cut the router's side-channel graph
    if m.load_in_4bit and m.upcast_non_quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=m.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if m.gradient_checkpointing and m.gradient_checkpointing_layers is not None:
        checkpoint_only(model, m.gradient_checkpointing_layers)

    if lora.enabled:
        model = _apply_lora(model, lora)
    else:
        model.requires_grad_(False)

    blocks = []
    if moe.enabled:
        blocks = inject_moe(model, layers, context, moe, config.hidden_size, config.num_hidden_layers)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("lora.enabled / moe.enabled: nothing to train (both are off)")
    return model, blocks


def checkpoint_only(model: torch.nn.Module, count: int) -> None:
    """Selective activation checkpointing: keep checkpointing on `count` decoder layers spread over the depth
    and turn it off on the rest, whose activations then stay in memory instead of being recomputed in the
    backward pass. transformers checkpoints per decoder layer (GradientCheckpointingLayer, a flag each)."""
    layers = _decoder_layers(model)
    keep = set(spread_layers(len(layers), count))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep


def checkpointed_layers(model: torch.nn.Module) -> list[int]:
    """Indices of the decoder layers that run under activation checkpointing."""
    return [i for i, layer in enumerate(_decoder_layers(model)) if layer.gradient_checkpointing]


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """transformers' decoder layers in depth order: each checkpoints itself when its own flag is set."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [mod for mod in model.modules() if isinstance(mod, GradientCheckpointingLayer)]


def missing_lora_targets(model: torch.nn.Module, lora: LoRAConfig) -> None:
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


def _apply_lora(model: torch.nn.Module, lora: LoRAConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    missing_lora_targets(model, lora)
    targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def keep_lora_inputs_in_autocast_dtype(model: torch.nn.Module) -> int:
    """Under bf16 autocast, peft would cast every LoRA input to the adapter's float32 (a copy of the
    activations per adapted projection, with dropout run on the float32 copy) only for autocast to cast it
    back to bf16 for the matmul: 15% of an H200 step's GPU time (scripts/benchmark.py --profile). Off, the
    same bf16 matmuls run on the bf16 activations. Returns the number of LoRA layers changed."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)

