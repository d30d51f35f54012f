"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), patched into one model instance."""

from __future__ import annotations

import inspect

import torch

from lightning_moe.upstream import liger_apply_function

IN_LAYER_KERNELS = ("rope", "rms_norm", "swiglu", "geglu")  # what runs inside a decoder layer


def apply_liger(model: torch.nn.Module, in_layers: bool = True) -> None:
    """Before LoRA and MoE wrap the MLPs: Liger patches the model's own modules, through its public per-family
    function (`apply_liger_kernel_to_mistral(model=...)`); prechecks.py has refused a family Liger lacks.

    `in_layers=False` keeps only the fused linear cross-entropy (after the last layer): under model.compile,
    Liger's in-layer kernels break the compiled graph (its RoPE dispatcher is `torch.compiler.disable`d, and
    dynamo cannot analyse its SwiGLU kernel's arguments), and inductor fuses those operations itself."""
    apply = liger_apply_function(model.config.model_type)
    off = {} if in_layers else {k: False for k in IN_LAYER_KERNELS if k in inspect.signature(apply).parameters}
    apply(model=model, **off)
