"""LoRA through peft: the adapters on `lora.target_modules`, or every linear layer but lm_head (`all-linear`)."""

from __future__ import annotations

import torch

from lightning_moe.config.schema import LoRAConfig
from lightning_moe.models.architecture import missing_lora_targets


def apply_lora(model: torch.nn.Module, lora: LoRAConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    missing_lora_targets(model, lora)
    targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias=lora.bias, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)
