"""Steady-state speed of a real train.py run, for scripts/benchmark.py.

StepTimer is added to a run with `+callbacks.bench={_target_: lightning_moe.bench.StepTimer, ...}`: it skips
`warmup` micro-batches (allocator growth, kernel autotuning), then times `steps` micro-batches between two
device synchronisations, counting real (non-padding) tokens and the model FLOPs the module computed for each
batch (lightning_moe.flops), writes the figures as JSON and stops the run. Peak memory is the training
peak (reset when training starts: loading 4-bit weights passes through bf16 on the GPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from lightning_moe.flops import dense_peak_flops


class StepTimer(Callback):
    def __init__(self, out: str, warmup: int = 3, steps: int = 10, profile: bool = False):
        self.out, self.warmup, self.steps, self.profile = Path(out), warmup, steps, profile
        self._prof = None
        self._seen = 0
        self._tokens = self._flops = 0
        self._t0 = 0.0

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type == "cuda":  # the training peak, not a loader's transient one
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._seen == self.warmup:
            if self.profile:  # where the time goes: kernels by self device time, written beside the JSON
                self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA])
                self._prof.__enter__()
            self._sync(trainer)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._seen <= self.warmup:
            return
        self._tokens += int(batch["num_tokens"])
        self._flops += int(pl_module.flops_per_batch)
        if self._seen == self.warmup + self.steps:
            self._sync(trainer)
            seconds = time.perf_counter() - self._t0
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
                table = self._prof.key_averages().table(sort_by="self_device_time_total", row_limit=40)
                self.out.with_suffix(".profile.txt").write_text(table)
            device = trainer.strategy.root_device
            peak = dense_peak_flops(device, trainer.precision)
            cuda = device.type == "cuda"
            result = {
                "tokens_per_s": self._tokens / seconds,
                "mfu": self._flops / seconds / peak if peak else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                "micro_batches": self.steps,
                "real_tokens": self._tokens,
                "model_flops": self._flops,
                "seconds": seconds,
                "micro_batch_size": int(batch["num_examples"]),  # conversations, packed or not
                "padded_tokens": int(batch["input_ids"].numel()),
                "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            }
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(result, indent=2))
            trainer.should_stop = True
