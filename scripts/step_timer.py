"""Steady-state speed of a real train.py run, for scripts/benchmark.py.

StepTimer is added to a run with `+callbacks.bench={_target_: step_timer.StepTimer, ...}` (scripts/ on PYTHONPATH): it skips
`warmup` micro-batches (allocator growth, kernel autotuning), then times `steps` micro-batches between two
device synchronisations, counting real (non-padding) tokens and the model FLOPs the module computed for each
batch (lightning_moe.models.flops), writes the figures as JSON and stops the run. Peak memory is the training
peak (reset when training starts: loading 4-bit weights passes through bf16 on the GPU).

`memory_trace=true` also records the CUDA allocator's history over the last warm-up micro-batch (forward and
backward; untimed) and writes <out>.memory.txt: what was allocated at training start, and the allocations
alive at that micro-batch's peak, summed by the Python code that made them (`peak_allocations`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from lightning_moe.models.flops import dense_peak_flops


class StepTimer(Callback):
    def __init__(self, out: str, warmup: int = 3, steps: int = 10, profile: bool = False,
                 memory_trace: bool = False):
        self.out, self.warmup, self.steps, self.profile = Path(out), warmup, steps, profile
        self.memory_trace = memory_trace
        self._at_start = self._at_trace = 0
        self._prof = None
        self._seen = 0
        self._tokens = self._flops = 0
        self._sizes: list[int] = []  # conversations per timed micro-batch
        self._t0 = 0.0
        self._epoch0 = 0

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type == "cuda":  # the training peak, not a loader's transient one
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
            self._at_start = torch.cuda.memory_allocated(trainer.strategy.root_device)

    def _tracing(self, trainer) -> bool:
        return self.memory_trace and trainer.strategy.root_device.type == "cuda" and self.warmup >= 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._tracing(trainer) and self._seen == self.warmup - 1:
            self._at_trace = torch.cuda.memory_allocated(trainer.strategy.root_device)
            torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
        if self._seen == self.warmup:
            if self.profile:  # where the time goes: kernels by self device time, written beside the JSON
                self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA])
                self._prof.__enter__()
            self._sync(trainer)
            self._frames0 = _compile_counts()["frames"]
            self._t0 = time.perf_counter()
            self._epoch0 = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._tracing(trainer) and self._seen == self.warmup:
            try:  # a diagnostic: never lose the run's figures to it
                self._write_memory_report(trainer, torch.cuda.memory._snapshot())
            except Exception as e:  # noqa: BLE001
                self.out.with_suffix(".memory.txt").write_text(f"memory trace failed: {e!r}\n")
            torch.cuda.memory._record_memory_history(enabled=None)
        if self._seen <= self.warmup:
            return
        self._tokens += int(batch["num_tokens"])
        self._sizes.append(int(batch["num_examples"]))
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
            compiled = _compile_counts()
            result = {
                "tokens_per_s": self._tokens / seconds,
                "mfu": self._flops / seconds / peak if peak else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
                "micro_batches": self.steps,
                "real_tokens": self._tokens,
                "model_flops": self._flops,
                "seconds": seconds,
                "micro_batch_size": max(self._sizes),  # conversations, packed or not
                "smallest_micro_batch": min(self._sizes),  # < micro_batch_size: an epoch's short last batch
                "epochs_crossed": trainer.current_epoch - self._epoch0,  # > 0: a dataloader restart was timed
                "padded_tokens": int(batch["input_ids"].numel()),
                "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "compiled": compiled | {"frames_in_timed_window": compiled["frames"] - self._frames0},
            }
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(result, indent=2))
            trainer.should_stop = True

    def _write_memory_report(self, trainer, snapshot: dict) -> None:
        device = trainer.strategy.root_device
        traces = snapshot["device_traces"][device.index or 0]
        peak, groups = peak_allocations(traces)
        gib = 2**30
        lines = [f"allocated at training start: {self._at_start / gib:.2f} GiB",
                 f"allocated before the traced micro-batch: {self._at_trace / gib:.2f} GiB",
                 f"its peak: {(self._at_trace + peak) / gib:.2f} GiB (+{peak / gib:.2f}); "
                 f"peak so far: {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB",
                 "alive at that peak, allocated during the micro-batch, by the code that allocated it:"]
        lines += [f"{size / gib:8.3f} GiB {count:6d}x  {where}" for where, (size, count) in groups[:30]]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".memory.txt").write_text("\n".join(lines) + "\n")


def _compile_counts() -> dict:
    """model.compile: frames dynamo compiled (each variant of each compiled module) and its graph breaks, by reason:
    a frame count that grows with the timed micro-batches is a recompile in the timed window."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["ok"], "graph_breaks": dict(counters["graph_break"])}


def peak_allocations(traces: list[dict], frames: int = 4) -> tuple[int, list[tuple[str, tuple[int, int]]]]:
    """Replay an allocator trace (torch.cuda.memory._snapshot()["device_traces"][i]): the highest net bytes
    allocated during it, and the blocks alive at that moment that were allocated during it, summed by their
    innermost `frames` Python frames outside torch.nn's call machinery, largest first."""
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: dict[int, dict] = {}
    for event in traces:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif event["action"] == "free_completed":
            current -= event["size"]
            live.pop(event["addr"], None)
    groups: dict[str, list[int]] = {}
    for event in at_peak.values():
        stack = [f for f in event.get("frames", []) if "torch/nn/modules/module.py" not in f["filename"]]
        where = " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in stack[:frames])
        group = groups.setdefault(where or "(no Python frame: autograd engine)", [0, 0])
        group[0] += event["size"]
        group[1] += 1
    return peak, sorted(((k, (v[0], v[1])) for k, v in groups.items()), key=lambda kv: -kv[1][0])
