"""The MoE block that takes a decoder layer's `mlp` slot.

    adapter:   y = MLP(x) + sum_e g_e(x) A_e(x)        [+ shared(x)]
    lora:      y = MLP_{W + sum_e g_e B_e A_e}(x)      [+ shared(x)]
    upcycled:  y = sum_e g_e(x) MLP_e(x)               [+ shared(x)]

Token-level routing decides per token. Sequence-level routing decides once per conversation from the mean
hidden state of its opening prompt (the tokens before the first assistant turn) and applies that decision to
all of its tokens; turn-level routing decides before each assistant turn from the conversation so far and
applies the decision to that turn (lightning_moe.data.collate.routing_units). Both are natural for domain
experts and causal-safe: every decision is taken from tokens that exist before the turn it routes, so training
and generation (where the reply is the last turn) route alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_moe.config.registry import EXPERTS, resolve
from lightning_moe.moe.experts import SharedExpert
from lightning_moe.moe.routers import Router, RouterOutput


@dataclass
class RouterRecord:
    """One block's routing of one forward pass, over its rows (tokens, or routing units when sequence/turn-level)."""

    layer: int
    out: RouterOutput
    mask: torch.Tensor  # (R,) real rows
    domain: torch.Tensor  # (R,) domain index per row, -1 unlabelled
    segments: torch.Tensor  # (R,) conversation index per row (-1 padding), for per-conversation losses
    num_segments: int
    router: Router
    # the token view (= the row view for token-level routing): what each token was dispatched to, for load
    # and domain metrics that count tokens whatever the routing level
    token_gates: torch.Tensor | None = None  # (T, E)
    token_mask: torch.Tensor | None = None
    token_domain: torch.Tensor | None = None


@dataclass
class GenerationRouting:
    """Routing metadata for generation (lightning_moe/generation/routing.py sets it), so that generating routes as
    training did. Positions are within each (left-padded) row of the prompt batch.

    prompt_units (B, P): the routing unit of each prompt token (-1 for padding); final_unit (B,): the unit of the
    reply being generated (every generated token belongs to it); unit_spans (U, 3): each unit's pooled tokens as
    (row, start, end). `offset` is the position of the current forward's first token, read from the KV cache
    before each forward: 0 for the prefill (or every step without a cache), > 0 for a cached decoding step, which
    reuses the decision taken at the prefill (`decisions`, per layer) instead of deciding again from one token.
    """

    prompt_units: torch.Tensor
    final_unit: torch.Tensor
    unit_spans: torch.Tensor
    offset: int = 0
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (U, E) unit gates
    reply_gates: dict[int, torch.Tensor] = field(default_factory=dict)  # token level: layer -> (B, E) summed gates

    def unit_ids(self, batch: int, seq: int, device) -> torch.Tensor:
        prompt_len = self.prompt_units.shape[1]
        pos = torch.arange(self.offset, self.offset + seq, device=device)
        inside = self.prompt_units.to(device)[:, pos.clamp(max=prompt_len - 1)]
        return torch.where(pos < prompt_len, inside, self.final_unit.to(device).unsqueeze(-1)).reshape(-1)


@dataclass
class RoutingContext:
    """Shared by the LightningModule (or a generator) and every MoE block of one model.

    The HF forward has no channel for per-token metadata or router outputs, so the caller writes the batch's
    token mask, domains, conversation segments and routing units here before the forward, and each block appends
    its router record. `recording` goes off after the forward so that activation-checkpoint recomputation during
    backward appends nothing. Without metadata every token counts as real and each batch row is one conversation
    and one routing unit (pooled whole). `experts_enabled=False` runs every MoE block as the base MLP (with peft's
    adapters disabled too, the base model: what evaluation compares against).
    """

    blocks: list = field(default_factory=list)  # the MoE blocks sharing this context (each adds itself)
    recording: bool = False
    token_mask: torch.Tensor | None = None  # (T,) bool
    token_domain: torch.Tensor | None = None  # (T,) long
    segments: torch.Tensor | None = None  # (T,) long, -1 for padding
    num_segments: int | None = None
    unit_ids: torch.Tensor | None = None  # (T,) long, -1 for padding
    unit_spans: torch.Tensor | None = None  # (U, 3) long: row, start, end
    unit_domain: torch.Tensor | None = None  # (U,) long
    unit_example: torch.Tensor | None = None  # (U,) long: the unit's conversation
    packed: bool = False
    generation: GenerationRouting | None = None
    experts_enabled: bool = True
    forced_expert: int | None = None  # sequence/turn levels: route every unit to this expert (inference only)
    tied_gates: torch.Tensor | None = None  # moe.tied_router: the deciding (first) block's unit gates, this forward

    def start_batch(self, batch: dict) -> None:
        """Before a forward pass over a collated batch (lightning_moe.data.collate): its routing metadata."""
        self.start(
            token_mask=batch["segment_ids"].reshape(-1) >= 0,  # real tokens: padding is segment -1 in both forms
            token_domain=batch["token_domain"].reshape(-1),
            segments=batch["segment_ids"].reshape(-1),
            num_segments=batch["num_examples"],
            unit_ids=batch["unit_ids"].reshape(-1),
            unit_spans=batch["unit_spans"],
            unit_domain=batch["unit_domain"],
            unit_example=batch["unit_example"],
            packed="position_ids" in batch,
        )

    def start(self, token_mask=None, token_domain=None, segments=None, num_segments=None, unit_ids=None,
              unit_spans=None, unit_domain=None, unit_example=None, packed=False) -> None:
        for block in self.blocks:
            block.pending.clear()
        self.recording = True
        self.token_mask, self.token_domain, self.segments = token_mask, token_domain, segments
        self.num_segments, self.packed = num_segments, packed
        self.unit_ids, self.unit_spans, self.unit_domain, self.unit_example = unit_ids, unit_spans, unit_domain, unit_example

    def stop(self) -> list[RouterRecord]:
        """This forward's router records, in depth order. Each block keeps its own until here (not one shared
        list): under model.compile a shared list's length would be guarded, one recompile per layer."""
        self.recording = False
        return [RouterRecord(block.layer_idx, out, *rows, num_segments, block.router, *token_view)
                for block in self.blocks for out, rows, num_segments, token_view in block.pending]

    def metadata(self, batch: int, seq: int, device) -> dict:
        """This forward's routing metadata; defaulted where the caller set none (then every token is real, and
        each batch row is one conversation and one unit, pooled whole)."""
        t = batch * seq
        if self.token_mask is not None and self.token_mask.numel() == t:
            return {"mask": self.token_mask, "domain": self.token_domain, "segments": self.segments,
                    "num_segments": self.num_segments, "unit_ids": self.unit_ids, "unit_spans": self.unit_spans,
                    "unit_domain": self.unit_domain, "unit_example": self.unit_example}
        rows = torch.arange(batch, device=device)
        meta = {"mask": torch.ones(t, dtype=torch.bool, device=device), "domain": torch.full((t,), -1, device=device),
                "segments": rows.repeat_interleave(seq), "num_segments": batch}
        if self.generation is not None:
            g = self.generation
            spans, units = g.unit_spans.to(device), g.unit_ids(batch, seq, device)
        else:
            spans = torch.stack([rows, torch.zeros_like(rows), torch.full_like(rows, seq)], dim=-1)
            units = meta["segments"]
        num_units = spans.shape[0]
        return meta | {"unit_ids": units, "unit_spans": spans, "unit_domain": torch.full((num_units,), -1, device=device),
                       "unit_example": spans[:, 0]}


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
    def __init__(self, mlp: nn.Module, router: Router, experts: nn.Module, form: str, layer_idx: int,
                 context: RoutingContext, level: str = "token", dispatch: str = "dense",
                 shared: SharedExpert | None = None, tied: str = "none", input_norm: bool = False):
        super().__init__()
        self.form, self.level, self.dispatch, self.layer_idx = form, level, dispatch, layer_idx
        self.input_norm = input_norm  # moe.router_input_norm: the router reads RMS-normalised rows
        # moe.tied_router: the first MoE block decides ("leads") and the later ones apply its decision ("follows"), so
        # one conversation goes to one expert index in every layer; a follower's own router is unused (frozen)
        self.tied = tied
        # upcycled experts replace the MLP: keeping it would leave its LoRA weights without gradients
        self.mlp = None if form in ("upcycled", "lora") else mlp
        self.router, self.experts, self.shared = router, experts, shared
        self._context = [context]  # a list so nn.Module does not register or copy it as state
        context.blocks.append(self)
        self.pending: list[tuple] = []  # this forward's routing, until context.stop() makes it records

    @property
    def context(self) -> RoutingContext:
        return self._context[0]

    def base_mlp(self) -> nn.Module | None:
        """The layer's own MLP, without experts (None for upcycled experts, which replaced it)."""
        return self.experts.mlp if self.form == "lora" else self.mlp

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
        elif ctx.forced_expert is not None:
            out, unit_gates = None, self._forced(meta["unit_spans"].shape[0], x.device)
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

    def _forced(self, units: int, device) -> torch.Tensor:
        gates = torch.zeros(units, self.router.num_experts, device=device)
        gates[:, self.context.forced_expert] = 1.0
        return gates

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.context
        if not ctx.experts_enabled and self.base_mlp() is not None:
            return self.base_mlp()(x, *args, **kwargs)
        batch, seq = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        flat = x.reshape(-1, x.shape[-1])
        meta = ctx.metadata(batch, seq, x.device)
        out, gates, rows = self._route(x, flat, meta)
        if self.form == "lora":
            y = self.experts(flat, gates)
        else:
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
                hidden_size: int) -> MoEBlock:
    """The MoE block for one layer, from the moe config section; the experts come from the builder that
    lightning_moe/config/registry.py names for moe.expert."""
    experts = resolve(EXPERTS[moe.expert])(mlp, hidden_size, moe)
    shared = None
    if moe.num_shared_experts > 0:
        shared = SharedExpert(hidden_size, moe.num_shared_experts * (moe.shared_expert_dim or moe.expert_dim),
                              moe.shared_expert_gate)
    dispatch = moe.dispatch if moe.dispatch != "auto" else ("grouped" if moe.expert == "upcycled" else "dense")
    device = next(mlp.parameters()).device
    block = MoEBlock(mlp, router, experts, moe.expert, layer_idx, context, moe.routing_level, dispatch, shared,
                     input_norm=moe.router_input_norm)
    for part in (block.router, block.shared, None if moe.expert == "lora" else block.experts):  # lora: made in place
        if part is not None:
            part.to(device)
    return block
