"""Router losses and routing metrics over all MoE layers of one forward pass.

Every function takes the forward pass's RouterRecords (lightning_moe.moe.layer), whose rows are tokens or,
with sequence-level routing, conversations, each with a mask of real rows. Nothing here calls .item():
the training step stays free of host-device syncs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_moe.moe.layer import RouterRecord


def row_mask(r: RouterRecord) -> torch.Tensor:
    return r.mask.to(torch.float32)


def load_balancing_loss(records: list[RouterRecord], num_experts: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss E * sum_i f_i * P_i over all layers' rows together.

    f_i: fraction of (row, slot) assignments chosen for expert i (before any capacity limit; sums to k),
    P_i: mean routing probability of expert i. Balanced routing gives k. With top-k softmax routing this is
    transformers' Mixtral `load_balancing_loss_func(tuple(logits), E, k, attention_mask)` (tested).
    """
    counts = sum((r.out.selected.float() * row_mask(r).unsqueeze(-1)).sum(0) for r in records)
    probs = sum((r.out.probs * row_mask(r).unsqueeze(-1)).sum(0) for r in records)
    rows = sum(row_mask(r).sum() for r in records)
    return num_experts * torch.sum((counts / rows) * (probs / rows))


def router_z_loss(records: list[RouterRecord]) -> torch.Tensor:
    """ST-MoE z-loss: mean over real rows and layers of logsumexp(logits)^2; keeps logits small."""
    total = sum((r.out.logits.logsumexp(-1).square() * row_mask(r)).sum() for r in records)
    return total / sum(row_mask(r).sum() for r in records).clamp(min=1)


def domain_routing_loss(records: list[RouterRecord], class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each router toward expert[domain], for rows of labelled conversations; averaged over
    labelled rows and layers, zero (with a graph) when the batch has none. `class_weights` (per domain)
    weight each row, e.g. inversely to its domain's share of the data so a rare domain pulls as hard."""
    total, count = 0.0, 0.0
    for r in records:
        labelled = ((r.domain >= 0) & r.mask).float()
        if class_weights is not None:
            labelled = labelled * class_weights.to(labelled.device)[r.domain.clamp(min=0)]
        ce = F.cross_entropy(r.out.logits, r.domain.clamp(min=0), reduction="none")
        total = total + (ce * labelled).sum()
        count = count + labelled.sum()
    return total / torch.as_tensor(count).clamp(min=1e-6)


def entropy_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Mean per-row entropy of the routing distribution: the dynamic router's penalty (otherwise spreading
    probability mass switches on every expert)."""
    total = sum((row_entropy(r.out.probs) * row_mask(r)).sum() for r in records)
    return total / sum(row_mask(r).sum() for r in records).clamp(min=1)


def loramoe_loss(records: list[RouterRecord], num_experts: int, delta: float) -> torch.Tensor:
    """LoRAMoE localized balancing: Q[n, i] = sum of expert i's probability over conversation n's rows;
    I[n, i] = 1 + delta for the conversation's domain expert, 1 - delta for the others (1 if unlabelled);
    loss = Var(I*Q) / Mean(I*Q)^2, averaged over layers. It balances load within the experts a domain is
    steered toward, rather than across all of them."""
    losses = []
    for r in records:
        seg = torch.where(r.mask, r.segments, r.num_segments)  # padding rows to a discarded extra segment
        q = torch.zeros(r.num_segments + 1, num_experts, device=seg.device).index_add(0, seg, r.out.probs)[:-1]
        seg_domain = torch.full((r.num_segments + 1,), -1, device=seg.device, dtype=r.domain.dtype)
        seg_domain = seg_domain.scatter_reduce(0, seg, r.domain, reduce="amax")[:-1]
        own = F.one_hot(seg_domain.clamp(min=0), num_experts).bool() & (seg_domain >= 0).unsqueeze(-1)
        importance = torch.where(seg_domain.unsqueeze(-1) >= 0, torch.where(own, 1 + delta, 1 - delta), 1.0)
        iq = importance * q
        losses.append(iq.var() / iq.mean().square().clamp(min=1e-12))
    return torch.stack(losses).mean()


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)
