"""Expert networks. Each takes (T, H) tokens and a dense (T, E) gate matrix and returns sum_e gate_e * expert_e(x)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AdapterExperts(nn.Module):
    """E small SwiGLU bottleneck adapters, run beside the frozen MLP.

    The E experts' weights are stacked so all of them run as two matmuls of width E*d: the gate is
    broadcast over each expert's d hidden units, so sum_e g_e * down_e(h_e) = (h * (g kron 1_d)) @ W_down.
    Unselected experts have g_e = 0. With a few small experts this dense form costs less than dispatching
    tokens, and it has no data-dependent shapes (no host sync, compiles whole).

    W_down starts at zero, so inserting the block leaves the model's output unchanged (as LoRA's B does).
    """

    def __init__(self, hidden_size: int, num_experts: int, expert_dim: int):
        super().__init__()
        self.num_experts, self.expert_dim = num_experts, expert_dim
        width = num_experts * expert_dim
        self.w_in = nn.Parameter(torch.empty(hidden_size, 2 * width))  # [gate | up] for all experts
        self.w_down = nn.Parameter(torch.zeros(width, hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)  # the fan-in bound nn.Linear and LoRA's A use
        nn.init.uniform_(self.w_in, -bound, bound)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w_in.to(x.dtype)).chunk(2, dim=-1)
        h = F.silu(gate) * up
        h = h * gates.to(h.dtype).repeat_interleave(self.expert_dim, dim=-1)
        return h @ self.w_down.to(h.dtype)

    def active_params_per_token(self, top_k: int) -> int:
        """Parameters a token actually uses (k of E experts), for model-FLOPs accounting."""
        return (self.w_in.numel() + self.w_down.numel()) * top_k // self.num_experts
