"""The wall-clock budget: Lightning's Timer plus a reserve for the final save, reset-on-resume and a
budget-aware learning-rate schedule."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Timer

from lightning_moe.training.schedules import WarmupDecay


class Budget(Timer):
    """Lightning's Timer (wall-clock budget "DD:HH:MM:SS", elapsed time saved in checkpoints so it counts across
    restarts), plus what it lacks:

    - it stops early enough to finish inside the budget: when the time left is less than `reserve` + one
      optimizer step (the slowest of the last 20) + the validation Lightning runs when a run is stopped + the
      final checkpoints' writes, each measured (until they have been: validation from the step time, the
      write from the checkpoint's size), times `safety` (1.5): one measurement of a validation or a save
      is a noisy guess of the next on a busy machine, and overshooting the budget is the failure to avoid;
    - the measured step and validation times are saved in checkpoints, so a run resumed without room for
      one more step stops before taking one;
    - `reset_on_resume=true` starts a resumed run with the full budget again (a larger trainer.max_time
      extends it without a reset);
    - `schedule=true` sizes the LR schedule from the measured step time, so a run that the budget ends has its
      cosine reach the floor as the budget ends instead of being cut mid-decay (only ever shortened: the
      configured length stays the maximum).
    """

    def __init__(self, duration: str | None, reserve: str = "00:00:00:00", reset_on_resume: bool = False,
                 schedule: bool = False, warmup_steps_for_estimate: int = 3, safety: float = 1.5):
        super().__init__(duration=duration, interval="step")
        self.duration_s = _seconds(duration) if isinstance(duration, str) else None  # None: no budget
        self.reserve = _seconds(reserve)
        self.safety = safety
        self.reset_on_resume, self.schedule = reset_on_resume, schedule
        self.warmup_steps_for_estimate = warmup_steps_for_estimate
        self.stopped = False
        self._step_times: deque[float] = deque(maxlen=20)
        self._last_step, self._last_time, self._planned_total = None, None, None
        self.wall_start: float | None = None  # wall-clock time at which the budget (with restored time) began
        self._val_batch_times: deque[float] = deque(maxlen=50)
        self._val_seconds: float | None = None  # the last full validation's duration
        self._t0 = self._val_batch_t0 = 0.0
        self._save_estimate: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.wall_start = time.time() - self.time_elapsed()
        # resumed with the step time measured before: no room for one more step means no step at all
        if self.duration_s is not None and self._step_times and not self.stopped:
            step = statistics.median(self._step_times)
            end = self._end_seconds(trainer, pl_module, step)
            if self.duration_s - self.time_elapsed() < end + self.safety * max(self._step_times):
                self.stopped = trainer.should_stop = True

    def state_dict(self) -> dict:
        return super().state_dict() | {"step_times": list(self._step_times), "val_seconds": self._val_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self.reset_on_resume:
            super().load_state_dict(state_dict)
            self._step_times.extend(state_dict.get("step_times", []))
            self._val_seconds = state_dict.get("val_seconds")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.duration_s is None:
            return
        now = time.monotonic()
        if trainer.global_step != self._last_step:  # an optimizer step finished: time it
            if self._last_step is not None:
                self._step_times.append((now - self._last_time) / max(1, trainer.global_step - self._last_step))
            self._last_step, self._last_time = trainer.global_step, now
        if len(self._step_times) >= self.warmup_steps_for_estimate:
            step = statistics.median(self._step_times)
            end = self._end_seconds(trainer, pl_module, step)
            left = self.duration_s - self.time_elapsed()
            if self.schedule:
                self._resize_schedule(trainer, int((left - end) / step))
            # one more step (the slowest recent one, with the margin) must still leave room for the end
            if left < end + self.safety * max(self._step_times) and not self.stopped:
                self.stopped = trainer.strategy.broadcast(True)
                trainer.should_stop = True
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.stopped = self.stopped or trainer.should_stop and self.time_remaining() <= 0

    # Lightning validates once more when a run is stopped early: time validations, sanity checks included
    def on_validation_start(self, trainer, pl_module) -> None:
        self._t0 = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val_seconds = time.monotonic() - self._t0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._val_batch_t0 = time.monotonic()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._val_batch_times.append(time.monotonic() - self._val_batch_t0)

    def _end_seconds(self, trainer, pl_module, step: float) -> float:
        """What a stopped run still spends: the reserve, then (with the safety margin) the validation Lightning
        runs on stop and the final checkpoint writes."""
        measured = self._final_validation_seconds(trainer, step) + self._save_seconds(trainer, pl_module)
        return self.reserve + self.safety * measured

    def _final_validation_seconds(self, trainer, step: float) -> float:
        if self._val_seconds is not None:
            return self._val_seconds
        batches = sum(trainer.num_val_batches) if trainer.num_val_batches else _val_batches(trainer)
        if self._val_batch_times:
            return batches * statistics.median(self._val_batch_times)
        # a forward pass costs about a third of a training micro-batch; a half leaves headroom
        return batches * step / trainer.accumulate_grad_batches / 2

    def _save_seconds(self, trainer, pl_module) -> float:
        """The last checkpoint write, measured by AtomicCheckpointIO; before the first one, the checkpoint's
        size (module state + optimizer state) at a cautious 200 MB/s."""
        measured = getattr(trainer.strategy.checkpoint_io, "last_save_seconds", 0.0)
        writers = len(trainer.checkpoint_callbacks)  # at the end each may write: last, and best after validation
        if measured:
            return measured * writers
        if self._save_estimate is None:
            tensors = list(pl_module.state_dict().values())
            for opt in trainer.optimizers:
                tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
            self._save_estimate = sum(t.numel() * t.element_size() for t in tensors) / 200e6
        return self._save_estimate * writers

    def _resize_schedule(self, trainer, steps_left: int) -> None:
        for config in trainer.lr_scheduler_configs:
            for factor in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(factor, WarmupDecay):
                    if self._planned_total is None:
                        self._planned_total = factor.total
                    factor.total = max(factor.warmup + 1, min(self._planned_total, trainer.global_step + steps_left))

    def report(self) -> dict:
        return {"duration_s": self.duration_s, "used_s": round(self.time_elapsed(), 3), "reserve_s": self.reserve,
                "stopped_by_budget": self.stopped, "wall_start": self.wall_start}

    def summary_fields(self, trainer) -> dict:
        budget = self.report()
        last = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), None)
        if budget["wall_start"] and last and Path(last).is_file():  # was the final save inside the budget?
            budget["last_checkpoint_at_s"] = round(Path(last).stat().st_mtime - budget["wall_start"], 3)
        return {"budget": budget}


def _val_batches(trainer) -> int:
    """Validation batches before Lightning has counted them (it does at the first validation): the length of the
    datamodule's validation loader, within trainer.limit_val_batches."""
    if trainer.datamodule is None or not trainer.limit_val_batches:
        return 0
    batches = len(trainer.datamodule.val_dataloader())
    limit = trainer.limit_val_batches
    return min(batches, limit) if isinstance(limit, int) else math.ceil(batches * limit)


def _seconds(budget: str | None) -> float:
    if not budget:
        return 0.0
    days, hours, minutes, seconds = (int(x) for x in budget.split(":"))
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
