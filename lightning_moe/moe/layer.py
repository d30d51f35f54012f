"""The MoE block that takes a decoder layer's `mlp` slot.

    adapter:   y = MLP(x) + sum_e g_e(x) A_e(x)        [+ shared(x)]
    lora:      y = MLP_{W + sum_e g_e B_e A_e}(x)      [+ shared(x)]
    upcycled:  y = sum_e g_e(x) MLP_e(x)               [+ shared(x)]

Token-level routing decides per token; sequence-level routing decides once per conversation from the mean
hidden state of its opening prompt (the tokens before the first assistant turn) and applies that decision
to all of its tokens. Natural for domain experts (a conversation has one domain), and causal-safe: at
inference the whole prompt exists before generation starts, so training and generation route alike.
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
    """One block's routing of one forward pass, over its rows (tokens, or sequences when sequence-level)."""

    layer: int
    out: RouterOutput
    mask: torch.Tensor  # (R,) real rows
    domain: torch.Tensor  # (R,) domain index per row, -1 unlabelled
    segments: torch.Tensor  # (R,) conversation index per row (-1 padding), for per-sample losses
    num_segments: int
    router: Router
    # the token view (= the row view for token-level routing): what each token was dispatched to, for load
    # and domain metrics that count tokens whatever the routing level
    token_gates: torch.Tensor | None = None  # (T, E)
    token_mask: torch.Tensor | None = None
    token_domain: torch.Tensor | None = None


@dataclass
class RoutingContext:
    """Shared by the LightningModule and every MoE block of one model.

    The HF forward has no channel for per-token metadata or router outputs, so the module writes the batch's
    token mask, domains and conversation segments here before the forward, and each block appends its
    router record. `recording` goes off after the forward so that activation-checkpoint recomputation
    during backward appends nothing. Without metadata (e.g. generation) every token counts as real and
    each batch row as one conversation.
    """

    records: list[RouterRecord] = field(default_factory=list)
    recording: bool = False
    token_mask: torch.Tensor | None = None  # (T,) bool
    token_domain: torch.Tensor | None = None  # (T,) long
    segments: torch.Tensor | None = None  # (T,) long, -1 for padding
    num_segments: int | None = None
    segment_domain: torch.Tensor | None = None  # (num_segments,) long
    pool_mask: torch.Tensor | None = None  # (T,) bool: the tokens sequence-level routing pools (the prompt)
    packed: bool = False

    def start_batch(self, batch: dict) -> None:
        """Before a forward pass over a collated batch (lightning_moe.data.collate): its routing metadata."""
        self.start(
            token_mask=batch["segment_ids"].reshape(-1) >= 0,  # real tokens: padding is segment -1 in both forms
            token_domain=batch["token_domain"].reshape(-1),
            segments=batch["segment_ids"].reshape(-1),
            num_segments=batch["num_examples"],
            segment_domain=batch["example_domain"],
            pool_mask=batch["prompt_mask"].reshape(-1),
            packed="position_ids" in batch,
        )

    def start(self, token_mask=None, token_domain=None, segments=None, num_segments=None, segment_domain=None,
              pool_mask=None, packed=False) -> None:
        self.records.clear()
        self.recording = True
        self.token_mask, self.token_domain, self.segments = token_mask, token_domain, segments
        self.num_segments, self.segment_domain, self.packed = num_segments, segment_domain, packed
        self.pool_mask = pool_mask

    def stop(self) -> list[RouterRecord]:
        self.recording = False
        return list(self.records)

    def metadata(self, batch: int, seq: int, device) -> tuple:
        """(mask, domain, segments, num_segments, segment_domain, pool_mask), defaulted when the module set
        none (then every token is real and pooled, and each batch row is one conversation)."""
        t = batch * seq
        if self.token_mask is not None and self.token_mask.numel() == t:
            pool = self.pool_mask if self.pool_mask is not None else self.token_mask
            return self.token_mask, self.token_domain, self.segments, self.num_segments, self.segment_domain, pool
        ones = torch.ones(t, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device).repeat_interleave(seq)
        return ones, torch.full((t,), -1, device=device), rows, batch, torch.full((batch,), -1, device=device), ones


def segment_mean(x: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of x's rows per conversation; padding rows (segment -1) are left out."""
    real = (segments >= 0).to(x.dtype).unsqueeze(-1)
    idx = segments.clamp(min=0)
    sums = torch.zeros(num_segments, x.shape[-1], device=x.device, dtype=x.dtype).index_add(0, idx, x * real)
    counts = torch.zeros(num_segments, 1, device=x.device, dtype=x.dtype).index_add(0, idx, real)
    return sums / counts.clamp(min=1)


class MoEBlock(nn.Module):
    def __init__(self, mlp: nn.Module, router: Router, experts: nn.Module, form: str, layer_idx: int,
                 context: RoutingContext, level: str = "token", dispatch: str = "dense",
                 shared: SharedExpert | None = None):
        super().__init__()
        self.form, self.level, self.dispatch, self.layer_idx = form, level, dispatch, layer_idx
        # upcycled experts replace the MLP: keeping it would leave its LoRA weights without gradients
        self.mlp = None if form == "upcycled" else (None if form == "lora" else mlp)
        self.router, self.experts, self.shared = router, experts, shared
        self._context = [context]  # a list so nn.Module does not register or copy it as state

    @property
    def context(self) -> RoutingContext:
        return self._context[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch, seq = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        flat = x.reshape(-1, x.shape[-1])
        ctx = self.context
        mask, domain, segments, num_segments, segment_domain, pool = ctx.metadata(batch, seq, x.device)
        if self.level == "sequence":
            pooled = segment_mean(flat, torch.where(pool, segments, -1), num_segments)
            out = self.router(pooled, torch.ones(num_segments, dtype=torch.bool, device=x.device))
            gates = out.gates[segments.clamp(min=0)] * mask.unsqueeze(-1)
            rows = (torch.ones_like(segment_domain, dtype=torch.bool), segment_domain, torch.arange(num_segments, device=x.device))
        else:
            out = self.router(flat, mask, None if ctx.packed else seq)
            gates = out.gates
            rows = (mask, domain, segments)
        if self.form == "lora":
            y = self.experts(flat, gates)
        else:
            y = self.experts(flat, gates, self.router.max_active, self.dispatch).to(flat.dtype)
        if self.shared is not None:
            y = y + self.shared(flat)
        if ctx.recording:
            ctx.records.append(RouterRecord(self.layer_idx, out, *rows, num_segments, self.router, gates, mask, domain))
        y = y.view_as(x)
        return y if self.mlp is None else self.mlp(x, *args, **kwargs) + y

    def flop_params(self, active: float) -> tuple[int, int]:
        """(frozen, trainable) parameters one token multiplies through in this block's routed part, when
        `active` experts process it: the FLOP count's N and P contributions. LoRA experts' frozen MLP is
        counted with the other frozen linear layers."""
        frozen, trainable = self.experts.flop_params(active)
        trainable += self.router.weight.numel()
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
    block = MoEBlock(mlp, router, experts, moe.expert, layer_idx, context, moe.routing_level, dispatch, shared)
    for part in (block.router, block.shared, None if moe.expert == "lora" else block.experts):  # lora: made in place
        if part is not None:
            part.to(device)
    return block
