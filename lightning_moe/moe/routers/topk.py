"""Top-k softmax routing (Mixtral): softmax over all experts, keep the top k, renormalise them to sum to 1."""

from __future__ import annotations

from lightning_moe.moe.routers.base import Router, RouterOutput, top_k


class TopKRouter(Router):
    def __init__(self, hidden_size, num_experts, top_k, init_std=0.02, normalize=True):
        super().__init__(hidden_size, num_experts, init_std)
        self.top_k, self.normalize, self.max_active = top_k, normalize, top_k

    @classmethod
    def from_config(cls, hidden_size, moe):
        return cls(hidden_size, moe.num_experts, moe.top_k, moe.router_init_std)

    def forward(self, x, mask, rows_per_seq=None, generating=False):
        logits = self.scores(x)
        probs = logits.softmax(-1)
        gates, selected = top_k(probs, self.top_k, self.normalize)
        return RouterOutput(logits, probs, gates, selected)
