"""The optimiser (torch's AdamW, fused on CUDA, or bitsandbytes' 8-bit AdamW) and the warm-up + decay schedule,
stepped per optimizer step; its length is Lightning's estimated_stepping_batches (the budget may shorten it)."""

from __future__ import annotations

import logging

import torch

from lightning_moe.config.schema import OptimConfig
from lightning_moe.training.schedules import WarmupDecay

log = logging.getLogger(__name__)


def configure(module, o: OptimConfig) -> dict:
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [  # no decay on biases and other vectors
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if o.name == "adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    else:
        fused = o.fused if o.fused is not None else module.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    total = int(module.trainer.estimated_stepping_batches)
    if o.scheduler != "constant" and o.warmup_steps >= total:
        log.warning(
            "optim.warmup_steps=%d >= the run's %d optimizer steps: the learning rate never reaches optim.lr=%g "
            "(more data or epochs, or a shorter warm-up)", o.warmup_steps, total, o.lr,
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupDecay(o.warmup_steps, total, o.scheduler, o.min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
