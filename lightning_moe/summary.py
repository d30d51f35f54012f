"""summary.json: the run's outcome in one file, written when fit ends for any reason."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from lightning_moe.budget import Budget
from lightning_moe.callbacks import ExpertUsageMonitor, ModelCheckpoint, RunStats
from lightning_moe.flops import dense_peak_flops

# stop_reason values (MOE_TRAINING_GUIDE.md, "When things go wrong", explains each)
STOP_REASONS = ("max_steps", "max_epochs", "time_budget", "early_stopping", "non_finite", "sigterm", "error")


def stop_reason(trainer: pl.Trainer, module, error: BaseException | None) -> str:
    if trainer.received_sigterm:
        return "sigterm"
    if error is not None:
        return "error"
    if getattr(module, "nonfinite_stop", False):
        return "non_finite"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if isinstance(timer, Budget) and timer.stopped:
        return "time_budget"
    if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        return "time_budget"
    for es in (c for c in trainer.callbacks if isinstance(c, EarlyStopping)):
        if es.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            return "early_stopping"
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return "max_steps"
    return "max_epochs"


def _find(trainer: pl.Trainer, kind):
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _clean(x):
    """JSON-safe: NaN/inf become null (json.dumps would write invalid JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def build_summary(trainer: pl.Trainer, module, datamodule, reason: str, started: float, extra: dict) -> dict:
    stats: RunStats | None = _find(trainer, RunStats)
    usage: ExpertUsageMonitor | None = _find(trainer, ExpertUsageMonitor)
    ckpts = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    last = next((c.last_model_path for c in ckpts if c.last_model_path), None)
    best = next((c.best_model_path for c in ckpts if c.monitor and c.best_model_path), None)
    tokens = trainer.strategy.reduce(float(stats.tokens), reduce_op="sum") if stats else 0
    tokens = float(tokens)
    seconds = stats.train_seconds if stats else 0.0
    val = usage.val_report if usage and usage.val_report else {}
    train_routing = usage.train_report if usage else {}
    expert_load = val.get("expert_load") or {k: m["load"] for k, m in train_routing.items()}
    budget = next((c.report() for c in trainer.callbacks if isinstance(c, Budget)), None)
    if budget and budget["wall_start"] and last and Path(last).is_file():  # was the final save inside the budget?
        budget["last_checkpoint_at_s"] = round(Path(last).stat().st_mtime - budget["wall_start"], 3)
    flops = getattr(module, "flops", None)
    device = trainer.strategy.root_device
    peak = dense_peak_flops(device, trainer.precision)
    mfu = stats.flops / seconds / peak if stats and peak and seconds > 0 else None
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    summary = {
        "stop_reason": reason,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "train_loss": stats.train_loss if stats else None,
        "first_train_loss": stats.first_train_loss if stats else None,
        "val_loss": stats.val_loss if stats else None,
        "best_val_loss": stats.best_val_loss if stats else None,
        "last_checkpoint": last,
        "best_checkpoint": best,
        "elapsed_s": round(time.monotonic() - started, 3),
        "train_s": round(seconds, 3),
        "tokens_seen": int(tokens),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "mfu": round(mfu, 4) if mfu else None,  # per device, model FLOPs (MOE_TRAINING_GUIDE.md) / dense peak
        "peak_memory_gib": round(peak_mem, 2) if peak_mem else None,
        "world_size": trainer.world_size,
        "expert_load": expert_load,
        # per layer: load, cv, maxvio, entropy, effective_experts, dead_fraction, active_experts,
        # dropped_fraction (+ bias for deepseek); from the last validation, else the last logged train batch
        "routing": val.get("routing_metrics") or train_routing,
        "active_experts": val.get("active_experts"),
        "active_expert_flops_vs_top_k": val.get("active_expert_flops_vs_top_k"),
        "domain_expert_matrix": val.get("domain_expert_matrix"),
        "model": module.describe(),
        "nonfinite_steps_skipped": getattr(module, "nonfinite_steps", 0),
        "budget": budget,
        "flops_per_token_at_1k": flops.per_token(1024) if flops else None,
        "data": getattr(datamodule, "stats", None),
        **extra,
    }
    return _clean(summary)


def write_summary(run_dir: Path, summary: dict) -> Path:
    """Atomic write (temp + rename), so a reader never sees half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return path
