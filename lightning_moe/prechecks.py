"""Checks that need the model's architecture or the device, but no weights.

train.py runs them right after the schema check and before the training stack (Lightning, datasets, peft)
is imported, so a wrong layer index, LoRA target or precision fails in seconds even for a 12B model.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PretrainedConfig

from lightning_moe.config import ConfigError, LoRAConfig, Sections, resolve_moe_layers
from lightning_moe.modeling import missing_lora_targets, resolve_model_config


def check_lora_targets(lora: LoRAConfig, config: PretrainedConfig, trust_remote_code: bool = False) -> None:
    """LoRA target names against the model's modules, on a one-layer copy built on the meta device (shapes
    only, no memory; every decoder layer has the same module names)."""
    if lora.target_modules == ["all-linear"]:
        return
    one_layer = copy.deepcopy(config)
    one_layer.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one_layer, trust_remote_code=trust_remote_code)
    missing_lora_targets(model, lora)


def check_precision(precision: str, accelerator: str, cuda_available: bool, bf16_supported: bool) -> None:
    """bf16 on a GPU that lacks it (pre-Ampere) would fail or silently emulate; CPUs run bf16 (slowly)."""
    if "bf16" in str(precision) and accelerator in ("gpu", "cuda", "auto") and cuda_available and not bf16_supported:
        raise ConfigError(
            f"trainer.precision: {precision} needs a GPU with bf16 (Ampere or newer); this one has none: "
            "use trainer.precision=16-mixed or 32-true"
        )


def check_before_weights(cfg: DictConfig, sections: Sections) -> PretrainedConfig:
    """The model's architecture config, after every check that needs it; raises ConfigError or
    WeightsUnavailable naming the key to change."""
    model_config = resolve_model_config(sections.model)
    if sections.moe.enabled:
        resolve_moe_layers(sections.moe, model_config.num_hidden_layers)
    checkpointed = sections.model.gradient_checkpointing_layers
    if checkpointed is not None and checkpointed > model_config.num_hidden_layers:
        raise ConfigError(f"model.gradient_checkpointing_layers: {checkpointed} > the model's "
                          f"{model_config.num_hidden_layers} decoder layers (null checkpoints them all)")
    if sections.lora.enabled:
        check_lora_targets(sections.lora, model_config, sections.model.trust_remote_code)
    trainer = cfg.get("trainer") or {}
    cuda = torch.cuda.is_available()
    check_precision(trainer.get("precision", "32-true"), str(trainer.get("accelerator", "auto")), cuda,
                    cuda and torch.cuda.is_bf16_supported())
    if sections.model.liger_kernel:
        check_liger(model_config.model_type, str(trainer.get("accelerator", "auto")), cuda)
    if sections.model.offload_activations and (str(trainer.get("accelerator", "auto")) == "cpu" or not cuda):
        raise ConfigError("model.offload_activations: moves activations from a CUDA GPU to CPU memory; this run "
                          "has no CUDA GPU: set model.offload_activations=false")
    return model_config


def check_liger(model_type: str, accelerator: str, cuda_available: bool) -> None:
    """Liger's kernels are Triton: CUDA only, and written per model family."""
    if accelerator == "cpu" or not cuda_available:
        raise ConfigError("model.liger_kernel: Liger's Triton kernels need a CUDA GPU; set model.liger_kernel=false")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"model.liger_kernel: Liger has no kernels for model type '{model_type}' "
                          f"(supported: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set it to false")
