"""The LightningModule: a HF causal LM with LoRA adapters and MoE blocks, trained on assistant tokens.

loss = lm_loss + aux_loss_coef * load_balancing + z_loss_coef * z_loss + domain_loss_coef * domain_loss
            + loramoe_coef * loramoe_balancing + entropy_coef * routing_entropy
Building the model is lightning_moe.models.build; the optimiser and schedule training/optim.py; the non-finite
guard and clipping training/stability.py; what a checkpoint holds checkpointing/contents.py.

What callbacks may read (the module's declared interface; nothing else of it is theirs to touch):
  routing_records   the RouterRecords of the last forward pass (lightning_moe.moe.layer), [] without MoE
  moe_blocks        the MoE blocks, in depth order (each has .layer_idx and .router)
  num_experts, domains
  flops_per_batch   model FLOPs of the last training micro-batch (lightning_moe.models.flops)
  nonfinite_steps, nonfinite_stop
  describe()        what was built, for summary.json
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import lightning.pytorch as pl
import torch
from transformers import PretrainedConfig

from lightning_moe.checkpointing import contents
from lightning_moe.config.schema import Sections
from lightning_moe.models.build import build_model, describe_model
from lightning_moe.models.flops import FlopCounts, count_flops, nominal_active_experts
from lightning_moe.models.varlen import varlen_inputs
from lightning_moe.moe.layer import RouterRecord, RoutingContext
from lightning_moe.moe.losses import (
    domain_routing_loss,
    entropy_loss,
    load_balancing_loss,
    loramoe_loss,
    router_z_loss,
)
from lightning_moe.reporting.redact import redact
from lightning_moe.training import optim, stability
from lightning_moe.training.offload import OffloadSavedActivations
from lightning_moe.upstream import keep_lora_inputs_in_autocast_dtype


class MoELoRAModule(pl.LightningModule):
    def __init__(self, sections: Sections, hf_config: PretrainedConfig, vocab_size: int, seed: int = 0):
        super().__init__()
        self.sections, self.hf_config, self.vocab_size, self.seed = sections, hf_config, vocab_size, seed
        self.save_hyperparameters(redact(  # sent to every logger (wandb config, hparams.yaml) and into checkpoints
            {name: asdict(getattr(sections, name)) for name in ("model", "lora", "moe", "optim", "data")}
            | {"domains": sections.domains, "architecture": hf_config.to_dict(), "seed": seed}
        ))
        self.strict_loading = False  # checkpoints carry trainable weights only; the frozen base comes from its source
        self.routing = RoutingContext()
        self.model: torch.nn.Module | None = None
        self.moe_blocks: list = []
        self.flops: FlopCounts | None = None
        self.flops_per_batch = 0
        self.routing_records: list[RouterRecord] = []
        self.domain_weights: torch.Tensor | None = None  # moe.domain_loss_balance: per-domain weights
        self.nonfinite_steps = 0  # optimizer steps skipped for NaN/Inf gradients
        self.nonfinite_stop = False
        self.pending_grads: dict | None = None  # a half-accumulated step's gradients, from a checkpoint
        self.offload: OffloadSavedActivations | None = None  # model.offload_activations
        self.init_device: str | None = None  # where the base was built: random weights depend on the generator

    @property
    def num_experts(self) -> int:
        return self.sections.moe.num_experts if self.moe_blocks else 0

    @property
    def domains(self) -> list[str]:
        return self.sections.domains

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.init_device = device.type if device is not None else "cpu"
        s = self.sections
        self.model, self.moe_blocks = build_model(s.model, s.lora, s.moe, self.hf_config, self.routing,
                                                  self.vocab_size, device, seed=self.seed)
        if self._trainer is not None and "mixed" in str(self.trainer.precision):
            keep_lora_inputs_in_autocast_dtype(self.model)
        self.flops = count_flops(self.model, self.hf_config, nominal_active_experts(s.moe))
        if s.model.offload_activations:  # a CUDA device: checked before the weights (models/prechecks.py)
            self.offload = OffloadSavedActivations()

    def describe(self) -> dict:
        return describe_model(self.model, self.moe_blocks, self.sections.model) if self.model is not None else {}

    def setup(self, stage: str) -> None:
        """With moe.domain_loss_balance, weight each domain by total / (D * count) of the training
        conversations (the DataModule has counted them by now), so every domain pulls equally overall."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not self.sections.moe.domain_loss_balance or dm is None or "train" not in getattr(dm, "stats", {}):
            return
        counts = torch.tensor([float(dm.stats["train"]["by_domain"].get(d, 0)) for d in self.domains])
        present = counts > 0
        weights = torch.zeros_like(counts)
        weights[present] = counts[present].sum() / (present.sum() * counts[present])
        self.domain_weights = weights

    # ---- forward and losses -------------------------------------------------------------------------
    def forward_batch(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, its parts) of one collated batch; routing_records holds the batch's routing after it."""
        self.routing.start_batch(batch)
        with self.offload if self.offload is not None and self.training else contextlib.nullcontext():
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"),
                labels=batch["labels"],
                use_cache=False,  # a KV cache would also switch off transformers' packed-sequence masks
                **varlen_inputs(self.model, batch),
            )
        records = self.routing.stop()
        losses = {"lm_loss": out.loss}
        total = out.loss
        if records:
            total = total + self._router_losses(records, losses)
        self.routing_records = records
        return total, losses

    def _router_losses(self, records: list[RouterRecord], losses: dict) -> torch.Tensor:
        moe = self.sections.moe
        terms = {  # name: (coefficient, loss); computed for logging even when a coefficient is 0
            "aux_loss": (moe.aux_loss_coef, load_balancing_loss(records, moe.num_experts)),
            "z_loss": (moe.z_loss_coef, router_z_loss(records)),
            "domain_loss": (moe.domain_loss_coef, domain_routing_loss(records, self.domain_weights)),
            "entropy_loss": (moe.entropy_coef, entropy_loss(records)),
        }
        if moe.loramoe_coef > 0:
            terms["loramoe_loss"] = (moe.loramoe_coef, loramoe_loss(records, moe.num_experts, moe.loramoe_delta))
        losses.update({k: v for k, (_, v) in terms.items()})
        if self.training:
            for r in records:  # e.g. DeepSeek's loads, summed over micro-batches until the optimizer step
                r.router.observe(r.out.selected & r.mask.unsqueeze(-1))
        # a coefficient of 0 leaves the term out of the graph, not just multiplied by zero
        active = [c * v for c, v in terms.values() if c > 0]
        return sum(active, torch.zeros((), device=records[0].out.logits.device))

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.pending_grads:  # Lightning zeroes gradients between restoring and the first batch
            contents.restore_partial_grads(self, self.pending_grads)
            self.pending_grads = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.forward_batch(batch)
        self.flops_per_batch = self.flops.per_batch(batch["num_tokens"], batch["attn_sq"])
        n = batch["num_examples"]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, parts = self.forward_batch(batch)
        # weight each batch's mean by its target tokens, so val/loss is the per-token mean over the set
        targets = int((batch["labels"] != -100).sum())
        self.log("val/loss", parts["lm_loss"], prog_bar=True, batch_size=targets, sync_dist=True)
        self.log("val/total_loss", loss, batch_size=targets, sync_dist=True)
        for k, v in parts.items():
            if k != "lm_loss":
                self.log(f"val/{k}", v, batch_size=batch["num_examples"], sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        return optim.configure(self, self.sections.optim)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not stability.clip_without_scaler(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step, after all micro-batches' backward: the non-finite guard, then each router's
        own per-step update (DeepSeek's aux-loss-free bias)."""
        if not stability.gradients_finite(self, optimizer):
            return
        reduce_sum = lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")  # noqa: E731
        for block in self.moe_blocks:
            block.router.after_optimizer_step(reduce_sum)

    # ---- checkpoints: trainable weights only (checkpointing/contents.py) ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        contents.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        contents.load(self, checkpoint)
