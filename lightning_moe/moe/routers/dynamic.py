"""Dynamic expert counts (Huang et al. 2024, "Harder tasks need more experts").

top_p: sort the softmax probabilities, keep the shortest prefix whose sum reaches p (the crossing expert
included); threshold: keep every expert with probability >= threshold. Either way at least `min_experts` and at
most `max_experts`. Gates are the probabilities themselves (no renormalisation), so a confident token uses few
experts. Pair with moe.entropy_coef: otherwise the router can lower loss by spreading its mass to switch on every
expert.
"""

from __future__ import annotations

import torch

from lightning_moe.moe.routers.base import Router, RouterOutput


class DynamicRouter(Router):
    def __init__(self, hidden_size, num_experts, mode="top_p", p=0.5, threshold=0.25, min_experts=1,
                 max_experts=None, init_std=0.02):
        super().__init__(hidden_size, num_experts, init_std)
        self.mode, self.p, self.threshold = mode, p, threshold
        self.min_experts, self.max_experts = min_experts, max_experts or num_experts
        self.max_active = self.max_experts

    @classmethod
    def from_config(cls, hidden_size, moe):
        own = moe.dynamic  # config/routers.py's DynamicConfig
        return cls(hidden_size, moe.num_experts, own.mode, own.p, own.threshold, own.min_experts, own.max_experts,
                   moe.router_init_std)

    def forward(self, x, mask, rows_per_seq=None, generating=False):
        logits = self.scores(x)
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        rank = torch.arange(self.num_experts, device=x.device)
        if self.mode == "top_p":
            keep = (sorted_p.cumsum(-1) - sorted_p) < self.p  # mass before this expert is still short of p
        else:
            keep = sorted_p >= self.threshold
        count = keep.sum(-1, keepdim=True).clamp(self.min_experts, self.max_experts)
        keep_sorted = rank < count
        selected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return RouterOutput(logits, probs, probs * selected, selected)
