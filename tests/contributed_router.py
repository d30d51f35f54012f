"""A router written the way CONTRIBUTING.md's "Adding a router" says, from `Router` alone (not a subclass of one of
ours), in its own file: tests/test_routers.py registers it and follows the rest of the walk. Not part of the package.

One expert per row, the best-scoring one, weighted by its sigmoid score (a deliberately simple rule).
"""

from __future__ import annotations

import torch.nn.functional as F

from lightning_moe.moe.routers.base import Router, RouterOutput


class SigmoidTop1Router(Router):
    max_active = 1  # the most experts one row can use: MoEBlock sizes the grouped dispatch by it

    @classmethod
    def from_config(cls, hidden_size, moe):
        return cls(hidden_size, moe.num_experts, moe.router_init_std)

    @staticmethod
    def nominal_active_experts(moe) -> float:
        return 1.0

    def forward(self, x, mask, rows_per_seq=None, generating=False):
        logits = self.scores(x)  # float32 (float64 under gradcheck), autocast off
        selected = F.one_hot(logits.argmax(-1), self.num_experts).bool()
        gates = logits.sigmoid() * selected  # static shapes, no .item(), no branch on the data
        return RouterOutput(logits=logits, probs=logits.softmax(-1), gates=gates, selected=selected)
