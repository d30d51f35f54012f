"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), patched into one model instance."""

from __future__ import annotations

import torch

from lightning_moe.upstream import liger_apply_function


def apply_liger(model: torch.nn.Module) -> None:
    """Before LoRA and MoE wrap the MLPs: Liger patches the model's own modules, through its public per-family
    function (`apply_liger_kernel_to_mistral(model=...)`); prechecks.py has refused a family Liger lacks."""
    liger_apply_function(model.config.model_type)(model=model)
