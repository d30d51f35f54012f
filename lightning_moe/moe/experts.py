"""Expert forms. Each maps tokens x (T, H) and a dense gate matrix (T, E) to the block's expert output.

adapter    E small SwiGLU bottlenecks beside the frozen MLP (y = MLP(x) + sum_e g_e A_e(x)).
lora       per-expert LoRA deltas inside the frozen MLP's projections (LoRAMoE / MoLA style).
upcycled   E copies of the pretrained MLP replacing it (sparse upcycling), trained directly or via LoRA.
shared     always-on expert(s) beside the routed ones, optionally behind a sigmoid gate (Qwen2-MoE).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.moe.dispatch import HAS_GROUPED_MM, grouped_linear, sort_slots, swiglu_slots


class Experts(nn.Module):
    """The interface of an expert form, what MoEBlock (moe/layer.py), the FLOP count and export/ call; the form's
    torch-free declaration (replaces the MLP or adds to it, auto dispatch, export formats) is its ExpertForm in
    lightning_moe/config/registry.py.

    forward(x (T, H), gates (T, E), max_active, dispatch) -> (T, H): the experts' output for the block's tokens,
        gates zero for the experts a token does not use; max_active (the router's most experts a row) and dispatch
        (dense | grouped | loop, moe.dispatch) are hints a form may ignore. A form that adds to the MLP returns what
        the block adds to the MLP's output; one that replaces it returns the layer's output.
    flop_params(active) -> (frozen, trainable): the parameters one token multiplies through with `active` experts.
    wrapped_mlp: the layer's MLP where the experts call it themselves (LoRA experts), else None: what the block runs
        with experts switched off (evaluation's base model).
    expert_adapter(e) -> {projection: (A (r, in), B (out, r))}: expert e as a LoRA on the MLP's projections, scale
        folded into B; only forms that declare the per_domain export have it.
    """

    wrapped_mlp: nn.Module | None = None

    def flop_params(self, active: float) -> tuple[int, int]:
        raise NotImplementedError


def _uniform_fan_in(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # the bound nn.Linear and LoRA's A use
    return nn.init.uniform_(t, -bound, bound)


class SwiGLUExperts(Experts):
    """E SwiGLU experts stacked as (E, H, D) / (E, D, H) tensors.

    dispatch="dense": every expert on every token, weighted by its gate (zero if unselected): right for a
    few small adapters, no dispatch overhead. "grouped": only the selected (token, expert) slots, through
    grouped GEMMs (lightning_moe.moe.dispatch); "loop": the same slots with a per-expert loop (fallback
    where grouped_mm is missing).
    """

    def __init__(self, hidden_size: int, num_experts: int, expert_dim: int, act: Callable = F.silu,
                 zero_init_down: bool = True):
        super().__init__()
        self.num_experts, self.expert_dim, self.act = num_experts, expert_dim, act
        self.gate = nn.Parameter(_uniform_fan_in(torch.empty(num_experts, hidden_size, expert_dim), hidden_size))
        self.up = nn.Parameter(_uniform_fan_in(torch.empty(num_experts, hidden_size, expert_dim), hidden_size))
        down = torch.zeros(num_experts, expert_dim, hidden_size)
        self.down = nn.Parameter(down if zero_init_down else _uniform_fan_in(down, expert_dim))
        self.lora: nn.ParameterDict | None = None  # upcycled experts trained through LoRA
        self.lora_scale = 1.0

    @classmethod
    def from_mlp(cls, mlp: nn.Module, num_experts: int, noise: float = 0.0, train: str = "full",
                 lora_r: int = 8, lora_alpha: float = 16) -> "SwiGLUExperts":
        """Sparse upcycling: E copies of a Llama-style MLP (gate/up/down or Phi-3's fused gate_up), plus
        Gaussian noise of `noise` x each weight's std so the copies can diverge. train="full" trains the
        copies; "lora" freezes them and trains a rank-r LoRA per expert and projection."""
        weights = mlp_weights(mlp)
        frozen_dtype = weights[0].dtype if weights[0].is_floating_point() else torch.bfloat16
        gate, up, down = (w.float() for w in weights)
        hidden, inter = gate.shape[1], gate.shape[0]
        experts = cls(hidden, num_experts, inter, act=mlp_activation(mlp), zero_init_down=False)
        with torch.no_grad():
            for param, w in ((experts.gate, gate.t()), (experts.up, up.t()), (experts.down, down.t())):
                copies = w.unsqueeze(0).repeat(num_experts, 1, 1)
                if noise > 0:
                    copies += torch.randn_like(copies) * noise * w.std()
                param.data = copies.to(frozen_dtype if train == "lora" else torch.float32)  # trained copies: fp32
        if train == "lora":
            for p in (experts.gate, experts.up, experts.down):
                p.requires_grad_(False)
            experts.lora = nn.ParameterDict({
                "gate_A": nn.Parameter(_uniform_fan_in(torch.empty(num_experts, hidden, lora_r), hidden)),
                "gate_B": nn.Parameter(torch.zeros(num_experts, lora_r, inter)),
                "up_A": nn.Parameter(_uniform_fan_in(torch.empty(num_experts, hidden, lora_r), hidden)),
                "up_B": nn.Parameter(torch.zeros(num_experts, lora_r, inter)),
                "down_A": nn.Parameter(_uniform_fan_in(torch.empty(num_experts, inter, lora_r), inter)),
                "down_B": nn.Parameter(torch.zeros(num_experts, lora_r, hidden)),
            })
            experts.lora_scale = lora_alpha / lora_r
        return experts

    def forward(self, x: torch.Tensor, gates: torch.Tensor, max_active: int, dispatch: str = "dense") -> torch.Tensor:
        if dispatch == "dense" and self.lora is None:
            g = torch.einsum("th,ehd->ted", x, self.gate.to(x.dtype))
            u = torch.einsum("th,ehd->ted", x, self.up.to(x.dtype))
            h = self.act(g) * u * gates.to(x.dtype).unsqueeze(-1)
            return torch.einsum("ted,edh->th", h, self.down.to(x.dtype))
        slots = sort_slots(gates, max_active)
        grouped = dispatch != "loop" and HAS_GROUPED_MM and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        delta = None
        if self.lora is not None:

            def delta(name, inp):
                a = grouped_linear(inp, self.lora[f"{name}_A"], slots, grouped)
                return grouped_linear(a, self.lora[f"{name}_B"], slots, grouped) * self.lora_scale

        return swiglu_slots(x, self.gate, self.up, self.down, slots, self.act, grouped, delta).to(x.dtype)

    def flop_params(self, active: float) -> tuple[int, int]:
        """(frozen, trainable) parameters a token multiplies through with `active` experts."""
        base = (self.gate.numel() + self.up.numel() + self.down.numel()) // self.num_experts
        lora = sum(p.numel() for p in self.lora.values()) // self.num_experts if self.lora is not None else 0
        if self.gate.requires_grad:
            return 0, int((base + lora) * active)
        return int(base * active), int(lora * active)


def mlp_activation(mlp: nn.Module) -> Callable:
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if act is None:
        raise ValueError(f"{type(mlp).__name__} has no act_fn/activation_fn: not a gated (SwiGLU-style) MLP")
    return act


def _weight(linear: nn.Module) -> torch.Tensor:
    """The frozen weight of a (possibly peft-wrapped, possibly 4-bit) linear layer, dequantised."""
    base = getattr(linear, "base_layer", linear)
    w = base.weight
    if type(base).__name__ == "Linear4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    return w.data


def mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) weights in nn.Linear layout of a gated MLP (Llama/Mistral/Qwen2/Gemma or Phi-3)."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = _weight(mlp.gate_up_proj).chunk(2, dim=0)
    elif hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
        gate, up = _weight(mlp.gate_proj), _weight(mlp.up_proj)
    else:
        raise ValueError(f"{type(mlp).__name__}: expected gate_proj/up_proj/down_proj or gate_up_proj/down_proj")
    return gate, up, _weight(mlp.down_proj)


class LoRAExpertMLP(Experts):
    """The frozen MLP with per-expert LoRA deltas on its projections.

    Each delta is linear, so sum_e g_e B_e A_e x = B_stack ((g kron 1_r) * A_stack x): one rank-E*r product
    per projection, masked by the gates, with no gather/scatter and static shapes.
    """

    def __init__(self, mlp: nn.Module, num_experts: int, r: int, alpha: float, targets: list[str]):
        super().__init__()
        self.mlp, self.num_experts, self.r, self.scale = mlp, num_experts, r, alpha / r
        self.act = mlp_activation(mlp)
        self.fused = hasattr(mlp, "gate_up_proj")
        # models/prechecks.py checked them against the family's projections before any weights loaded; this only
        # guards a direct call (a projection may be wrapped by peft's LoRA by now: any module of that name)
        unknown = [t for t in targets if not isinstance(getattr(mlp, t, None), nn.Module)]
        assert not unknown, f"moe.lora_targets {unknown} not in {type(mlp).__name__}'s projections"
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        device = next(mlp.parameters()).device
        for name in targets:
            out_f, in_f = mlp_weights_shape(mlp, name)
            self.A[name] = nn.Parameter(_uniform_fan_in(torch.empty(num_experts * r, in_f, device=device), in_f))
            self.B[name] = nn.Parameter(torch.zeros(num_experts * r, out_f, device=device))

    def _delta(self, name: str, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor | float:
        if name not in self.A:
            return 0.0
        a = F.linear(x, self.A[name].to(x.dtype)) * gates.to(x.dtype).repeat_interleave(self.r, dim=-1)
        return (a @ self.B[name].to(x.dtype)) * self.scale

    @property
    def wrapped_mlp(self) -> nn.Module:
        return self.mlp

    def forward(self, x: torch.Tensor, gates: torch.Tensor, max_active: int | None = None,
                dispatch: str = "dense") -> torch.Tensor:
        """One masked low-rank product per projection whatever the dispatch (see the class docstring)."""
        m = self.mlp
        if self.fused:
            g, u = (m.gate_up_proj(x) + self._delta("gate_up_proj", x, gates)).chunk(2, dim=-1)
        else:
            g = m.gate_proj(x) + self._delta("gate_proj", x, gates)
            u = m.up_proj(x) + self._delta("up_proj", x, gates)
        h = self.act(g) * u
        return m.down_proj(h) + self._delta("down_proj", h, gates)

    def flop_params(self, active: float) -> tuple[int, int]:
        per_expert = sum(p.numel() for p in (*self.A.values(), *self.B.values())) // self.num_experts
        return 0, int(per_expert * active)

    def expert_adapter(self, expert: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Expert `expert`'s rows of the stacked A and B: a rank-r LoRA per projection, its scale folded into B."""
        rows = slice(expert * self.r, (expert + 1) * self.r)
        return {proj: (self.A[proj].detach().float().cpu()[rows],  # (r, in)
                       self.B[proj].detach().float().cpu()[rows].t() * self.scale)  # (out, r)
                for proj in self.A}


def mlp_weights_shape(mlp: nn.Module, name: str) -> tuple[int, int]:
    layer = getattr(getattr(mlp, name), "base_layer", getattr(mlp, name))
    return layer.out_features, layer.in_features


class SharedExpert(nn.Module):
    """An always-on SwiGLU expert (width num_shared * dim), optionally scaled by sigmoid(w_s . x) as in
    Qwen2-MoE. Zero-initialised output, like the routed adapters."""

    def __init__(self, hidden_size: int, dim: int, gated: bool):
        super().__init__()
        self.expert = SwiGLUExperts(hidden_size, 1, dim)
        self.gate = nn.Linear(hidden_size, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expert(x, torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype), 1)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x.to(self.gate.weight.dtype))).to(y.dtype)
        return y


# ---- builders, by moe.expert (lightning_moe/config/registry.py): (the layer's MLP, hidden size, moe section) ----
def adapter_experts(mlp: nn.Module, hidden_size: int, moe) -> nn.Module:
    return SwiGLUExperts(hidden_size, moe.num_experts, moe.expert_dim)


def lora_experts(mlp: nn.Module, hidden_size: int, moe) -> nn.Module:
    return LoRAExpertMLP(mlp, moe.num_experts, moe.lora_r, moe.lora_alpha, list(moe.lora_targets))


def upcycled_experts(mlp: nn.Module, hidden_size: int, moe) -> nn.Module:
    own = moe.upcycled  # config/expert_forms.py's UpcycledConfig
    return SwiGLUExperts.from_mlp(mlp, moe.num_experts, own.noise, own.train, moe.lora_r, moe.lora_alpha)
