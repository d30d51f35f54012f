"""Callbacks Lightning lacks: expert usage, the final-step checkpoint, and the run's numbers for summary.json.

Periodic checkpoints, early stopping, LR and throughput monitoring are Lightning's own callbacks (extended
here where they fall short), configured in conf/callbacks/; the wall-clock budget is lightning_moe.budget.
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

from lightning.pytorch.loggers import WandbLogger

from lightning_moe.flops import dense_peak_flops
from lightning_moe.moe import DeepSeekRouter
from lightning_moe.moe.losses import (
    domain_expert_weight,
    load_balancing_loss,
    router_z_loss,
    routing_counts,
    routing_metrics,
)


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
    """Routing metrics per MoE layer (lightning_moe.moe.losses.routing_metrics: load, cv, maxvio, entropy,
    effective experts, dead fraction, active experts, dropped fraction), each layer's aux and z values and
    DeepSeek biases, logged every `log_every_n_steps` optimizer steps as moe/layer<L>/<metric>.

    At each validation the same metrics over the whole validation set (val_moe/...) and the domain x expert
    matrix: the share of each domain's routing weight per expert. Written to <output_dir>/step_<N>.json and
    latest.json, drawn as a heatmap at <heatmap_dir>/domain_expert_matrix.png (beside the checkpoints) and,
    with a wandb logger, logged as an image.
    """

    def __init__(self, output_dir: str, heatmap_dir: str | None = None, log_every_n_steps: int = 10):
        self.output_dir = Path(output_dir)
        self.heatmap_dir = Path(heatmap_dir) if heatmap_dir else self.output_dir
        self.log_every_n_steps = log_every_n_steps
        self.train_report: dict = {}
        self.val_report: dict | None = None
        self._counts: dict[int, dict] = {}
        self._domain: dict[int, torch.Tensor] = {}

    @staticmethod
    def _layer_metrics(records, num_experts: int) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for r in records:
            m = routing_metrics(routing_counts(r, num_experts), num_experts)
            m["aux"] = load_balancing_loss([r], num_experts)
            m["z"] = router_z_loss([r])
            if isinstance(r.router, DeepSeekRouter):
                m["bias"] = r.router.e_score_correction_bias
            out[f"layer{r.layer}"] = m
        return out

    @staticmethod
    def _flatten(prefix: str, per_layer: dict) -> dict[str, torch.Tensor]:
        flat = {}
        for layer, metrics in per_layer.items():
            for name, v in metrics.items():
                if v.dim() == 0:
                    flat[f"{prefix}/{layer}/{name}"] = v
                else:  # per-expert vectors: load, bias
                    flat |= {f"{prefix}/{layer}/{name}_e{e}": x for e, x in enumerate(v)}
        return flat

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        records = pl_module.last_records
        if not records or trainer.global_step % self.log_every_n_steps:
            return
        with torch.no_grad():
            per_layer = self._layer_metrics(records, pl_module.sections.moe.num_experts)
        pl_module.log_dict(self._flatten("moe", per_layer), batch_size=batch["num_examples"])
        self.train_report = _to_lists(per_layer)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._counts, self._domain = {}, {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not pl_module.last_records:
            return
        num_experts, num_domains = pl_module.sections.moe.num_experts, len(pl_module.sections.domains)
        for r in pl_module.last_records:
            c = routing_counts(r, num_experts)
            prev = self._counts.get(r.layer)
            self._counts[r.layer] = c if prev is None else {k: prev[k] + v for k, v in c.items()}
            if num_domains:
                d = domain_expert_weight(r, num_domains, num_experts)
                self._domain[r.layer] = self._domain.get(r.layer, 0) + d
        pl_module.last_records = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._counts:
            return
        moe, domains = pl_module.sections.moe, pl_module.sections.domains
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731  sums across DDP ranks
        per_layer = {}
        for layer, c in sorted(self._counts.items()):
            per_layer[f"layer{layer}"] = routing_metrics({k: reduce(v) for k, v in c.items()}, moe.num_experts)
            router = next(b.router for b in pl_module.moe_blocks if b.layer_idx == layer)
            if isinstance(router, DeepSeekRouter):
                per_layer[f"layer{layer}"]["bias"] = router.e_score_correction_bias
        for name, v in self._flatten("val_moe", per_layer).items():
            pl_module.log(name, v)
        active = torch.stack([m["active_experts"] for m in per_layer.values()]).mean()
        report = {
            "global_step": trainer.global_step,
            "router": moe.router,
            "routing_level": moe.routing_level,
            "expert_load": {k: m["load"].tolist() for k, m in per_layer.items()},
            "routing_metrics": _to_lists(per_layer),
            # FLOPs of the experts tokens actually used, relative to static top-k routing
            "active_experts": active.item(),
            "active_expert_flops_vs_top_k": active.item() / moe.top_k,
        }
        if self._domain:
            report["domain_expert_matrix"] = self._matrix(reduce, domains)
            for name, row in zip(domains, report["domain_expert_matrix"]["all_layers"]):
                pl_module.log_dict({f"val_routing/{name}/e{e}": v for e, v in enumerate(row)})
        self.val_report = report
        if trainer.is_global_zero:
            self._write(trainer, report)

    def _matrix(self, reduce, domains: list[str]) -> dict:
        per_layer = {k: reduce(v) for k, v in sorted(self._domain.items())}
        total = sum(per_layer.values())
        norm = lambda m: (m / m.sum(-1, keepdim=True).clamp(min=1e-12)).tolist()  # noqa: E731
        return {
            "domains": domains,
            "measure": "share of each domain's routing weight (gates normalised per token) per expert",
            "all_layers": norm(total),
            "per_layer": {f"layer{k}": norm(v) for k, v in per_layer.items()},
            "tokens_per_domain": (total.sum(-1) / max(len(per_layer), 1)).round().tolist(),
        }

    def _write(self, trainer, report: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2)
        (self.output_dir / f"step_{trainer.global_step}.json").write_text(text)
        (self.output_dir / "latest.json").write_text(text)
        if "domain_expert_matrix" not in report:
            return
        png = heatmap(report["domain_expert_matrix"], self.heatmap_dir / "domain_expert_matrix.png",
                      f"domain x expert routing, step {trainer.global_step}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val_routing/domain_expert_matrix", images=[str(png)], step=trainer.global_step)


def _to_lists(per_layer: dict) -> dict:
    return {k: {n: (v.tolist() if v.dim() else v.item()) for n, v in m.items()} for k, m in per_layer.items()}


def heatmap(matrix: dict, path: Path, title: str) -> Path:
    """The domain x expert matrix as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = matrix["all_layers"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(values[0]), 1.0 + 0.6 * len(values)))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(values[0])), [f"expert {e}" for e in range(len(values[0]))])
    ax.set_yticks(range(len(values)), matrix["domains"])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


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
