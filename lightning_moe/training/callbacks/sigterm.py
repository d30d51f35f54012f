"""SIGTERM under DDP: every rank stops after the same micro-batch.

Lightning 2.6 sets `trainer.received_sigterm` inside the signal handler, on whichever rank the signal reaches
first, and calls a `broadcast` from that handler. A rank that sees the flag raises at the end of its batch while
the others, not yet signalled, start the next one and wait in a collective forever (Lightning issue #20806; seen
here as a 2-process CPU run that hung under load). This callback makes the handler only note the signal and
forward it to the launched ranks; after every train and validation micro-batch the ranks agree (an all_reduce of
one number, MAX) and set the flag together, so Lightning's own checks raise at the same point on all of them and
the on-exception checkpoint is written by all ranks at one step. One process: Lightning's handler is left alone.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_prefixed_message

log = logging.getLogger(__name__)


class SigtermSync(pl.Callback):
    def __init__(self) -> None:
        self._pending = False
        self._trainer: pl.Trainer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = False
        if trainer.world_size == 1:
            return
        connector = trainer._signal_connector
        if not callable(getattr(connector, "_sigterm_notifier_fn", None)):
            raise RuntimeError("this Lightning version has no _SignalConnector._sigterm_notifier_fn: "
                               "lightning_moe/training/callbacks/sigterm.py needs updating")
        self._trainer = trainer
        # register_signal_handlers() runs after on_fit_start and reads this attribute then
        connector._sigterm_notifier_fn = self._note

    def _note(self, signum, frame) -> None:
        trainer = self._trainer
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", trainer.local_rank))
        if not self._pending and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # rank 0's process launched the others: pass it on
        self._pending = True

    def _agree(self, trainer: pl.Trainer) -> None:
        if self._trainer is None or trainer.received_sigterm or not dist.is_initialized():
            return
        flag = torch.tensor([1.0 if self._pending else 0.0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._agree(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._agree(trainer)
