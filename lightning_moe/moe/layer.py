"""The MoE block that takes a decoder layer's `mlp` slot.

    adapter:   y = MLP(x) + sum_e g_e(x) A_e(x)        [+ shared(x)]
    lora:      y = MLP_{W + sum_e g_e B_e A_e}(x)      [+ shared(x)]
    upcycled:  y = sum_e g_e(x) MLP_e(x)               [+ shared(x)]

The block knows an expert form only through its declaration (config/registry.py's ExpertForm: does it replace the
MLP, what auto dispatch means) and its module's interface (moe/experts.py's Experts): no form is named here.

Token-level routing decides per token. Sequence-level routing decides once per conversation from the mean
hidden state of its opening prompt (the tokens before the first assistant turn) and applies that decision to
all of its tokens; turn-level routing decides before each assistant turn from the conversation so far and
applies the decision to that turn (lightning_moe.data.collate.routing_units). Both are natural for domain
experts and causal-safe: every decision is taken from tokens that exist before the turn it routes, so training
and generation (where the reply is the last turn) route alike. The routing state the blocks share (what the
caller writes before a forward, the records they leave) is in moe/routing.py.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_moe.config.registry import EXPERTS, resolve
from lightning_moe.moe.experts import Experts, SharedExpert
from lightning_moe.moe.routers import Router, RouterOutput
# the routing state the blocks read and record into (its own module); importable from here as before
from lightning_moe.moe.routing import GenerationRouting, RouterRecord, RoutingContext  # noqa: F401


def span_mean(x: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """x (B, S, H); spans (U, 3) of (row, start, end) -> the (U, H) mean of each span's rows, in float32 (float64
    kept). Prefix sums along each row: a span's mean does not depend on the row's length or on later tokens, so
    the prefill of a prompt and a full recompute with generated tokens appended pool the same values."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = torch.nn.functional.pad(x.to(acc).cumsum(1), (0, 0, 1, 0))  # (B, S + 1, H): c[:, j] = sum of x[:, :j]
    row, start, end = spans.unbind(-1)
    return (c[row, end] - c[row, start]) / (end - start).clamp(min=1).unsqueeze(-1).to(acc)


def rms_normalise(rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each row scaled to unit root-mean-square (no learned gain): what moe.router_input_norm gives the router."""
    return rows * torch.rsqrt(rows.float().pow(2).mean(-1, keepdim=True) + eps).to(rows.dtype)


class MoEBlock(nn.Module):
    def __init__(self, mlp: nn.Module, router: Router, experts: Experts, replaces_mlp: bool, layer_idx: int,
                 context: RoutingContext, level: str = "token", dispatch: str = "dense",
                 shared: SharedExpert | None = None, tied: str = "none", input_norm: bool = False):
        super().__init__()
        self.level, self.dispatch, self.layer_idx = level, dispatch, layer_idx
        self.input_norm = input_norm  # moe.router_input_norm: the router reads RMS-normalised rows
        # moe.tied_router: the first MoE block decides ("leads") and the later ones apply its decision ("follows"), so
        # one conversation goes to one expert index in every layer; a follower's own router is unused (frozen)
        self.tied = tied
        if tied == "follows":
            router.requires_grad_(False)
        # a form that replaces the MLP (wraps it, or copies it): keeping it here would call it twice, or leave its
        # LoRA weights without gradients
        self.mlp = None if replaces_mlp else mlp
        self.router, self.experts, self.shared = router, experts, shared
        self._context = [context]  # a list so nn.Module does not register or copy it as state
        context.blocks.append(self)
        self.pending: list[tuple] = []  # this forward's routing, until context.stop() makes it records

    @property
    def context(self) -> RoutingContext:
        return self._context[0]

    def base_mlp(self) -> nn.Module | None:
        """The layer's own MLP, without experts (None where the experts replaced it by copies: upcycled)."""
        return self.mlp if self.mlp is not None else self.experts.wrapped_mlp

    def _route(self, x: torch.Tensor, flat: torch.Tensor, meta: dict) -> tuple[RouterOutput | None, torch.Tensor, tuple]:
        """(router output or None for a cached decoding step, per-token gates (T, E), the record's rows)."""
        ctx, gen = self.context, self.context.generation
        if self.level == "token":
            out = self.router(self._router_input(flat), meta["mask"], None if ctx.packed else x.shape[-2],
                              generating=gen is not None)
            if gen is not None and gen.offset > 0:  # a reply token (cached step): what generation reports
                per_row = out.gates.detach().float().view(x.shape[0], -1, out.gates.shape[-1]).sum(1)
                gen.reply_gates[self.layer_idx] = gen.reply_gates.get(self.layer_idx, 0) + per_row
            return out, out.gates, (meta["mask"], meta["domain"], meta["segments"])
        if self.tied == "follows":
            out, unit_gates = None, ctx.tied_gates
        elif gen is not None and gen.offset > 0:  # a cached step: the decision taken at the prefill holds
            out, unit_gates = None, gen.decisions[self.layer_idx]
        else:
            spans = meta["unit_spans"]
            pooled = span_mean(x.reshape(-1, x.shape[-2], x.shape[-1]), spans)
            out = self.router(self._router_input(pooled), torch.ones(spans.shape[0], dtype=torch.bool, device=x.device),
                              generating=gen is not None)
            unit_gates = out.gates
        if gen is not None and self.tied != "follows":
            gen.decisions[self.layer_idx] = unit_gates.detach()
        if self.tied == "leads":
            ctx.tied_gates = unit_gates
        gates = unit_gates[meta["unit_ids"].clamp(min=0)] * meta["mask"].unsqueeze(-1)
        ones = torch.ones(unit_gates.shape[0], dtype=torch.bool, device=x.device)
        return out, gates, (ones, meta["unit_domain"], meta["unit_example"])

    def _router_input(self, rows: torch.Tensor) -> torch.Tensor:
        return rms_normalise(rows) if self.input_norm else rows

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.context
        if not ctx.experts_enabled and self.base_mlp() is not None:
            return self.base_mlp()(x, *args, **kwargs)
        batch, seq = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        flat = x.reshape(-1, x.shape[-1])
        meta = ctx.metadata(batch, seq, x.device)
        out, gates, rows = self._route(x, flat, meta)
        y = self.experts(flat, gates, self.router.max_active, self.dispatch).to(flat.dtype)
        if self.shared is not None:
            y = y + self.shared(flat)
        if ctx.recording and out is not None:
            self.pending.append((out, rows, meta["num_segments"], (gates, meta["mask"], meta["domain"])))
        y = y.view_as(x)
        return y if self.mlp is None else self.mlp(x, *args, **kwargs) + y

    def flop_params(self, active: float) -> tuple[int, int]:
        """(frozen, trainable) parameters one token multiplies through in this block's routed part, when
        `active` experts process it: the FLOP count's N and P contributions. LoRA experts' frozen MLP is
        counted with the other frozen linear layers."""
        frozen, trainable = self.experts.flop_params(active)
        trainable += self.router.weight.numel() if self.tied != "follows" else 0  # a follower uses the first decision
        if self.shared is not None:
            trainable += sum(p.numel() for p in self.shared.parameters())
        return frozen, trainable


def build_block(mlp: nn.Module, router: Router, layer_idx: int, context: RoutingContext, moe,
                hidden_size: int, tied: str = "none") -> MoEBlock:
    """The MoE block for one layer, from the moe config section; the experts come from the builder that
    lightning_moe/config/registry.py's ExpertForm names for moe.expert."""
    form = EXPERTS[moe.expert]
    experts = resolve(form.builder)(mlp, hidden_size, moe)
    shared = None
    if moe.num_shared_experts > 0:
        shared = SharedExpert(hidden_size, moe.num_shared_experts * (moe.shared_expert_dim or moe.expert_dim),
                              moe.shared_expert_gate)
    dispatch = moe.dispatch if moe.dispatch != "auto" else form.dispatch
    device = next(mlp.parameters()).device
    block = MoEBlock(mlp, router, experts, form.replaces_mlp, layer_idx, context, moe.routing_level, dispatch, shared,
                     tied, input_norm=moe.router_input_norm)
    # experts that wrap the MLP are built on its device: moving them would move the MLP they hold
    for part in (block.router, block.shared, None if experts.wrapped_mlp is not None else block.experts):
        if part is not None:
            part.to(device)
    return block
