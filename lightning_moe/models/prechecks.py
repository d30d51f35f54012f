"""Checks that need the model's architecture or the device, but no weights.

Entry points run `check_before_weights` right after `validate_config` and before the training stack (Lightning,
datasets, peft) is imported, so a wrong layer index, LoRA target, MoE projection or precision fails in seconds
even for a 12B model: the layer names come from a one-layer copy built on the meta device (shapes only).
"""

from __future__ import annotations

import copy
import logging

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PretrainedConfig

from lightning_moe.config.schema import ConfigError, Sections
from lightning_moe.config.validate import check_precision_on_cpu
from lightning_moe.models.architecture import missing_lora_targets, resolve_model_config
from lightning_moe.models.layout import decoder_layers, ffn_of, mlp_projection_names, resolve_moe_layers

log = logging.getLogger(__name__)


def one_layer_model(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """A one-decoder-layer copy on the meta device: every layer has the same module names, and it costs no memory."""
    one_layer = copy.deepcopy(config)
    one_layer.num_hidden_layers = 1
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(one_layer, trust_remote_code=trust_remote_code)


def check_moe_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """LoRA experts adapt the MLP's own projections: they must exist in this family's MLP (Phi-3 fuses gate/up)."""
    names = mlp_projection_names(ffn_of(decoder_layers(model, 1)[0]))
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ConfigError(f"moe.lora_targets: {unknown} are not projections of this model's MLP ({names})")


def check_precision(precision: str, accelerator: str, cuda_available: bool, bf16_supported: bool) -> None:
    """bf16 on a GPU that lacks it (pre-Ampere) would fail or silently emulate; CPUs run bf16 (slowly), not fp16."""
    if "bf16" in str(precision) and accelerator in ("gpu", "cuda", "auto") and cuda_available and not bf16_supported:
        raise ConfigError(
            f"trainer.precision: {precision} needs a GPU with bf16 (Ampere or newer); this one has none: "
            "use trainer.precision=16-mixed or 32-true"
        )
    if accelerator == "cpu" or not cuda_available:
        check_precision_on_cpu(str(precision))


def check_liger(model_type: str, accelerator: str, cuda_available: bool) -> None:
    """Liger's kernels are Triton: CUDA only, and written per model family."""
    if accelerator == "cpu" or not cuda_available:
        raise ConfigError("model.liger_kernel: Liger's Triton kernels need a CUDA GPU; set model.liger_kernel=false")
    from lightning_moe.upstream import liger_model_types

    try:
        supported = liger_model_types()
    except ImportError:  # the CPU install leaves liger-kernel (and Triton) out: requirements-gpu.txt adds them
        raise ConfigError("model.liger_kernel: liger-kernel is not installed; on a GPU machine install "
                          "requirements-gpu.txt (`make TORCH=torch install` does), or set model.liger_kernel=false") from None
    if model_type not in supported:
        raise ConfigError(f"model.liger_kernel: Liger has no kernels for model type '{model_type}' "
                          f"(supported: {', '.join(sorted(liger_model_types()))}); set it to false")


def check_fp8(accelerator: str, cuda_available: bool, capability: tuple[int, int] | None, device_name: str) -> None:
    """model.base_precision=fp8: torch._scaled_mm's FP8 tensor cores (compute capability >= 8.9) and torchao."""
    if accelerator == "cpu" or not cuda_available:
        raise ConfigError("model.base_precision: fp8 needs a CUDA GPU with FP8 tensor cores (compute capability >= "
                          "8.9: Ada, Hopper); this run has none: use model.base_precision=bf16")
    if capability is not None and tuple(capability) < (8, 9):
        raise ConfigError(f"model.base_precision: fp8 needs compute capability >= 8.9 (Ada, Hopper); {device_name} "
                          f"has {capability[0]}.{capability[1]}: use model.base_precision=bf16")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError("model.base_precision: fp8 needs torchao (pip install torchao>=0.17): "
                          "or use model.base_precision=bf16") from None


def check_varlen() -> None:
    """model.attn_implementation=varlen runs torch's varlen FlashAttention (torch >= 2.10)."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.attn_implementation=varlen needs torch.nn.attention.varlen (torch >= 2.10; this "
                          f"is {torch.__version__}): use model.attn_implementation=sdpa") from None


def check_before_weights(cfg: DictConfig, sections: Sections, training: bool = True) -> PretrainedConfig:
    """The model's architecture config, after every check that needs it; raises ConfigError or WeightsUnavailable
    naming the key to change. `training=False` (evaluate, generate, export) skips the training-only device checks."""
    if sections.model.trust_remote_code:
        log.warning("model.trust_remote_code=true: Python code from '%s''s repository will run",
                    sections.model.name_or_path)
    model_config = resolve_model_config(sections.model)
    if sections.moe.enabled:
        resolve_moe_layers(sections.moe, model_config.num_hidden_layers)
    checkpointed = sections.model.gradient_checkpointing_layers
    if checkpointed is not None and checkpointed > model_config.num_hidden_layers:
        raise ConfigError(f"model.gradient_checkpointing_layers: {checkpointed} > the model's "
                          f"{model_config.num_hidden_layers} decoder layers (null checkpoints them all)")
    layer = None
    if sections.lora.enabled and sections.lora.target_modules != ["all-linear"]:
        layer = one_layer_model(model_config, sections.model.trust_remote_code)
        missing_lora_targets(layer, sections.lora)
    if sections.moe.enabled and sections.moe.expert == "lora":
        check_moe_lora_targets(layer or one_layer_model(model_config, sections.model.trust_remote_code),
                               list(sections.moe.lora_targets))
    if sections.model.attn_implementation == "varlen":
        check_varlen()
    if not training:
        return model_config
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    cuda = torch.cuda.is_available()
    check_precision(str(trainer.get("precision", "32-true")), accelerator, cuda, cuda and torch.cuda.is_bf16_supported())
    if sections.model.liger_kernel:
        check_liger(model_config.model_type, accelerator, cuda)
    if sections.model.base_precision == "fp8":
        check_fp8(accelerator, cuda, torch.cuda.get_device_capability() if cuda else None,
                  torch.cuda.get_device_name() if cuda else "cpu")
    if sections.model.offload_activations and (accelerator == "cpu" or not cuda):
        raise ConfigError("model.offload_activations: moves activations from a CUDA GPU to CPU memory; this run "
                          "has no CUDA GPU: set model.offload_activations=false")
    return model_config
