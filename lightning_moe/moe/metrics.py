"""Routing metrics per MoE layer, summed over batches (routing_counts) then turned into fractions (routing_metrics),
and the domain x expert weight matrix. Host-sync free: callbacks reduce the sums over ranks before reading them."""

from __future__ import annotations

import torch

from lightning_moe.moe.layer import RouterRecord
from lightning_moe.moe.losses import row_entropy, row_mask


@torch.no_grad()
def routing_counts(r: RouterRecord, num_experts: int) -> dict[str, torch.Tensor]:
    """Additive sums for one layer (so validation can accumulate them over batches). Load, active experts
    and drops count tokens (the token view); entropy counts the router's rows (tokens or conversations)."""
    m = row_mask(r)
    tm = r.token_mask.float() if r.token_mask is not None else m
    gates = r.token_gates if r.token_gates is not None else r.out.gates
    active = (gates > 0).float() * tm.unsqueeze(-1)
    dropped = (r.out.dropped.float() * m).sum() if r.out.dropped is not None else torch.zeros((), device=m.device)
    return {
        "rows": m.sum(),
        "tokens": tm.sum(),
        "load": active.sum(0),  # tokens each expert processed
        "entropy": (row_entropy(r.out.probs) * m).sum(),
        "active": active.sum(),
        "dropped": dropped,
    }


@torch.no_grad()
def routing_metrics(c: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-layer metrics from routing_counts sums.

    load: fraction of expert slots each expert processed; cv: coefficient of variation of those loads;
    maxvio: (max load - mean) / mean; entropy: mean per-row routing entropy (nats); effective_expert_fraction:
    exp(entropy) / E (a fraction, the effective number of experts over E); dead_fraction: experts that processed nothing; active_experts: mean experts per row
    (dynamic routers); dropped_fraction: rows that lost an expert to capacity (Switch)."""
    rows, tokens = c["rows"].clamp(min=1), c["tokens"].clamp(min=1)
    load = c["load"] / c["load"].sum().clamp(min=1)
    mean = load.mean()
    entropy = c["entropy"] / rows
    return {
        "load": load,
        "cv": load.std(unbiased=False) / mean,
        "maxvio": (load.max() - mean) / mean,
        "entropy": entropy,
        "effective_expert_fraction": entropy.exp() / num_experts,
        "dead_fraction": (c["load"] == 0).float().mean(),
        "active_experts": c["active"] / tokens,
        "dropped_fraction": c["dropped"] / rows,
    }


@torch.no_grad()
def domain_expert_weight(r: RouterRecord, num_domains: int, num_experts: int) -> torch.Tensor:
    """(num_domains, E) routing weight each domain's tokens gave each expert (gates normalised per token, so
    top-k's several experts share one unit of weight)."""
    gates = (r.token_gates if r.token_gates is not None else r.out.gates).float()
    domain = r.token_domain if r.token_domain is not None else r.domain
    mask = r.token_mask if r.token_mask is not None else r.mask
    w = gates / gates.sum(-1, keepdim=True).clamp(min=1e-12) * ((domain >= 0) & mask).unsqueeze(-1)
    return torch.zeros(num_domains, num_experts, device=w.device).index_add(0, domain.clamp(min=0), w)


def normalized_mutual_information(joint: torch.Tensor) -> float:
    """NMI between the rows' and the columns' variables of a (D, E) joint count matrix (here: a conversation's
    domain and the experts its tokens were routed to), 2 I(D; E) / (H(D) + H(E)): 0 when routing says nothing
    about the domain, 1 when each domain has experts of its own."""
    p = joint.double() / joint.sum().clamp(min=1e-12)
    pd, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pd @ pe)[nz]).log()).sum()
    h = -(pd[pd > 0] * pd[pd > 0].log()).sum() - (pe[pe > 0] * pe[pe > 0].log()).sum()
    return float(2 * mi / h) if h > 0 else 0.0


class RoutingTally:
    """Routing over many batches (a validation or an evaluation set): per-layer sums of routing_counts and of the
    domain x expert weight, then `report()`: per-layer metrics, each layer's load, the active experts, the domain x
    expert matrix and its normalised mutual information. `reduce` sums a tensor over data-parallel ranks."""

    def __init__(self, num_experts: int, domains: list[str], top_k: int):
        self.num_experts, self.domains, self.top_k = num_experts, domains, top_k
        self.counts: dict[int, dict[str, torch.Tensor]] = {}
        self.domain_weight: dict[int, torch.Tensor] = {}

    def add(self, records: list[RouterRecord]) -> None:
        for r in records:
            c = routing_counts(r, self.num_experts)
            prev = self.counts.get(r.layer)
            self.counts[r.layer] = c if prev is None else {k: prev[k] + v for k, v in c.items()}
            if self.domains:
                d = domain_expert_weight(r, len(self.domains), self.num_experts)
                self.domain_weight[r.layer] = self.domain_weight.get(r.layer, 0) + d

    def per_layer(self, reduce=lambda t: t) -> dict[str, dict[str, torch.Tensor]]:
        return {f"layer{layer}": routing_metrics({k: reduce(v) for k, v in c.items()}, self.num_experts)
                for layer, c in sorted(self.counts.items())}

    def report(self, per_layer: dict, reduce=lambda t: t) -> dict:
        active = torch.stack([m["active_experts"] for m in per_layer.values()]).mean().item()
        out = {
            "expert_load": {k: m["load"].tolist() for k, m in per_layer.items()},
            "routing_metrics": to_lists(per_layer),
            "dead_experts": {k: int((m["load"] == 0).sum()) for k, m in per_layer.items()},
            # FLOPs of the experts tokens actually used, relative to static top-k routing
            "active_experts": active,
            "active_expert_flops_vs_top_k": active / self.top_k,
        }
        if self.domain_weight:
            out["domain_expert_matrix"] = self.matrix(reduce)
        return out

    def matrix(self, reduce=lambda t: t) -> dict:
        per_layer = {k: reduce(v) for k, v in sorted(self.domain_weight.items())}
        total = sum(per_layer.values())
        norm = lambda m: (m / m.sum(-1, keepdim=True).clamp(min=1e-12)).tolist()  # noqa: E731
        return {
            "domains": self.domains,
            "measure": "share of each domain's routing weight (gates normalised per token) per expert",
            "all_layers": norm(total),
            "per_layer": {f"layer{k}": norm(v) for k, v in per_layer.items()},
            "tokens_per_domain": (total.sum(-1) / max(len(per_layer), 1)).round().tolist(),
            "nmi": normalized_mutual_information(total),
            "nmi_per_layer": {f"layer{k}": normalized_mutual_information(v) for k, v in per_layer.items()},
        }


def to_lists(per_layer: dict) -> dict:
    return {k: {n: (v.tolist() if v.dim() else v.item()) for n, v in m.items()} for k, m in per_layer.items()}
