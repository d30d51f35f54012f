"""Checkpoint files that survive being killed: written through a temporary file + rename, loaded weights_only.

A process killed mid-save never replaces the last good checkpoint; a failed save (a full disk) names the file it
was writing, removes its temporary file and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_moe.config.schema import RunFailure

TMP_MARK = ".tmp"  # temporary names: .<name>.tmp<pid>; leftovers of killed runs are removed at the next start


class CheckpointSaveError(OSError, RunFailure):
    """Writing a checkpoint failed (e.g. no space left); the previous checkpoints are intact."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing through a temporary file + rename, loading weights_only."""

    def __init__(self) -> None:
        super().__init__()
        self.last_save_seconds = 0.0  # the Budget callback keeps this much time for the final checkpoint

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        t0 = time.monotonic()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CheckpointSaveError(f"saving checkpoint {path} failed ({e.strerror or e}); the previous "
                                      "checkpoints are intact", e.errno) from e
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
        self.last_save_seconds = time.monotonic() - t0

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def load_checkpoint_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_leftover_temporaries(directory: Path) -> list[Path]:
    """Temporary files of checkpoints and summaries that a killed run left behind (the lock on the run directory
    guarantees no live run is writing them)."""
    removed = []
    if directory.is_dir():
        for path in [*directory.glob(f".*{TMP_MARK}*"), *directory.glob(f"*{TMP_MARK}[0-9]*")]:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
