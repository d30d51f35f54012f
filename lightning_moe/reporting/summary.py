"""summary.json: the run's outcome in one file, written when fit ends for any reason.

Callbacks contribute their own fields through `summary_fields(trainer) -> dict` (RunStats, ExpertUsageMonitor,
Budget): this module asks for them instead of knowing which classes exist. Checkpoints come from Lightning's
`trainer.checkpoint_callbacks`, any ModelCheckpoint, Lightning's own included.
"""

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

from lightning_moe.models.flops import dense_peak_flops

# stop_reason values (MOE_TRAINING_GUIDE.md, "When things go wrong", explains each)
STOP_REASONS = ("max_steps", "max_epochs", "time_budget", "early_stopping", "non_finite", "sigterm", "error")
FINISHED = ("max_steps", "max_epochs", "time_budget", "early_stopping", "non_finite")


def stop_reason(trainer: pl.Trainer, module, error: BaseException | None) -> str:
    if trainer.received_sigterm:
        return "sigterm"
    if error is not None:
        return "error"
    if getattr(module, "nonfinite_stop", False):
        return "non_finite"
    for timer in (c for c in trainer.callbacks if isinstance(c, Timer)):
        if getattr(timer, "stopped", False) or (timer.time_remaining() is not None and timer.time_remaining() <= 0):
            return "time_budget"
    for es in (c for c in trainer.callbacks if isinstance(c, EarlyStopping)):
        if es.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            return "early_stopping"
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return "max_steps"
    return "max_epochs"


def clean(x):
    """JSON-safe: NaN/inf become null (json.dumps would write invalid JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def build_summary(trainer: pl.Trainer, module, datamodule, reason: str, started: float, extra: dict) -> dict:
    fields: dict = {}
    for callback in trainer.callbacks:
        if hasattr(callback, "summary_fields"):
            fields |= callback.summary_fields(trainer)
    flops_done = fields.pop("_flops", 0)
    ckpts = trainer.checkpoint_callbacks
    device = trainer.strategy.root_device
    peak = dense_peak_flops(device, trainer.precision)
    seconds = fields.get("train_s") or 0.0
    mfu = flops_done / seconds / peak if peak and seconds > 0 else None
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    flops = getattr(module, "flops", None)
    summary = {
        "stop_reason": reason,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "last_checkpoint": next((c.last_model_path for c in ckpts if c.last_model_path), None),
        "best_checkpoint": next((c.best_model_path for c in ckpts if c.monitor and c.best_model_path), None),
        "elapsed_s": round(time.monotonic() - started, 3),
        **fields,
        "mfu": round(mfu, 4) if mfu else None,  # per device, model FLOPs (MOE_TRAINING_GUIDE.md) / dense peak
        "peak_memory_gib": round(peak_mem, 2) if peak_mem else None,
        "world_size": trainer.world_size,
        "model": module.describe(),
        "nonfinite_steps_skipped": getattr(module, "nonfinite_steps", 0),
        "flops_per_token_at_1k": flops.per_token(1024) if flops else None,
        "data": getattr(datamodule, "stats", None),
        **extra,
    }
    return clean(summary)


def write_json_atomic(path: Path, data: dict) -> Path:
    """Temp + rename, so a reader never sees half a file; a failed write removes its temporary file."""
    return write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: Path, text: str) -> Path:
    """write_json_atomic for text: processes that write the same file at once leave one whole copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_summary(run_dir: Path, summary: dict) -> Path:
    return write_json_atomic(run_dir / "summary.json", summary)


def write_record(run_dir: Path, summary: dict) -> Path:
    """summary.json, unless this attempt failed and summary.json records a finished run: then the failure goes to
    attempts/<time>.json beside it and the finished record stays."""
    path = run_dir / "summary.json"
    if summary.get("stop_reason") in ("error", "sigterm") and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("stop_reason") in FINISHED:
            attempt = run_dir / "attempts" / f"{time.strftime('%Y%m%d-%H%M%S')}-{summary['stop_reason']}.json"
            return write_json_atomic(attempt, summary)
    return write_summary(run_dir, summary)
