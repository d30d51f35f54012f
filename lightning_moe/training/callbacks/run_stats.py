"""The run's own numbers for summary.json: losses, real tokens, model FLOPs, and the training time without
validation pauses (so tokens_per_s is the training rate, data loading included).

Carried in checkpoints, so a resumed run reports the whole run's figures, not only its last attempt's. No device
synchronisation per batch (it would keep the host from preparing the next batch while the GPU works): the clock
is read after each batch's host work and once more, synchronised, when training ends; the training loss stays
a device tensor until a checkpoint or the summary needs its value.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

_CARRIED = ("first_train_loss", "train_loss", "val_loss", "best_val_loss", "tokens", "capacity", "flops",
            "seconds_before")


class RunStats(Callback):
    def __init__(self):
        self.first_train_loss: float | None = None
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.best_val_loss: float | None = None
        self.tokens = 0
        self.capacity = 0  # tokens the micro-batches could have held: the fill rate is tokens / capacity
        self.flops = 0  # model FLOPs (lightning_moe.models.flops) of the training batches
        self.seconds_before = 0.0  # training time of earlier attempts of this run (restored from the checkpoint)
        self._train_start = self._last_batch_end = self._val_start = None
        self._val_seconds = 0.0
        self._first_loss = self._last_loss = None  # device tensors, read by _settle_losses()

    @property
    def train_seconds(self) -> float:
        """Training time over every attempt of the run, validation excluded."""
        if self._train_start is None or self._last_batch_end is None:
            return self.seconds_before
        return self.seconds_before + max(self._last_batch_end - self._train_start - self._val_seconds, 0.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_batch_end = time.monotonic()
        self.tokens += batch["num_tokens"]
        self.capacity += batch.get("capacity", 0)
        self.flops += getattr(pl_module, "flops_per_batch", 0)
        loss = trainer.callback_metrics.get("train/lm_loss")
        if loss is not None:  # float() here would wait for the GPU after every micro-batch
            self._last_loss = loss  # Lightning's own copy (each self.log clones): not changed in place later
            if self.first_train_loss is None and self._first_loss is None:
                self._first_loss = self._last_loss

    def _settle_losses(self) -> None:
        if self._last_loss is not None:
            self.train_loss = float(self._last_loss)
            self._last_loss = None
        if self._first_loss is not None:
            self.first_train_loss = float(self._first_loss)
            self._first_loss = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_batch_end is not None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self._last_batch_end = time.monotonic()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._train_start is not None and self._val_start is not None:
            self._val_seconds += time.monotonic() - self._val_start
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.val_loss = float(loss)
            self.best_val_loss = min(self.val_loss, self.best_val_loss or float("inf"))

    def state_dict(self) -> dict:
        self._settle_losses()
        return {k: getattr(self, k) for k in _CARRIED if k != "seconds_before"} | {"seconds_before": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        for k in _CARRIED:
            if k in state:
                setattr(self, k, state[k])

    def summary_fields(self, trainer) -> dict:
        self._settle_losses()
        tokens = float(self.tokens) * trainer.world_size
        if not trainer.interrupted:  # after SIGTERM or a crash the other ranks are gone: no collective then
            tokens = float(trainer.strategy.reduce(torch.tensor(float(self.tokens), device=trainer.strategy.root_device),
                                                   reduce_op="sum"))
        seconds = self.train_seconds
        return {"train_loss": self.train_loss, "first_train_loss": self.first_train_loss, "val_loss": self.val_loss,
                "best_val_loss": self.best_val_loss, "train_s": round(seconds, 3), "tokens_seen": int(tokens),
                "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None, "_flops": self.flops,
                "fill_rate": round(self.tokens / self.capacity, 4) if self.capacity else None}
