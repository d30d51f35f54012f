"""Where a whole train.py run's time goes, for scripts/gpu_recipe_check.sh (PHASES=1).

PhaseTimer is added with `+callbacks.phases={_target_: phase_timer.PhaseTimer, out: FILE}` (scripts/ on PYTHONPATH).
It never synchronises during training (that would change what it measures): each micro-batch gets a host clock
reading and a CUDA event at its start and end, and the events are read once, when training ends. Per micro-batch
it then knows the device's time from its start to the next one's start (the GPU's share of the run) and the gap
in which the device waited for the host before it (data loading, logging, callbacks). The JSON sums them by phase:
the first micro-batches (allocator growth, autotuning), the optimizer steps that log (routing metrics, loggers),
the other steps, validation and what lies outside any micro-batch (checkpoints, the end of training).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class PhaseTimer(Callback):
    def __init__(self, out: str, first: int = 8):
        self.out, self.first = Path(out), first
        self._rows: list[dict] = []
        self._events: list[tuple] = []
        self._val_s = self._val_pending = 0.0  # validation time in all, and since the last micro-batch
        self._val_t0 = self._t0 = None

    def _event(self, trainer):
        if trainer.strategy.root_device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._rows.append({"step": trainer.global_step, "host_start": time.perf_counter() - self._t0,
                           "tokens": int(batch["num_tokens"]), "validation_s": self._val_pending})
        self._val_pending = 0.0
        self._events.append((self._event(trainer), None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = self._rows[-1]
        row["host_end"] = time.perf_counter() - self._t0
        row["optimizer_step"] = trainer.global_step > row["step"]
        row["logged"] = row["optimizer_step"] and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
        self._events[-1] = (self._events[-1][0], self._event(trainer))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_t0 is not None and not trainer.sanity_checking:
            seconds = time.perf_counter() - self._val_t0
            self._val_s += seconds
            self._val_pending += seconds

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        rows = self._rows
        for i, (row, (start, end)) in enumerate(zip(rows, self._events)):
            if start is None:  # CPU: host clocks are the device's
                row["device_s"] = row["host_end"] - row["host_start"]
                gap = row["host_start"] - rows[i - 1]["host_end"] if i else 0.0
                row["wait_before_s"] = max(gap - row["validation_s"], 0.0)
                continue
            row["device_s"] = start.elapsed_time(end) / 1e3  # start of this micro-batch to its end, on the GPU
            previous = self._events[i - 1][1] if i else None
            gap = previous.elapsed_time(start) / 1e3 if previous is not None else 0.0
            row["wait_before_s"] = max(gap - row["validation_s"], 0.0)  # a validation pause is counted apart

        def total(picked: list[dict]) -> dict:
            return {"micro_batches": len(picked), "device_s": round(sum(r["device_s"] for r in picked), 3),
                    "wait_before_s": round(sum(r["wait_before_s"] for r in picked), 3),
                    "tokens": sum(r["tokens"] for r in picked)}

        first = rows[:self.first]
        rest = rows[self.first:]
        phases = {"first": total(first), "logged_steps": total([r for r in rest if r["logged"]]),
                  "other": total([r for r in rest if not r["logged"]])}
        inside = sum(p["device_s"] + p["wait_before_s"] for p in phases.values())
        result = {"wall_s": round(wall, 3), "validation_s": round(self._val_s, 3),
                  "outside_micro_batches_s": round(wall - inside - self._val_s, 3), "phases": phases,
                  "micro_batches": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                                    for r in rows]}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=2))
