"""The MoE block that replaces a decoder layer's `mlp`: y = mlp(x) + sum_e g_e(x) * expert_e(x)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_moe.moe.experts import AdapterExperts
from lightning_moe.moe.routing import TopKRouter


@dataclass
class RouterRecord:
    layer: int
    logits: torch.Tensor  # (T, E) float32, with graph
    indices: torch.Tensor  # (T, k)


@dataclass
class RoutingContext:
    """Shared by the LightningModule and every MoE block of one model.

    The HF forward has no channel for router outputs or per-token domain labels, so the module writes the
    batch's token mask and domains here before the forward, and each block appends its router record.
    `recording` is switched off after the forward so that activation-checkpoint recomputation during
    backward does not append a second copy.
    """

    records: list[RouterRecord] = field(default_factory=list)
    recording: bool = False

    def start(self) -> None:
        self.records.clear()
        self.recording = True

    def stop(self) -> list[RouterRecord]:
        self.recording = False
        return list(self.records)


class MoEBlock(nn.Module):
    """Wraps a (frozen, possibly LoRA-adapted) MLP and adds routed experts beside it."""

    def __init__(
        self,
        mlp: nn.Module,
        hidden_size: int,
        layer_idx: int,
        context: RoutingContext,
        num_experts: int,
        top_k: int,
        expert_dim: int,
        router_init_std: float = 0.02,
    ):
        super().__init__()
        self.mlp = mlp
        self.layer_idx = layer_idx
        self.router = TopKRouter(hidden_size, num_experts, top_k, router_init_std)
        self.experts = AdapterExperts(hidden_size, num_experts, expert_dim)
        self._context = [context]  # a list so nn.Module does not register or deep-copy it as state

    @property
    def context(self) -> RoutingContext:
        return self._context[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.mlp(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, indices = self.router(flat)
        gates = torch.zeros_like(logits).scatter(1, indices, weights)
        delta = self.experts(flat, gates)
        ctx = self.context
        if ctx.recording:
            ctx.records.append(RouterRecord(self.layer_idx, logits, indices))
        return out + delta.view_as(out).to(out.dtype)
