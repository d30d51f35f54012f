"""Model FLOPs of a LoRA(+MoE) training step, the formula in MOE_TRAINING_GUIDE.md ("Throughput and MFU").

Per token of a sequence of length S, with a frozen base:
  F = 2N (forward) + 2N (input gradients; frozen weights get no weight gradient) + 6P + 6*L*H*d*S
N: parameters of the frozen matmuls, lm_head included, input embedding excluded.
P: trainable parameters a token touches (LoRA A/B, routers, the k active experts).
L*H*d: layers x query heads x head_dim; the causal attention matmuls cost 2*L*H*d*S forward and twice
that backward. Activation checkpointing recomputes the forward (hardware FLOPs), not counted here (MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_moe.moe.layer import MoEBlock


@dataclass(frozen=True)
class FlopCounts:
    frozen_matmul_params: int  # N
    trainable_params_per_token: int  # P
    attn_lhd: int  # L * H * d

    def per_batch(self, num_tokens: int, attn_sq: int) -> int:
        """FLOPs of one micro-batch of conversations with sum(len) = num_tokens and sum(len^2) = attn_sq."""
        n, p = self.frozen_matmul_params, self.trainable_params_per_token
        return num_tokens * (4 * n + 6 * p) + 6 * self.attn_lhd * attn_sq

    def per_token(self, seq_len: int) -> int:
        return self.per_batch(seq_len, seq_len * seq_len) // seq_len


def _linear_weight_numel(module: nn.Module) -> int | None:
    """Logical weight size of a plain or bitsandbytes linear layer (4-bit weights are stored packed).
    peft's LoRA wrappers (which share those class names) are skipped: their base_layer is counted."""
    if hasattr(module, "base_layer"):
        return None
    if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
        return module.in_features * module.out_features
    return None


def nominal_active_experts(moe) -> float:
    """Experts a token uses by design, as its router declares: top_k (topk, deepseek and, as its static reference,
    dynamic), 1 for Switch, moe.expert_choice.capacity_factor for expert choice. Measured counts are in the routing metrics."""
    from lightning_moe.moe.routers import router_class

    return router_class(moe.router).nominal_active_experts(moe)


def count_flops(model: nn.Module, config, active_experts: float = 0.0) -> FlopCounts:
    """N, P and L*H*d of a built model (after LoRA and MoE insertion); MoE blocks count `active_experts`
    experts per token."""
    frozen = 0
    for module in model.modules():
        numel = _linear_weight_numel(module)
        if numel is not None and not module.weight.requires_grad:
            frozen += numel
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    in_blocks = {id(p) for b in blocks for p in (*b.router.parameters(), *b.experts.parameters(),
                                                   *(b.shared.parameters() if b.shared is not None else ()))}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in in_blocks)
    for b in blocks:
        block_frozen, block_trainable = b.flop_params(active_experts)
        frozen, trainable = frozen + block_frozen, trainable + block_trainable
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopCounts(frozen, trainable, config.num_hidden_layers * heads * head_dim)


# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks. Lightning's table lists the sparse figure for the H200
# and does not match the plain "NVIDIA H200" device name, so MFU would be missing or halved there.
_DENSE_BF16 = (("h200", 989.4e12), ("h100 pcie", 756.0e12), ("h100", 989.4e12), ("a100", 312.0e12))


def dense_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU: bf16/fp16 tensor cores; None where unknown (e.g. CPU)."""
    if device.type != "cuda" or not any(p in str(precision) for p in ("bf16", "16")):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in _DENSE_BF16 if all(k in name for k in key.split())), None)
