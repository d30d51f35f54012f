"""Checkpoints that survive being killed, and resuming from them exactly.

- AtomicCheckpointIO writes to a temporary file and renames it, so a process killed mid-save never
  replaces the last good checkpoint, and loads with weights_only=True (tensors and plain data only).
- find_resume_checkpoint picks the newest checkpoint that loads, skipping a damaged one.
- A checkpoint records the base model's name and a fingerprint of its architecture; resuming onto another
  base model is refused before any weights load (check_base_model).
- ExactResume saves the global RNG states (torch, CUDA, numpy, Python) and restores them just before the first
  resumed batch, so dropout draws the same masks as an uninterrupted run (Lightning saves none of them), and
  makes a validation cut short by SIGTERM run again in full on resume (Lightning would skip it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_moe.config import ConfigError

log = logging.getLogger(__name__)

# config.json keys that do not change the architecture (and differ between a hub copy and a local one)
_NOT_ARCHITECTURE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "architectures",
                     "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing through a temporary file + rename, loading weights_only."""

    def __init__(self) -> None:
        super().__init__()
        self.last_save_seconds = 0.0  # the Budget callback keeps this much time for the final checkpoint

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        t0 = time.monotonic()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
        self.last_save_seconds = time.monotonic() - t0

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def load_checkpoint_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest *.ckpt in ckpt_dir that loads; damaged ones (a crash mid-write without the atomic rename,
    a full disk) are logged and skipped."""
    if not ckpt_dir.is_dir():
        return None
    for path in sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            ckpt = load_checkpoint_file(path)
            if "state_dict" in ckpt and "global_step" in ckpt:
                return path
            log.warning("skipping %s: not a training checkpoint", path)
        except Exception as e:  # noqa: BLE001  any failure to load means: not this one
            log.warning("skipping %s: it does not load (%s)", path, str(e).splitlines()[0][:200])
    return None


def fingerprint(config) -> str:
    """A short hash of a HF config's architecture-defining fields."""
    spec = {k: v for k, v in sorted(config.to_dict().items()) if k not in _NOT_ARCHITECTURE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_model_record(model_cfg, config) -> dict:
    return {"name_or_path": model_cfg.name_or_path, "init": model_cfg.init, "arch": model_cfg.arch,
            "fingerprint": fingerprint(config), "architecture": config.to_dict()}


def check_base_model(ckpt_path: Path, model_cfg, config) -> None:
    """Refuse to resume a checkpoint trained on another base model (fast: before weights load)."""
    saved = load_checkpoint_file(ckpt_path).get("base_model")
    if not saved:
        return
    ours = fingerprint(config)
    if saved.get("fingerprint") not in (None, ours):
        raise ConfigError(
            f"model: {ckpt_path} was trained on base model '{saved.get('name_or_path') or saved.get('arch')}' "
            f"(architecture fingerprint {saved.get('fingerprint')}), but this run uses "
            f"'{model_cfg.name_or_path or model_cfg.arch}' ({ours}). Resume with the same model, or start a new "
            "run directory (hydra.run.dir=...)"
        )


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
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        # numpy's state as plain lists/tensors, so the checkpoint still loads with weights_only=True
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                           float(gauss)]
        version, internal, gauss_next = states["python"]
        states["python"] = [version, list(internal), gauss_next]
        checkpoint["rng_states"] = states
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        if (trainer.validating and not trainer.sanity_checking
                and val_loop.batch_progress.current.completed < sum(val_loop.max_batches)):
            _rewind_validation(checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        states = dict(self._pending)
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
        version, internal, gauss_next = states["python"]
        states["python"] = (version, tuple(internal), gauss_next)
        if not torch.cuda.is_available():
            states.pop("torch.cuda", None)
        _set_rng_states(states)
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
