"""What a person (or a log file) sees while a run trains, and when it ends.

StepProgress is a Lightning ProgressBar counted in optimizer steps over the whole run (so a resumed run reads
"step 25/40", not an epoch's batches), with real tokens per second, elapsed time and ETA. On a terminal it rewrites
one line; when stdout is not a terminal (nohup, SLURM, a Lightning job's log) it prints a plain line every
`every` steps, since a redrawn bar leaves nothing readable in a file. `run_report` is the run's closing summary.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class StepProgress(ProgressBar):
    def __init__(self, every: int = 10, stream=None):
        super().__init__()
        self.every, self.stream = every, stream
        self._enabled = True
        self._t0 = self._tokens = self._start_step = 0
        self._last_step = -1

    @property
    def out(self):
        return self.stream or sys.stdout

    @property
    def tty(self) -> bool:
        return self.out.isatty()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _total(self, trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._tokens, self._start_step = time.monotonic(), 0, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += int(batch.get("num_tokens", 0))
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step == self._last_step:
            return
        total = self._total(trainer)
        last = total is not None and step >= total
        if not (self.tty or step % self.every == 0 or last or step == self._start_step + 1):
            return
        self._last_step = step
        elapsed = time.monotonic() - self._t0
        done = step - self._start_step
        eta = elapsed / done * (total - step) if total and done > 0 else None
        loss = trainer.callback_metrics.get("train/lm_loss")
        parts = [f"step {step}/{total or '?'}", f"epoch {trainer.current_epoch}",
                 f"loss {float(loss):.4f}" if loss is not None else "loss -",
                 f"{self._tokens / elapsed:,.0f} tokens/s" if elapsed > 0 else "", f"elapsed {_clock(elapsed)}",
                 f"ETA {_clock(eta)}" if eta is not None else ""]
        line = " | ".join(p for p in parts if p)
        print(f"\r{line}\033[K" if self.tty else line, end="" if self.tty else "\n", file=self.out, flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._enabled or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            end = "\n" if self.tty else ""
            print(f"{end}validation at step {trainer.global_step}: val/loss {float(loss):.4f}", file=self.out,
                  flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.tty and self._enabled and trainer.is_global_zero:
            print(file=self.out, flush=True)


def run_report(summary: dict, run_dir) -> str:
    """The run's closing summary, for a person: how it ended, its figures, where things are, what to run next."""
    def num(key, fmt="{:.4f}"):
        value = summary.get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    load = summary.get("expert_load") or {}
    balance = ", ".join(f"{k} {'/'.join(f'{v:.2f}' for v in loads)}" for k, loads in load.items()) or "no MoE layers"
    lines = [
        f"Run finished: stop_reason={summary['stop_reason']} at step {summary['global_step']} "
        f"({num('elapsed_s', '{:.0f}')} s)",
        f"  train loss {num('first_train_loss')} -> {num('train_loss')}, val loss {num('val_loss')} "
        f"(best {num('best_val_loss')})",
        f"  {num('tokens_per_s', '{:,.0f}')} tokens/s, MFU {num('mfu', '{:.1%}')}, peak memory "
        f"{num('peak_memory_gib', '{:.1f}')} GiB",
        f"  expert load per layer: {balance}",
        f"  checkpoints: {summary.get('last_checkpoint') or '-'} (best: {summary.get('best_checkpoint') or '-'})",
        f"  routing heatmap: {run_dir}/routing/domain_expert_matrix.png; everything: {run_dir}/summary.json",
    ]
    if summary["stop_reason"] == "sigterm":
        lines.append("  next: run the same command again to resume")
    elif summary["stop_reason"] not in ("error",):
        lines += ["  next:", f"    python evaluate.py run={run_dir}", f"    python chat.py run={run_dir}",
                  f"    {export_hint(run_dir)}"]
    return "\n".join(lines)


def export_hint(run_dir) -> str:
    """export.py with only the formats this run's form can produce (config/export_forms.py), or why none."""
    from omegaconf import OmegaConf

    from lightning_moe.config import validate_config
    from lightning_moe.config.export_forms import export_formats
    from lightning_moe.config.routers import migrate_saved

    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    migrate_saved(cfg)  # a run from before the per-router sections
    formats = export_formats(validate_config(cfg))
    if not formats:
        return (f"# export.py: none of merged|peft|per_domain fits this run's experts; generate.py and chat.py load "
                f"it from {run_dir}/export/ (MOE_TRAINING_GUIDE.md section 11 says which forms export)")
    return f"python export.py run={run_dir} format={'|'.join(formats)} out=DIR"


class PlainProgress(ProgressBar):
    """Evaluation progress for a log file: a plain line at every tenth of each loader, with elapsed time and ETA
    (a redrawn bar leaves nothing readable in a file). On a terminal, progress_bar gives Lightning's bar."""

    def __init__(self, what: str, stream=None):
        super().__init__()
        self.what, self.stream = what, stream
        self._t0 = 0.0

    def disable(self) -> None:  # Lightning calls these on non-zero ranks; evaluation runs in one process
        pass

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t0 = time.monotonic()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = trainer.num_val_batches[dataloader_idx]
        done = batch_idx + 1
        if total and total != float("inf") and (done == total or done % max(1, int(total) // 10) == 0):
            elapsed = time.monotonic() - self._t0
            eta = elapsed / done * (total - done)
            print(f"{self.what} set {dataloader_idx + 1}: batch {done}/{int(total)} | elapsed {_clock(elapsed)} | "
                  f"ETA {_clock(eta)}", file=self.stream or sys.stdout, flush=True)


def progress_bar(what: str):
    """The progress callback of a long Lightning loop: tqdm's bar on a terminal, plain lines in a log file."""
    if sys.stdout.isatty():
        from lightning.pytorch.callbacks import TQDMProgressBar

        return TQDMProgressBar()
    return PlainProgress(what)


def progress(items, total: int, what: str):
    """Iterate `items` with progress: tqdm on a terminal, otherwise a plain line at every tenth of `total`."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=what)
        return
    t0 = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        if i == total or i % max(1, total // 10) == 0:
            elapsed = time.monotonic() - t0
            print(f"{what}: {i}/{total} | elapsed {_clock(elapsed)} | ETA {_clock(elapsed / i * (total - i))}",
                  flush=True)
