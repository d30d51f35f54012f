"""Fault injection for the reliability tests: callbacks added to real train.py runs with
`+callbacks.fault={_target_: faults.NAME, ...}` and PYTHONPATH=tests. Not part of the package."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SigtermAt(Callback):
    """Send this process a real SIGTERM once: after training micro-batch `train_batch` (0-based, counted over
    the run), or during the first batch of validation number `validation` (1-based). A marker file keeps the
    resumed run from firing again."""

    def __init__(self, marker: str, train_batch: int | None = None, validation: int | None = None,
                 group: bool = False):
        self.marker, self.train_batch, self.validation = Path(marker), train_batch, validation
        self.group = group  # to the whole process group (dataloader workers too), as schedulers send it
        self._validations = 0

    def _fire(self) -> None:
        if not self.marker.exists():
            self.marker.write_text("fired")
            if self.group:  # from another process, as a scheduler's comes: PyTorch's workers treat a SIGTERM from
                # their parent as a request to exit quietly, one from anyone else kills them
                subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"])
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.train_batch is not None and trainer.fit_loop.total_batch_idx == self.train_batch:
            self._fire()

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validations += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.validation == self._validations and batch_idx == 0 and not trainer.sanity_checking:
            self._fire()


class NaNGradAt(Callback):
    """Make a trainable gradient NaN after the backward of the given micro-batches (0-based, over the run)."""

    def __init__(self, batches: list[int]):
        self.batches = set(batches)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.fit_loop.total_batch_idx in self.batches:
            param = next(p for p in pl_module.parameters() if p.requires_grad and p.grad is not None)
            param.grad.view(-1)[0] = math.nan


class DiskFullAt(Callback):
    """From optimizer step `step` on, every torch.save fails as a full disk does (OSError ENOSPC)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            import errno

            import torch

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            torch.save = full


class FakeClock(Callback):
    """Time as the budget sees it: the clock of Lightning's Timer, the Budget and the checkpoint writer stands
    still except for `step_seconds` at the start of every training micro-batch, so how many steps a budget allows
    depends on the budget's rules alone, not on how loaded the machine is. Only those modules see it: a frozen
    `time.monotonic` everywhere would also freeze the timeouts of the dataloader's worker shutdown."""

    def __init__(self, step_seconds: float = 1.0):
        import math
        import time

        import lightning.pytorch.callbacks.timer as timer

        import lightning_moe.checkpointing.io as io
        import lightning_moe.training.callbacks.budget as budget

        # a whole second to start from, so that differences of multiples of step_seconds (a power of two) are exact
        self.step_seconds, self._fake, self._base = step_seconds, 0.0, float(math.ceil(time.monotonic()))
        clock = self

        class Time:  # the `time` module, with monotonic() read from this clock
            def __getattr__(self, name):
                return getattr(time, name)

            @staticmethod
            def monotonic() -> float:
                return clock._base + clock._fake

        for module in (timer, budget, io):
            module.time = Time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._fake += self.step_seconds
