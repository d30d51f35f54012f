"""An expert form written the way CONTRIBUTING.md's "Adding an expert form" says: a subclass of `Experts` and its
builder, in a file of its own; tests/test_moe.py registers it with one `ExpertForm` and nothing else. Not part of the
package.

E linear maps (H, H) beside the MLP, zero at the start (so step 0 is the base model): y = sum_e g_e W_e x.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_moe.moe.experts import Experts


class LinearDeltaExperts(Experts):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, hidden_size))

    def forward(self, x, gates, max_active, dispatch):  # every expert on every token (dense): dispatch ignored
        return torch.einsum("th,ehk,te->tk", x, self.weight.to(x.dtype), gates.to(x.dtype))

    def flop_params(self, active):
        return 0, int(self.weight[0].numel() * active)


def linear_delta_experts(mlp, hidden_size, moe) -> LinearDeltaExperts:
    return LinearDeltaExperts(hidden_size, moe.num_experts)
