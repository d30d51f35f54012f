"""Expert choice routing (Zhou et al. 2022): each expert picks its top-c tokens, c = ceil(capacity_factor * n / E)
for a sequence of n real tokens, among that sequence's real tokens (so capacity_factor experts per token on
average). Shapes stay static: the top-c of the padded length is taken, and ranks past a sequence's own c are
dropped.

Causal-LM caveat: an expert's choice at position t depends on later tokens of the same sequence, which do not
exist when generating. Training and validation route by the whole sequence; generation routes each new token by
top-k on the same scores (k = moe.top_k, gates the probabilities, as expert choice's are), so training and
generation differ. Within a sequence only: across the batch one sequence's tokens would change another's routing.
Needs padded batches.
"""

from __future__ import annotations

import math

import torch

from lightning_moe.moe.routers.base import Router, RouterOutput, top_k


class ExpertChoiceRouter(Router):
    def __init__(self, hidden_size, num_experts, capacity_factor=2.0, init_std=0.02, generation_top_k=2):
        super().__init__(hidden_size, num_experts, init_std)
        self.capacity_factor, self.max_active = capacity_factor, num_experts
        self.generation_top_k = generation_top_k

    @classmethod
    def from_config(cls, hidden_size, moe):
        return cls(hidden_size, moe.num_experts, moe.expert_choice.capacity_factor, moe.router_init_std, moe.top_k)

    @staticmethod
    def nominal_active_experts(moe) -> float:
        return float(moe.expert_choice.capacity_factor)

    def forward(self, x, mask, rows_per_seq=None, generating=False):
        logits = self.scores(x)
        probs = logits.softmax(-1)
        if generating:
            gates, selected = top_k(probs, self.generation_top_k, normalize=False)
            return RouterOutput(logits, probs, gates, selected)
        if rows_per_seq is None:
            raise ValueError("expert choice routes within a sequence: it needs rows as (batch, seq), not packed rows")
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
