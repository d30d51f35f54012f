"""The router interface: hidden states -> which experts process each row, and with what weight.

Every router returns a RouterOutput of static shapes, (T, E) for T rows and E experts, so that losses, metrics
and experts never depend on which router made it, and nothing in the forward pass needs a host-device sync or a
data-dependent Python branch:
  logits    raw router scores (float32): z-loss, domain loss
  probs     the routing distribution (softmax; for sigmoid routers the normalised scores): P_i of the
            balancing loss, entropy
  gates     combine weights, zero for experts that do not process the row
  selected  experts chosen before capacity limits: f_i of the balancing loss
  dropped   rows that lost a chosen expert to capacity (Switch), else None
Logits are computed in float32 with autocast off: bf16 logits make near-ties flip between steps.

Beyond `forward`, a router declares what the rest of the code needs from it, so nothing outside its own file
asks which router it is: `from_config`, `nominal_active_experts` (the FLOP count), `state_metrics` (logged
routing state, e.g. a balancing bias), and the balancing hooks `observe` / `after_optimizer_step` /
`extra_state` / `load_extra_state`, which default to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    logits: torch.Tensor
    probs: torch.Tensor
    gates: torch.Tensor
    selected: torch.Tensor
    dropped: torch.Tensor | None = None


class Router(nn.Module):
    """A linear scoring layer; subclasses turn scores into routing decisions."""

    max_active: int  # the most experts one row can use: bounds the grouped-dispatch buffer

    def __init__(self, hidden_size: int, num_experts: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=init_std)

    @classmethod
    def from_config(cls, hidden_size: int, moe) -> "Router":
        raise NotImplementedError

    @staticmethod
    def nominal_active_experts(moe) -> float:
        """Experts a row uses by design (the FLOP count's assumption); measured counts are in the metrics."""
        return float(moe.top_k)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 kept for gradcheck
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows_per_seq: int | None = None,
                generating: bool = False) -> RouterOutput:
        """x: (T, H) rows; mask: (T,) True for real rows; rows_per_seq: rows per sequence when the rows are (B, S)
        flattened (expert choice needs it); generating: routing one step of generation, where a router that
        needs the whole batch or sequence (capacity, expert choice) must route each row on its own."""
        raise NotImplementedError

    # ---- declared hooks (defaults: nothing) ----------------------------------------------------------------
    def state_metrics(self) -> dict[str, torch.Tensor]:
        """Routing state to log per layer (vectors per expert), e.g. a balancing bias."""
        return {}

    def observe(self, selected: torch.Tensor) -> None:
        """One micro-batch's (rows, E) selections, real rows only, during training."""

    def after_optimizer_step(self, reduce_sum) -> None:
        """Once per optimizer step; `reduce_sum(t)` sums a tensor over data-parallel ranks."""

    def extra_state(self) -> torch.Tensor | None:
        """State outside the state_dict that a checkpoint must keep (e.g. loads counted since the last step)."""
        return None

    def load_extra_state(self, state: torch.Tensor) -> None:
        pass


def scatter_gates(indices: torch.Tensor, values: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(*indices.shape[:-1], num_experts, device=values.device, dtype=values.dtype).scatter(
        -1, indices, values
    )


def top_k(probs: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates, selected) of the k most probable experts, renormalised to sum to 1 if `normalize`."""
    weights, indices = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    selected = scatter_gates(indices, torch.ones_like(weights), probs.shape[-1]).bool()
    return scatter_gates(indices, weights, probs.shape[-1]), selected
