"""DeepSeek-V3 routing: sigmoid affinities s; experts chosen by s + b, where b is a balancing bias outside the
gradient; optional grouped selection (score each group by the sum of its top-2, keep `topk_group` groups);
weights are the unbiased s of the chosen experts, renormalised if norm_topk_prob, times routed_scaling_factor.
Its knobs: moe.deepseek.* (config/routers.py's DeepSeekConfig).

Auxiliary-loss-free balancing (moe.deepseek.bias_update_rate > 0): `observe` adds each micro-batch's token counts,
and once per optimizer step `after_optimizer_step` sums them over data-parallel ranks and moves b by
rate * sign(mean load - load) (mean-centred, as torchtitan), so over-used experts become less likely to be chosen.
The bias is a buffer (in checkpoints); the counts since the last step are checkpointed through `extra_state`.
"""

from __future__ import annotations

import torch

from lightning_moe.moe.routers.base import Router, RouterOutput, scatter_gates


class DeepSeekRouter(Router):
    def __init__(self, hidden_size, num_experts, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                 routed_scaling_factor=1.0, init_std=0.02, bias_update_rate=0.0, bias_update_center=True):
        super().__init__(hidden_size, num_experts, init_std)
        self.top_k, self.max_active = top_k, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.bias_update_rate, self.bias_update_center = bias_update_rate, bias_update_center
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))  # saved in checkpoints
        self.pending_load = torch.zeros(num_experts)  # not a buffer: DDP would overwrite it from rank 0

    @classmethod
    def from_config(cls, hidden_size, moe):
        own = moe.deepseek  # config/routers.py's DeepSeekConfig
        return cls(hidden_size, moe.num_experts, moe.top_k, own.n_group, own.topk_group, own.norm_topk_prob,
                   own.routed_scaling_factor, moe.router_init_std, own.bias_update_rate, own.bias_update_center)

    def forward(self, x, mask, rows_per_seq=None, generating=False):
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
        selected = scatter_gates(indices, torch.ones_like(weights), self.num_experts).bool()
        probs = s / s.sum(-1, keepdim=True)
        return RouterOutput(logits, probs, scatter_gates(indices, weights, self.num_experts), selected)

    def state_metrics(self) -> dict[str, torch.Tensor]:
        return {"bias": self.e_score_correction_bias}

    @torch.no_grad()
    def observe(self, selected: torch.Tensor) -> None:
        if self.bias_update_rate > 0:
            self.record_load(selected.sum(0).float())

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        self.pending_load = self.pending_load.to(counts.device) + counts

    def after_optimizer_step(self, reduce_sum) -> None:
        if self.bias_update_rate > 0:
            load = reduce_sum(self.pending_load.to(self.e_score_correction_bias.device))
            self.update_bias(load, self.bias_update_rate, self.bias_update_center)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float, center: bool = True) -> None:
        """One step of loss-free balancing from the step's total load (already summed over ranks)."""
        step = rate * torch.sign(load.mean() - load)
        if center:  # as torchtitan: the bias only redistributes, its mean stays put
            step = step - step.mean()
        self.e_score_correction_bias.add_(step.to(self.e_score_correction_bias.dtype))
        self.pending_load = torch.zeros_like(self.pending_load)

    def extra_state(self) -> torch.Tensor:
        return self.pending_load.cpu()

    def load_extra_state(self, state: torch.Tensor) -> None:
        self.pending_load = state.to(self.e_score_correction_bias.device)
