"""Router losses and routing statistics, over all MoE layers of one forward pass.

All functions take per-layer lists of router logits (T, E) and selected indices (T, k), plus a (T,) token
mask (False for padding), and never call .item(): no host sync in the training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _counts(indices: torch.Tensor, num_experts: int, weight: torch.Tensor) -> torch.Tensor:
    """Number of (token, slot) assignments per expert, counting only tokens with weight 1."""
    w = weight.to(torch.float32).unsqueeze(-1).expand_as(indices).reshape(-1)
    return torch.zeros(num_experts, device=indices.device).scatter_add_(0, indices.reshape(-1), w)


def load_balancing_loss(
    logits: list[torch.Tensor], indices: list[torch.Tensor], num_experts: int, mask: torch.Tensor
) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss E * sum_i f_i * P_i over all layers' tokens together.

    f_i: fraction of (token, slot) assignments that went to expert i (sums to k), P_i: mean router
    probability of expert i. Uniform routing gives k. Equal to transformers' Mixtral
    `load_balancing_loss_func(tuple(logits), E, k, attention_mask)` (tests compare them).
    """
    m = mask.to(torch.float32)
    counts = sum(_counts(idx, num_experts, m) for idx in indices)
    probs = sum((lg.softmax(-1) * m.unsqueeze(-1)).sum(0) for lg in logits)
    rows = m.sum() * len(logits)
    return num_experts * torch.sum((counts / rows) * (probs / rows))


def router_z_loss(logits: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over real tokens and layers of logsumexp(logits)^2; keeps logits small."""
    m = mask.to(torch.float32)
    total = sum((lg.logsumexp(-1).square() * m).sum() for lg in logits)
    return total / (m.sum() * len(logits)).clamp(min=1)


def domain_routing_loss(logits: list[torch.Tensor], token_domain: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the router toward expert[domain] for tokens of labelled examples (domain >= 0).

    Averaged over labelled tokens and layers; zero (with a graph) when the batch has no labelled token.
    """
    labelled = token_domain >= 0
    target = token_domain.clamp(min=0)
    total = sum((F.cross_entropy(lg, target, reduction="none") * labelled).sum() for lg in logits)
    return total / (labelled.sum() * len(logits)).clamp(min=1)


@torch.no_grad()
def routing_stats(logits: torch.Tensor, indices: torch.Tensor, num_experts: int, mask: torch.Tensor) -> dict:
    """One layer's load fraction per expert (sums to 1) and mean per-token routing entropy (nats)."""
    m = mask.to(torch.float32)
    counts = _counts(indices, num_experts, m)
    p = logits.float().softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return {
        "load": counts / counts.sum().clamp(min=1),
        "entropy": (entropy * m).sum() / m.sum().clamp(min=1),
    }


@torch.no_grad()
def domain_expert_counts(
    indices: torch.Tensor, token_domain: torch.Tensor, num_domains: int, num_experts: int
) -> torch.Tensor:
    """(num_domains, E) counts of (token, slot) assignments, for tokens of labelled examples."""
    labelled = token_domain >= 0
    flat = (token_domain.clamp(min=0).unsqueeze(-1) * num_experts + indices).reshape(-1)
    w = labelled.to(torch.float32).unsqueeze(-1).expand_as(indices).reshape(-1)
    out = torch.zeros(num_domains * num_experts, device=indices.device).scatter_add_(0, flat, w)
    return out.view(num_domains, num_experts)
