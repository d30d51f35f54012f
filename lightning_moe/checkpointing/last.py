"""The checkpoint callback: Lightning's ModelCheckpoint, plus the final step always landing in `last`."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.upstream import last_saved_step, save_last_checkpoint


class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning writes `last` at train end only if no `last` was written before, so a run stopped by its time
    budget or step limit between two periodic saves would lose the steps since the previous one."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and last_saved_step(self) != trainer.global_step:
            save_last_checkpoint(self, trainer)
        super().on_train_end(trainer, pl_module)
