"""Numerical safety of an optimizer step: gradient clipping under bf16, and the non-finite gradient guard."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def clip_without_scaler(trainer, optimizer, clip_val, algorithm) -> bool:
    """Lightning's mixed-precision plugin refuses to clip for optimizers that unscale inside their step (fused
    AdamW), a guard for fp16's GradScaler. bf16 and fp32 have no scaler and nothing to unscale, so clip here.
    Returns False where Lightning's own clipping (and its fp16 check) should run instead."""
    if getattr(trainer.precision_plugin, "scaler", None) is not None or not clip_val:
        return False
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    return True


def gradients_finite(module, optimizer) -> bool:
    """A NaN/Inf gradient (from a NaN loss or an overflow) must never reach the weights. One host sync per
    optimizer step. On a bad step every gradient is set to None, so AdamW skips it entirely (no weight decay, no
    moment update); after optim.max_nonfinite_skips such steps (or at the first, with optim.nonfinite=stop)
    training stops with stop_reason non_finite."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    finite = bool(module.trainer.strategy.reduce(torch.tensor(float(finite), device=module.device), reduce_op="min"))
    if finite:
        return True
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    module.nonfinite_steps += 1
    o = module.sections.optim
    log.warning("non-finite gradient at step %d: step skipped (%d so far)", module.global_step, module.nonfinite_steps)
    if o.nonfinite == "stop" or module.nonfinite_steps > o.max_nonfinite_skips:
        module.nonfinite_stop = True
        module.trainer.should_stop = True
    return False
