"""Expert usage: routing metrics per MoE layer in the logs, and the domain x expert matrix at each validation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lightning_moe.moe.losses import load_balancing_loss, router_z_loss
from lightning_moe.moe.metrics import RoutingTally, routing_counts, routing_metrics, to_lists
from lightning_moe.reporting.heatmap import heatmap


class ExpertUsageMonitor(Callback):
    """Routing metrics per MoE layer (lightning_moe.moe.metrics.routing_metrics: load, cv, maxvio, entropy,
    effective experts, dead fraction, active experts, dropped fraction), each layer's aux and z values and its
    router's state (e.g. DeepSeek biases), logged every `log_every_n_steps` optimizer steps as moe/layer<L>/<metric>.

    At each validation the same metrics over the whole validation set (val_moe/...) and the domain x expert
    matrix: the share of each domain's routing weight per expert, with its normalised mutual information. Written
    to <output_dir>/step_<N>.json and latest.json, drawn as <output_dir>/domain_expert_matrix.png and, with a wandb
    logger, logged as an image. Reads the module's declared interface (routing_records, moe_blocks, num_experts,
    domains; lightning_moe/training/module.py).
    """

    def __init__(self, output_dir: str, log_every_n_steps: int = 10, top_k: int = 2):
        self.output_dir = Path(output_dir)
        self.log_every_n_steps, self.top_k = log_every_n_steps, top_k
        self.train_report: dict = {}
        self.val_report: dict | None = None
        self._tally: RoutingTally | None = None
        self._logged_step: int | None = None

    @staticmethod
    def _layer_metrics(pl_module, records, reduce=lambda t: t) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, from the counts summed over data-parallel ranks: every rank logs the same numbers."""
        out = {}
        for r in records:
            counts = {k: reduce(v) for k, v in routing_counts(r, pl_module.num_experts).items()}
            m = routing_metrics(counts, pl_module.num_experts)
            m["aux"] = load_balancing_loss([r], pl_module.num_experts)
            m["z"] = router_z_loss([r])
            out[f"layer{r.layer}"] = m | r.router.state_metrics()
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

    def due(self, global_step: int) -> bool:
        """Once per logged optimizer step: global_step stays the same over an accumulation window's micro-batches,
        and each of them would otherwise compute (and sync) the metrics again."""
        if global_step % self.log_every_n_steps or global_step == self._logged_step:
            return False
        self._logged_step = global_step
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        records = pl_module.routing_records
        if not records or not self.due(trainer.global_step):
            return
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731  every rank logs at this step
        with torch.no_grad():
            per_layer = self._layer_metrics(pl_module, records, reduce)
        pl_module.log_dict(self._flatten("moe", per_layer), batch_size=batch["num_examples"])
        self.train_report = to_lists(per_layer)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._tally = RoutingTally(pl_module.num_experts, pl_module.domains, self.top_k)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not pl_module.routing_records or self._tally is None:
            return
        self._tally.add(pl_module.routing_records)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._tally is None or not self._tally.counts:
            return
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731  sums across DDP ranks
        per_layer = self._tally.per_layer(reduce)
        for block in pl_module.moe_blocks:
            per_layer.get(f"layer{block.layer_idx}", {}).update(block.router.state_metrics())
        # already summed over ranks, so every rank holds the same values: Lightning's epoch-level mean over ranks
        # (sync_dist) leaves them as they are, and without it Lightning warns once per metric under DDP
        for name, v in self._flatten("val_moe", per_layer).items():
            pl_module.log(name, v, sync_dist=True)
        report = {"global_step": trainer.global_step} | self._tally.report(per_layer, reduce)
        if "domain_expert_matrix" in report:
            for name, row in zip(pl_module.domains, report["domain_expert_matrix"]["all_layers"]):
                pl_module.log_dict({f"val_routing/{name}/e{e}": v for e, v in enumerate(row)}, sync_dist=True)
            pl_module.log("val_routing/nmi", report["domain_expert_matrix"]["nmi"], sync_dist=True)
        self.val_report = report
        if trainer.is_global_zero:
            self._write(trainer, report)

    def _write(self, trainer, report: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2)
        (self.output_dir / f"step_{trainer.global_step}.json").write_text(text)
        (self.output_dir / "latest.json").write_text(text)
        if "domain_expert_matrix" not in report:
            return
        png = heatmap(report["domain_expert_matrix"], self.output_dir / "domain_expert_matrix.png",
                      f"domain x expert routing, step {trainer.global_step}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val_routing/domain_expert_matrix", images=[str(png)], step=trainer.global_step)

    def summary_fields(self, trainer) -> dict:
        val = self.val_report or {}
        return {
            "expert_load": val.get("expert_load") or {k: m["load"] for k, m in self.train_report.items()},
            # per layer: load, cv, maxvio, entropy, effective_expert_fraction, dead_fraction, active_experts,
            # dropped_fraction (+ the router's state, e.g. bias); from the last validation, else the last logged batch
            "routing": val.get("routing_metrics") or self.train_report,
            "active_experts": val.get("active_experts"),
            "active_expert_flops_vs_top_k": val.get("active_expert_flops_vs_top_k"),
            "domain_expert_matrix": val.get("domain_expert_matrix"),
        }
