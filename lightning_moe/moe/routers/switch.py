"""Switch Transformer routing: top-1, each expert takes at most C = capacity_factor * real tokens / E tokens.

Tokens past an expert's capacity (in row order) are dropped: their expert output is zero, so the MoE block passes
them through the residual path (and the frozen MLP); they are counted in `dropped`. Padding never takes capacity.
Capacity is a training-time device that couples the tokens of a micro-batch; generating, each token takes its
top-1 expert (a KV-cache step sees one token, so capacity would change the routing), as Switch does at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_moe.moe.routers.base import Router, RouterOutput


class SwitchRouter(Router):
    def __init__(self, hidden_size, num_experts, capacity_factor=1.25, init_std=0.02):
        super().__init__(hidden_size, num_experts, init_std)
        self.capacity_factor, self.max_active = capacity_factor, 1

    @classmethod
    def from_config(cls, hidden_size, moe):
        return cls(hidden_size, moe.num_experts, moe.switch.capacity_factor, moe.router_init_std)

    @staticmethod
    def nominal_active_experts(moe) -> float:
        return 1.0

    def forward(self, x, mask, rows_per_seq=None, generating=False):
        logits = self.scores(x)
        probs = logits.softmax(-1)
        top, index = probs.max(-1)
        choice = F.one_hot(index, self.num_experts).bool()
        if generating:
            return RouterOutput(logits, probs, choice * top.unsqueeze(-1), choice, torch.zeros_like(mask))
        real = choice & mask.unsqueeze(-1)
        position = real.long().cumsum(0)  # 1-based place in its expert's queue, in row order
        capacity = torch.ceil(self.capacity_factor * mask.sum() / self.num_experts)
        kept = real & (position <= capacity)
        dropped = mask & ~kept.any(-1)
        return RouterOutput(logits, probs, kept * top.unsqueeze(-1), choice, dropped)
