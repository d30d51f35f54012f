"""Resuming a run exactly: which checkpoint to resume from, and what Lightning's own resume leaves out.

- find_resume_checkpoint picks last.ckpt (the run's newest state), else the newest other checkpoint that loads,
  skipping a damaged one; never a best-* checkpoint (an earlier state, kept for its validation loss).
- refuse_lost_checkpoints: a run directory that holds a run's record but no checkpoint cannot be continued;
  retraining from step 0 there would rewrite the record, so it is refused unless resume=false (start over), which
  sets the earlier record aside first (set_aside_record).
- ExactResume saves the global RNG states (torch, CUDA, numpy, Python) and restores them just before the first
  resumed batch, so dropout draws the same masks as an uninterrupted run (Lightning saves none of them), and
  makes a validation cut short by SIGTERM run again in full on resume (Lightning would skip it).
- Under DDP every rank has RNG states (and, mid-accumulation, gradients) of its own, but only global rank 0's
  checkpoint is written: `from_every_rank` collects them into it, `for_this_rank` gives each rank its own back.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_moe.checkpointing.io import load_checkpoint_file
from lightning_moe.config.schema import ConfigError

log = logging.getLogger(__name__)

BEST_PREFIX = "best-"  # callbacks.best_checkpoint.filename (conf/callbacks/default.yaml)
# what a run directory holds besides its checkpoints that tells a run trained there (its record)
RECORD = ("summary.json", "logs/metrics.csv")
# what resume=false sets aside before starting over (everything a run writes but Hydra's log and the lock note)
STARTED_OVER = ("summary.json", "config.yaml", ".hydra", "logs", "routing", "export", "checkpoints", "attempts")


class CheckpointsMissing(ConfigError):
    """A run directory holds a run's record, but no checkpoint to continue it from."""


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """last.ckpt (the final or newest step: FinalStepCheckpoint keeps it so), else the newest other *.ckpt that
    loads; damaged ones (a crash mid-write without the atomic rename, a full disk) are logged and skipped. The
    best checkpoint is never resumed from: written after a validation, it can be newer than last.ckpt, yet it
    holds an earlier or equal step and older state, and resuming from it would rewind the run."""
    if not ckpt_dir.is_dir():
        return None
    newest_first = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = [p for p in newest_first if p.name.startswith("last")]
    candidates += [p for p in newest_first if p not in candidates and not p.name.startswith(BEST_PREFIX)]
    for path in candidates:
        try:
            ckpt = load_checkpoint_file(path)
            if "state_dict" in ckpt and "global_step" in ckpt:
                return path
            log.warning("skipping %s: not a training checkpoint", path)
        except Exception as e:  # noqa: BLE001  any failure to load means: not this one
            log.warning("skipping %s: it does not load (%s)", path, str(e).splitlines()[0][:200])
    return None


def refuse_lost_checkpoints(run_dir: Path) -> None:
    """Called when a resumable command finds no checkpoint: refuse if the directory holds a run's record."""
    found = [name for name in RECORD if (run_dir / name).is_file()]
    if found:
        raise CheckpointsMissing(
            f"hydra.run.dir: {run_dir} holds the record of a run but no checkpoint to continue it from "
            f"({', '.join(found)}; nothing loadable in checkpoints/). Training again from step 0 would replace that "
            "record: give a new run directory (hydra.run.dir=NEW_DIR), or start over here with resume=false (the "
            "earlier record is moved to replaced/<time>/). Nothing in the run directory was changed")


def set_aside_record(run_dir: Path) -> Path | None:
    """resume=false: move an earlier run's files to replaced/<time>/ so that the new run starts on a clean
    directory (no second history appended to metrics.csv, no last-v1.ckpt beside the old last.ckpt)."""
    present = [run_dir / name for name in STARTED_OVER if (run_dir / name).exists()]
    if not present:
        return None
    target = run_dir / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True)
    for path in present:
        path.rename(target / path.name)
    return target


def from_every_rank(trainer, value) -> list | None:
    """[rank 0's value, rank 1's, ...] on global rank 0 (None elsewhere, and with one process). Called by every
    rank while a checkpoint is dumped (Lightning dumps on all ranks, then rank 0 writes). Tensors go as CPU copies."""
    if trainer.world_size == 1 or not dist.is_initialized():
        return None
    value = _to_cpu(value)
    gathered = [None] * trainer.world_size if trainer.global_rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def for_this_rank(trainer, per_rank: list | None, fallback):
    """This rank's own entry of a from_every_rank list saved with the same number of ranks; else `fallback`
    (rank 0's, as checkpoints of one process or another world size hold)."""
    if per_rank and len(per_rank) == trainer.world_size:
        return per_rank[trainer.global_rank]
    return fallback


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def rng_states() -> dict:
    """Every global generator's state, as tensors and plain data (so the checkpoint loads with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                                                        int(pos), int(has_gauss), float(gauss)],
              "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class ExactResume(Callback):
    """What Lightning's own resume leaves out.

    - Global RNG states in checkpoints, restored right before the first resumed training batch (not at load
      time: setting up dataloaders and the model between load and that batch may draw random numbers).
    - A checkpoint written mid-validation (SIGTERM arrives between two validation batches) records the
      validation as fully done, so on resume Lightning skips it: early stopping and the best checkpoint never
      see it. Its progress is rewound to "started, no batch done", which makes Lightning run it again in full.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()
        if (per_rank := from_every_rank(trainer, checkpoint["rng_states"])) is not None:
            checkpoint["rng_states_per_rank"] = per_rank
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        if (trainer.validating and not trainer.sanity_checking
                and val_loop.batch_progress.current.completed < sum(val_loop.max_batches)):
            _rewind_validation(checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = for_this_rank(trainer, checkpoint.get("rng_states_per_rank"), checkpoint.get("rng_states"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


def _rewind_validation(progress: dict) -> None:
    """Rewrite a validation loop's saved progress to 'one batch started, none processed': the state Lightning
    reads as 'restarted mid-evaluation', so it reruns that validation, from its first batch (the current
    counters reset to their completed value, 0, on restart)."""
    total, current = progress["total"], progress["current"]
    done = total["completed"] - current["completed"]  # batches of earlier, finished validations
    progress["total"] = {"ready": done + 1, "started": done + 1, "processed": done, "completed": done}
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["is_last_batch"] = False
