"""Build the model: HF causal LM (pretrained or random) -> optional 4-bit -> optional Liger kernels ->
activation checkpointing -> LoRA (peft) -> MoE blocks.

Order matters: peft wraps the model before the MoE blocks go in, so `all-linear` LoRA never adapts a router,
and the routers/experts (created after peft froze the base) are the only new trainable weights besides LoRA's.

Everything random in the build (a random base's weights, upcycled experts' noise, fresh adapters) is drawn
from `seed` in a forked RNG, so the same config, seed and device type rebuild the same model: that is how a
`model.init=random` run is loaded again (random weights differ between the CPU's and CUDA's generators, so the
device type is part of what a run records).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from lightning_moe.config.schema import LoRAConfig, ModelConfig, MoEConfig
from lightning_moe.models import varlen
from lightning_moe.models.activation_checkpointing import checkpoint_only, checkpointed_layers
from lightning_moe.models.compilation import compile_model
from lightning_moe.models.inject import inject_moe
from lightning_moe.models.kernels import apply_liger
from lightning_moe.models.layout import resolve_moe_layers
from lightning_moe.models.lora import apply_lora
from lightning_moe.moe.layer import MoEBlock, RoutingContext
from lightning_moe.paths import resolve_path
from lightning_moe.upstream import compile_cache_counts, disable_bnb_cpu_packing


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _base(m: ModelConfig, config: PretrainedConfig, vocab_size: int, device) -> torch.nn.Module:
    if m.attn_implementation == varlen.NAME:
        varlen.register()
    kwargs = {"dtype": torch_dtype(m.dtype), "attn_implementation": m.attn_implementation}
    if m.load_in_4bit:  # pretrained only (validate_config)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=m.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=torch_dtype(m.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        )
        kwargs["device_map"] = {"": device or "cpu"}  # bitsandbytes >= 0.46 quantises on CPU too
    if m.init == "random":
        if config.vocab_size < vocab_size:  # every token id of the tokenizer needs an embedding
            config.vocab_size = -(-vocab_size // 64) * 64
        with torch.device(device) if device is not None else contextlib.nullcontext():  # no 12B init on CPU
            return AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code, **kwargs)
    source = resolve_path(m.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source if source.is_dir() else m.name_or_path, revision=m.revision,
                                                 trust_remote_code=m.trust_remote_code, **kwargs)
    return model.to(device) if device is not None and not m.load_in_4bit else model


def build_model(
    m: ModelConfig,
    lora: LoRAConfig,
    moe: MoEConfig,
    config: PretrainedConfig,
    context: RoutingContext,
    vocab_size: int,
    device: torch.device | str | None = None,
    seed: int = 0,
    training: bool = True,
) -> tuple[torch.nn.Module, list[MoEBlock]]:
    """The model and its MoE blocks. `vocab_size`: the tokenizer's. `training=False` builds for inference: eval
    mode, the KV cache on, no activation checkpointing or Liger kernels."""
    device = torch.device(device) if device is not None else None
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = _base(m, config, vocab_size, device)
        # from_pretrained returns eval mode, and Lightning keeps each submodule's mode: the decoder would train with
        # checkpointing, dropout and Liger's fused loss off (all three look at .training)
        model.train(training)
        model.config.use_cache = not training
        if m.load_in_4bit:
            disable_bnb_cpu_packing(model)
        if training:
            _training_kernels(model, m)
        if lora.enabled:
            model = apply_lora(model, lora)
        else:
            model.requires_grad_(False)
        blocks = []
        if moe.enabled:
            layers = resolve_moe_layers(moe, config.num_hidden_layers)
            blocks = inject_moe(model, layers, context, moe, config.hidden_size, config.num_hidden_layers)
        if training and m.base_precision == "fp8":  # after peft and the experts: only LoRA's frozen bases
            from lightning_moe.models.fp8 import convert_frozen_base_to_fp8

            convert_frozen_base_to_fp8(model, cache_weights=m.fp8_weight_cache, grad_dtype=m.fp8_grad_dtype)
        if training:  # generation's growing KV cache would recompile at every length: training only
            compile_model(model, m.compile, m.compile_backend, m.compile_mode)
    model.train(training)
    return model, blocks


def _training_kernels(model: torch.nn.Module, m: ModelConfig) -> None:
    if m.liger_kernel:
        apply_liger(model, in_layers=m.compile == "none")
    gc_kwargs = {"use_reentrant": False}  # reentrant checkpointing would cut the router's side-channel graph
    if m.load_in_4bit and m.upcast_non_quantized:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=m.gradient_checkpointing,
                                        gradient_checkpointing_kwargs=gc_kwargs)
    elif m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if m.gradient_checkpointing and m.gradient_checkpointing_layers is not None:
        checkpoint_only(model, m.gradient_checkpointing_layers)


def describe_model(model: torch.nn.Module, blocks: list[MoEBlock], m: ModelConfig) -> dict:
    """What was built, for summary.json."""
    params = list(model.parameters())
    return {
        "name_or_path": m.name_or_path,
        "init": m.init,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "moe_layers": [b.layer_idx for b in blocks],
        "checkpointed_layers": checkpointed_layers(model),
        **({"compile_cache": compile_cache_counts()} if m.compile != "none" else {}),
        "fp8_modules": sum(type(mod).__name__ == "FrozenFloat8Linear" for mod in model.modules()),
        "linear_4bit_modules": sum(type(mod).__name__ == "Linear4bit" and not hasattr(mod, "base_layer")
                                   for mod in model.modules()),
    }
