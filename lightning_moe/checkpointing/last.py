"""The checkpoint callback: Lightning's ModelCheckpoint, plus `last` always meaning the run's newest step.

- The final step always lands in `last`: Lightning writes `last` at train end only if no `last` was written
  before, so a run stopped by its time budget or step limit between two periodic saves would lose the steps since
  the previous one. And `last` holds the final validation's outcome (best checkpoint, early-stopping counters):
  a periodic save at the final step comes before that validation, so `last` is written again at train end, and a
  run continued from it (a larger trainer.max_steps) keeps its best checkpoint.
- A resumed attempt that trains no step (a finished run's command run again) writes nothing: the checkpoint it
  resumed from is already the run's last state.
- A moved run directory (`mv R R2`) keeps its bookkeeping: Lightning drops the restored paths when the saved
  directory differs, then finds R2/last.ckpt "taken" and writes last-v1.ckpt beside it, so `last` would keep
  naming the older file. The saved paths are re-based onto the new directory instead.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.upstream import last_saved_step, save_last_checkpoint

_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


class FinalStepCheckpoint(ModelCheckpoint):
    _started_at: int | None = None
    _validated_at: int | None = None  # the step of the last validation

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started_at = trainer.global_step if trainer.ckpt_path else None  # None: a fresh start

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started_at == trainer.global_step:
            return  # resumed and trained nothing: the checkpoint it resumed from is the final one
        step = trainer.global_step
        if self.save_last and (last_saved_step(self) != step or self._validated_at == step):
            save_last_checkpoint(self, trainer)
        super().on_train_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict) -> None:
        saved_dir = state_dict.get("dirpath")
        if saved_dir and self.dirpath and saved_dir != self.dirpath:
            state_dict = dict(state_dict, dirpath=self.dirpath)
            for key in _PATHS:
                if state_dict.get(key):
                    state_dict[key] = self._rebased(state_dict[key])
            state_dict["best_k_models"] = {self._rebased(k): v for k, v in state_dict.get("best_k_models", {}).items()}
        super().load_state_dict(state_dict)

    def _rebased(self, path: str) -> str:
        return str(Path(self.dirpath) / Path(path).name)
