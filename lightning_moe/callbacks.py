"""Callbacks Lightning lacks: expert usage, the final-step checkpoint, and the run's numbers for summary.json.

Budget (Timer via Trainer.max_time), periodic checkpoints, early stopping, LR and throughput monitoring are
Lightning's own callbacks, configured in conf/callbacks/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.callbacks import ThroughputMonitor as _ThroughputMonitor

from lightning_moe.flops import dense_peak_flops
from lightning_moe.moe.losses import domain_expert_counts, routing_stats


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: when training ends, `last` holds the final step.

    Lightning writes `last` at train end only if no `last` was written before, so a run stopped by its time
    budget or step limit between two periodic saves would lose the steps since the previous one.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class ThroughputMonitor(_ThroughputMonitor):
    """Lightning's ThroughputMonitor with MFU against the dense bf16 peak (lightning_moe.flops), which Lightning
    lacks for the H200. Configure it with length_fn counting real tokens only."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = dense_peak_flops(trainer.strategy.root_device, trainer.precision)
        if peak:
            self.available_flops = peak
            for throughput in self._throughputs.values():
                throughput.available_flops = peak


class ExpertUsageMonitor(Callback):
    """Logs per-layer expert load fractions and routing entropy while training, and at validation the load
    over the whole validation set and the domain x expert routing matrix (also written to
    <run_dir>/routing/latest.json and step_<N>.json)."""

    def __init__(self, output_dir: str, log_every_n_steps: int = 10):
        self.output_dir = Path(output_dir)
        self.log_every_n_steps = log_every_n_steps
        self.train_load: dict[str, list[float]] = {}
        self.val_report: dict | None = None
        self._counts: dict[int, torch.Tensor] = {}
        self._domain: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        routed = pl_module.last_routing
        if routed is None or trainer.global_step % self.log_every_n_steps:
            return
        metrics, num_experts = {}, pl_module.sections.moe.num_experts
        for layer, logits, idx in zip(routed.layers, routed.logits, routed.indices):
            s = routing_stats(logits, idx, num_experts, routed.mask)
            metrics |= {f"moe/layer{layer}/load_e{e}": s["load"][e] for e in range(num_experts)}
            metrics[f"moe/layer{layer}/entropy"] = s["entropy"]
            self.train_load[f"layer{layer}"] = s["load"]
        pl_module.log_dict(metrics, batch_size=batch["num_examples"])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._counts, self._domain = {}, {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        routed = pl_module.last_routing
        if routed is None or trainer.sanity_checking:
            return
        num_experts, num_domains = pl_module.sections.moe.num_experts, len(pl_module.sections.domains)
        for layer, idx in zip(routed.layers, routed.indices):
            m = routed.mask.to(torch.float32).unsqueeze(-1).expand_as(idx).reshape(-1)
            c = torch.zeros(num_experts, device=idx.device).scatter_add_(0, idx.reshape(-1), m)
            self._counts[layer] = self._counts.get(layer, 0) + c
            if num_domains:
                d = domain_expert_counts(idx, torch.where(routed.mask, routed.token_domain, -1), num_domains, num_experts)
                self._domain[layer] = self._domain.get(layer, 0) + d
        pl_module.last_routing = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._counts:
            return
        counts = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._counts.items())}
        domain = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._domain.items())}
        load = {f"layer{k}": (c / c.sum().clamp(min=1)).tolist() for k, c in counts.items()}
        report = {"global_step": trainer.global_step, "expert_load": load}
        if domain:  # rows: domains, columns: experts; each row is the share of that domain's assignments
            total = sum(domain.values())
            matrix = (total / total.sum(-1, keepdim=True).clamp(min=1)).tolist()
            report["domain_expert_matrix"] = {
                "domains": pl_module.sections.domains,
                "all_layers": matrix,
                "per_layer": {f"layer{k}": (v / v.sum(-1, keepdim=True).clamp(min=1)).tolist() for k, v in domain.items()},
                "assignments_per_domain": total.sum(-1).tolist(),
            }
            for name, row in zip(pl_module.sections.domains, matrix):
                pl_module.log_dict({f"val_routing/{name}/e{e}": v for e, v in enumerate(row)}, sync_dist=False)
        for layer, fractions in load.items():
            pl_module.log_dict({f"val_moe/{layer}/load_e{e}": v for e, v in enumerate(fractions)})
        self.val_report = report
        if trainer.is_global_zero:
            out = self.output_dir
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(report, indent=2)
            (out / f"step_{trainer.global_step}.json").write_text(text)
            (out / "latest.json").write_text(text)


class RunStats(Callback):
    """Counts what summary.json reports: first/last training loss, validation losses, real tokens, and the
    training time without validation pauses (so tokens_per_s is the training rate, data loading included)."""

    def __init__(self):
        self.first_train_loss: float | None = None
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.best_val_loss: float | None = None
        self.tokens = 0
        self.flops = 0  # model FLOPs (lightning_moe.flops) of the training batches
        self._train_start = self._last_batch_end = self._val_start = None
        self._val_seconds = 0.0

    @property
    def train_seconds(self) -> float:
        if self._train_start is None or self._last_batch_end is None:
            return 0.0
        return max(self._last_batch_end - self._train_start - self._val_seconds, 0.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._last_batch_end = time.monotonic()
        self.tokens += batch["num_tokens"]
        self.flops += getattr(pl_module, "flops_per_batch", 0)
        loss = trainer.callback_metrics.get("train/lm_loss")
        if loss is not None:
            self.train_loss = float(loss)
            if self.first_train_loss is None:
                self.first_train_loss = self.train_loss

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

    def state_dict(self) -> dict:  # a resumed run reports the loss it started from, not its restart point
        return {"first_train_loss": self.first_train_loss, "best_val_loss": self.best_val_loss}

    def load_state_dict(self, state: dict) -> None:
        self.first_train_loss = state.get("first_train_loss")
        self.best_val_loss = state.get("best_val_loss")
