"""Routers: hidden states -> which experts process each token, and with what weight.

Every router returns a RouterOutput of static shapes, (T, E) for T rows and E experts, so that losses,
metrics and experts never depend on which router made it, and nothing in the forward pass needs a
host-device sync or a data-dependent Python branch:
  logits    raw router scores (float32): z-loss, domain loss
  probs     the routing distribution (softmax; for sigmoid routers the normalised scores): P_i of the
            balancing loss, entropy
  gates     combine weights, zero for experts that do not process the row
  selected  experts chosen before capacity limits: f_i of the balancing loss
  dropped   rows that lost a chosen expert to capacity (Switch), else None

Logits are computed in float32 with autocast off: bf16 logits make near-ties flip between steps.
"""

from __future__ import annotations

import math
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

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 kept for gradcheck
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows_per_seq: int | None = None) -> RouterOutput:
        """x: (T, H) rows; mask: (T,) True for real rows; rows_per_seq: rows per sequence when the rows are
        (B, S) flattened (expert choice needs it)."""
        raise NotImplementedError


def _scatter(indices: torch.Tensor, values: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(*indices.shape[:-1], num_experts, device=values.device, dtype=values.dtype).scatter(
        -1, indices, values
    )


class TopKRouter(Router):
    """Mixtral: softmax over all experts, keep the top k, renormalise them to sum to 1."""

    def __init__(self, hidden_size, num_experts, top_k, init_std=0.02, normalize=True):
        super().__init__(hidden_size, num_experts, init_std)
        self.top_k, self.normalize, self.max_active = top_k, normalize, top_k

    def forward(self, x, mask, rows_per_seq=None):
        logits = self.scores(x)
        probs = logits.softmax(-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        selected = _scatter(indices, torch.ones_like(weights), self.num_experts).bool()
        return RouterOutput(logits, probs, _scatter(indices, weights, self.num_experts), selected)


class SwitchRouter(Router):
    """Switch Transformer: top-1, each expert takes at most C = capacity_factor * real tokens / E tokens.

    Tokens past an expert's capacity (in row order) are dropped: their expert output is zero, so the MoE
    block passes them through the residual path (and the frozen MLP); they are counted in `dropped`.
    Padding never takes capacity.
    """

    def __init__(self, hidden_size, num_experts, capacity_factor=1.25, init_std=0.02):
        super().__init__(hidden_size, num_experts, init_std)
        self.capacity_factor, self.max_active = capacity_factor, 1

    def forward(self, x, mask, rows_per_seq=None):
        logits = self.scores(x)
        probs = logits.softmax(-1)
        top, index = probs.max(-1)
        choice = F.one_hot(index, self.num_experts).bool()
        real = choice & mask.unsqueeze(-1)
        position = real.long().cumsum(0)  # 1-based place in its expert's queue, in row order
        capacity = torch.ceil(self.capacity_factor * mask.sum() / self.num_experts)
        kept = real & (position <= capacity)
        dropped = mask & ~kept.any(-1)
        return RouterOutput(logits, probs, kept * top.unsqueeze(-1), choice, dropped)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert picks its top-c tokens, c = ceil(capacity_factor * n / E)
    for a sequence of n real tokens, among that sequence's real tokens (so capacity_factor experts per token
    on average). Shapes stay static: the top-c of the padded length is taken, and ranks past a sequence's own
    c are dropped.

    Causal-LM caveat: an expert's choice at position t depends on later tokens of the same sequence, which
    do not exist when generating. Training routes by the whole sequence; generation has to route each new
    token some other way (e.g. top-k on the same scores), so train and inference differ. Within a sequence
    only: across the batch one sequence's tokens would change another's routing. Needs padded batches.
    """

    def __init__(self, hidden_size, num_experts, capacity_factor=2.0, init_std=0.02):
        super().__init__(hidden_size, num_experts, init_std)
        self.capacity_factor, self.max_active = capacity_factor, num_experts

    def forward(self, x, mask, rows_per_seq=None):
        if rows_per_seq is None:
            raise ValueError("expert choice routes within a sequence: it needs rows as (batch, seq), not packed rows")
        logits = self.scores(x)
        probs = logits.softmax(-1)
        seq = probs.view(-1, rows_per_seq, self.num_experts)  # (B, S, E)
        m = mask.view(-1, rows_per_seq, 1)
        c_max = max(1, min(rows_per_seq, math.ceil(self.capacity_factor * rows_per_seq / self.num_experts)))
        n = m.sum(1, keepdim=True)  # (B, 1, 1) real tokens per sequence
        c = torch.ceil(self.capacity_factor * n / self.num_experts).clamp(max=n)
        top, idx = seq.masked_fill(~m, -1.0).topk(c_max, dim=1)  # (B, c_max, E): each expert's best tokens
        rank = torch.arange(c_max, device=x.device).view(1, -1, 1)
        keep = (rank < c) & (top >= 0)
        chosen = torch.zeros_like(seq).scatter(1, idx, keep.to(seq.dtype)).bool() & m
        gates = (seq * chosen).view(-1, self.num_experts)
        selected = chosen.view(-1, self.num_experts)
        return RouterOutput(logits, probs, gates, selected)


class DynamicRouter(Router):
    """Dynamic expert counts (Huang et al. 2024, "Harder tasks need more experts").

    top_p: sort the softmax probabilities, keep the shortest prefix whose sum reaches p (the crossing expert
    included); threshold: keep every expert with probability >= threshold. Either way at least `min_experts`
    and at most `max_experts`. Gates are the probabilities themselves (no renormalisation), so a confident
    token uses few experts. Pair with moe.entropy_coef: otherwise the router can lower loss by spreading
    its mass to switch on every expert.
    """

    def __init__(self, hidden_size, num_experts, mode="top_p", p=0.5, threshold=0.25, min_experts=1,
                 max_experts=None, init_std=0.02):
        super().__init__(hidden_size, num_experts, init_std)
        self.mode, self.p, self.threshold = mode, p, threshold
        self.min_experts, self.max_experts = min_experts, max_experts or num_experts
        self.max_active = self.max_experts

    def forward(self, x, mask, rows_per_seq=None):
        logits = self.scores(x)
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        rank = torch.arange(self.num_experts, device=x.device)
        if self.mode == "top_p":
            keep = (sorted_p.cumsum(-1) - sorted_p) < self.p  # mass before this expert is still short of p
        else:
            keep = sorted_p >= self.threshold
        count = keep.sum(-1, keepdim=True).clamp(self.min_experts, self.max_experts)
        keep_sorted = rank < count
        selected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return RouterOutput(logits, probs, probs * selected, selected)


class DeepSeekRouter(Router):
    """DeepSeek-V3: sigmoid affinities s; experts chosen by s + b, where b is a balancing bias outside the
    gradient; optional grouped selection (score each group by the sum of its top-2, keep `topk_group`
    groups); weights are the unbiased s of the chosen experts, renormalised if norm_topk_prob, times
    routed_scaling_factor.

    Auxiliary-loss-free balancing: `record_load` adds each optimizer step's token counts (summed over
    micro-batches; the module sums them over data-parallel ranks), then `update_bias` moves b by
    rate * sign(mean load - load), so over-used experts become less likely to be chosen.
    """

    def __init__(self, hidden_size, num_experts, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                 routed_scaling_factor=1.0, init_std=0.02):
        super().__init__(hidden_size, num_experts, init_std)
        self.top_k, self.max_active = top_k, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))  # saved in checkpoints
        self.pending_load = torch.zeros(num_experts)  # not a buffer: DDP would overwrite it from rank 0

    def forward(self, x, mask, rows_per_seq=None):
        logits = self.scores(x)
        s = logits.sigmoid()
        choice = s + self.e_score_correction_bias
        if self.n_group > 1:
            per_group = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = per_group.topk(2, dim=-1)[0].sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter(1, keep, 1.0).bool()
            choice = choice.masked_fill(~group_mask.repeat_interleave(self.num_experts // self.n_group, -1), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = s.gather(-1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        selected = _scatter(indices, torch.ones_like(weights), self.num_experts).bool()
        probs = s / s.sum(-1, keepdim=True)
        return RouterOutput(logits, probs, _scatter(indices, weights, self.num_experts), selected)

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        self.pending_load = self.pending_load.to(counts.device) + counts

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float, center: bool = True) -> None:
        """One step of loss-free balancing from the step's total load (already summed over ranks)."""
        step = rate * torch.sign(load.mean() - load)
        if center:  # as torchtitan: the bias only redistributes, its mean stays put
            step = step - step.mean()
        self.e_score_correction_bias.add_(step.to(self.e_score_correction_bias.dtype))
        self.pending_load = torch.zeros_like(self.pending_load)


def build_router(kind: str, hidden_size: int, num_experts: int, top_k: int, moe) -> Router:
    """The router named by moe.router, configured from the moe config section."""
    std = moe.router_init_std
    if kind == "topk":
        return TopKRouter(hidden_size, num_experts, top_k, std)
    if kind == "switch":
        return SwitchRouter(hidden_size, num_experts, moe.capacity_factor, std)
    if kind == "expert_choice":
        return ExpertChoiceRouter(hidden_size, num_experts, moe.capacity_factor, std)
    if kind == "dynamic":
        return DynamicRouter(hidden_size, num_experts, moe.dynamic_mode, moe.dynamic_p, moe.dynamic_threshold,
                             moe.min_experts, moe.max_experts, std)
    if kind == "deepseek":
        return DeepSeekRouter(hidden_size, num_experts, top_k, moe.n_group, moe.topk_group, moe.norm_topk_prob,
                              moe.routed_scaling_factor, std)
    raise ValueError(f"unknown router {kind!r}")
