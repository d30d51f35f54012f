"""Routers: hidden states -> (logits, weights, expert indices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    """Mixtral's router: softmax over all experts in float32, keep the top k, renormalise them to sum to 1.

    Logits are computed in float32 with autocast off: bf16 logits make near-ties between experts flip from
    step to step, and the z-loss squares them.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, H) -> logits (T, E) float32, weights (T, k) float32, indices (T, k) int64."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices
