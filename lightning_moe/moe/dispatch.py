"""Running only the selected experts: sort token slots by expert -> grouped GEMM -> weighted scatter back.

For experts as large as the model's MLP (upcycled), computing every expert for every token costs E times
the FLOPs; dispatch computes each (token, expert) slot once. Shapes stay static: a row uses at most
`max_active` slots, unused slots are given the index E, sort to the end and lie past the last group
offset, where grouped_mm does not compute. Its output there is uninitialised, and so is its backward's
input gradient there: every grouped GEMM's input and output are masked with `where` (never multiplied:
the garbage can be inf or NaN), so nothing from those rows reaches a token in either direction.
No .item(), no bincount (which syncs on CUDA): counts come from scatter_add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


@dataclass
class Slots:
    """A batch's (token, expert) slots sorted by expert."""

    token: torch.Tensor  # (T*K,) the token of each sorted slot
    expert: torch.Tensor  # (T*K,) its expert; num_experts for an unused slot
    weight: torch.Tensor  # (T*K,) its gate
    offsets: torch.Tensor  # (E,) int32 cumulative slot counts: grouped_mm's group ends
    num_tokens: int

    @property
    def valid(self) -> torch.Tensor:
        return (self.expert < self.offsets.numel()).unsqueeze(-1)


def sort_slots(gates: torch.Tensor, max_active: int) -> Slots:
    """gates (T, E), at most max_active non-zero per row -> slots sorted by expert (stable: token order kept)."""
    num_tokens, num_experts = gates.shape
    k = min(max_active, num_experts)
    weight, expert = gates.topk(k, dim=-1)
    expert = torch.where(weight > 0, expert, num_experts).reshape(-1)
    order = expert.argsort(stable=True)
    counts = torch.zeros(num_experts + 1, device=gates.device, dtype=torch.int64)
    counts = counts.scatter_add(0, expert, torch.ones_like(expert))
    offsets = counts[:num_experts].cumsum(0).to(torch.int32)
    return Slots(order // k, expert[order], weight.reshape(-1)[order], offsets, num_tokens)


def combine(slots: Slots, y: torch.Tensor) -> torch.Tensor:
    """Weighted scatter of per-slot outputs back to tokens, summed in float32 (order-independent enough to
    match the dense path in tests)."""
    y = torch.where(slots.valid, y, 0).float() * slots.weight.float().unsqueeze(-1)
    out = torch.zeros(slots.num_tokens, y.shape[-1], device=y.device, dtype=torch.float32)
    return out.index_add(0, slots.token, y)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, slots: Slots, grouped: bool = True) -> torch.Tensor:
    """Per-slot x @ w[expert]: x (T*K, in) sorted like the slots, w (E, in, out).

    grouped: one grouped GEMM. Otherwise the loop fallback: each expert's matmul over all slots, kept where
    the slot is that expert's (E times the FLOPs, but no data-dependent shapes and no sync)."""
    if grouped:
        x = torch.where(slots.valid, x, 0)  # blocks the backward's uninitialised rows from the upstream gradient
        return torch.where(slots.valid, _grouped_mm(x, w.to(x.dtype), slots.offsets), 0)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for e in range(w.shape[0]):
        out = torch.where((slots.expert == e).unsqueeze(-1), x @ w[e].to(x.dtype), out)
    return out


def swiglu_slots(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, slots: Slots,
                 act: Callable = F.silu, grouped: bool = True, delta: Callable | None = None) -> torch.Tensor:
    """act(x W_g) * (x W_u) W_d per slot; `delta(name, inp)` adds per-expert LoRA terms (upcycled + LoRA)."""
    xs = x[slots.token]
    g = grouped_linear(xs, gate, slots, grouped)
    u = grouped_linear(xs, up, slots, grouped)
    if delta is not None:
        g, u = g + delta("gate", xs), u + delta("up", xs)
    h = torch.where(slots.valid, act(g) * u, 0)
    y = grouped_linear(h, down, slots, grouped)
    if delta is not None:
        y = y + delta("down", h)
    return combine(slots, y)
