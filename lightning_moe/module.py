"""The LightningModule: a HF causal LM with LoRA adapters and MoE blocks, trained on assistant tokens.

loss = lm_loss + aux_loss_coef * load_balancing + z_loss_coef * z_loss + domain_loss_coef * domain_loss
            + loramoe_coef * loramoe_balancing + entropy_coef * routing_entropy
plus, with moe.bias_update_rate > 0, DeepSeek's aux-loss-free bias step after each optimizer step.
Checkpoints hold only what trains (LoRA, routers, experts, router biases): a 12B base would otherwise add
24 GB to each.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict

import lightning.pytorch as pl
import torch
from transformers import PretrainedConfig

from lightning_moe.config import Sections
from lightning_moe.flops import FlopCounts, count_flops, nominal_active_experts
from lightning_moe.modeling import build_model, checkpointed_layers, keep_lora_inputs_in_autocast_dtype
from lightning_moe.offload import OffloadSavedActivations
from lightning_moe.redact import redact
from lightning_moe.resume import base_model_record
from lightning_moe.schedules import WarmupDecay
from lightning_moe.moe import DeepSeekRouter, RouterRecord, RoutingContext
from lightning_moe.moe.losses import (
    domain_routing_loss,
    entropy_loss,
    load_balancing_loss,
    loramoe_loss,
    router_z_loss,
)

log = logging.getLogger(__name__)


class MoELoRAModule(pl.LightningModule):
    def __init__(self, sections: Sections, model_config: PretrainedConfig, vocab_size: int):
        super().__init__()
        self.sections, self.model_config, self.vocab_size = sections, model_config, vocab_size
        self.save_hyperparameters(redact(  # sent to every logger (wandb config, hparams.yaml)
            {name: asdict(getattr(sections, name)) for name in ("model", "lora", "moe", "optim", "data")}
            | {"domains": sections.domains, "architecture": model_config.to_dict()}
        ))
        self.strict_loading = False  # checkpoints carry trainable weights only; the frozen base comes from the hub
        self.routing = RoutingContext()
        self.model: torch.nn.Module | None = None
        self.moe_blocks: list = []
        self.flops: FlopCounts | None = None
        self.flops_per_batch = 0  # read by Lightning's ThroughputMonitor after every batch
        self.last_records: list[RouterRecord] = []  # the last batch's routing, for ExpertUsageMonitor
        self.domain_weights: torch.Tensor | None = None  # moe.domain_loss_balance: per-domain weights
        self.nonfinite_steps = 0  # optimizer steps skipped for NaN/Inf gradients
        self.nonfinite_stop = False
        self._pending_grads: dict | None = None
        self.offload: OffloadSavedActivations | None = None  # model.offload_activations

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        s = self.sections
        self.model, self.moe_blocks = build_model(
            s.model, s.lora, s.moe, self.model_config, self.routing, self.vocab_size, device
        )
        if self._trainer is not None and "mixed" in str(self.trainer.precision):
            keep_lora_inputs_in_autocast_dtype(self.model)
        self.flops = count_flops(self.model, self.model_config, nominal_active_experts(s.moe))
        if s.model.offload_activations:  # a CUDA device: checked before the weights (prechecks.py)
            self.offload = OffloadSavedActivations()

    def describe(self) -> dict:
        """What was built, for summary.json."""
        if self.model is None:
            return {}
        params = list(self.model.parameters())
        return {
            "name_or_path": self.sections.model.name_or_path,
            "init": self.sections.model.init,
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params),
            "moe_layers": [b.layer_idx for b in self.moe_blocks],
            "checkpointed_layers": checkpointed_layers(self.model),
            "linear_4bit_modules": sum(type(m).__name__ == "Linear4bit" and not hasattr(m, "base_layer")
                                       for m in self.model.modules()),
        }

    def setup(self, stage: str) -> None:
        """With moe.domain_loss_balance, weight each domain by total / (D * count) of the training
        conversations (the DataModule has counted them by now), so every domain pulls equally overall."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not self.sections.moe.domain_loss_balance or dm is None or "train" not in getattr(dm, "stats", {}):
            return
        counts = torch.tensor([float(dm.stats["train"]["by_domain"].get(d, 0)) for d in self.sections.domains])
        present = counts > 0
        weights = torch.zeros_like(counts)
        weights[present] = counts[present].sum() / (present.sum() * counts[present])
        self.domain_weights = weights

    # ---- forward and losses -------------------------------------------------------------------------
    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        attn = batch.get("attention_mask")
        ids = batch["input_ids"]
        self.routing.start(
            token_mask=batch["segment_ids"].reshape(-1) >= 0,  # real tokens: padding is segment -1 in both forms
            token_domain=batch["token_domain"].reshape(-1),
            segments=batch["segment_ids"].reshape(-1),
            num_segments=batch["num_examples"],
            segment_domain=batch["example_domain"],
            pool_mask=batch["prompt_mask"].reshape(-1),
            packed="position_ids" in batch,
        )
        with self.offload if self.offload is not None and self.training else contextlib.nullcontext():
            out = self.model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=batch.get("position_ids"),
                labels=batch["labels"],
                use_cache=False,  # a KV cache would also switch off transformers' packed-sequence masks
            )
        records = self.routing.stop()
        losses = {"lm_loss": out.loss}
        total = out.loss
        if records:
            total = total + self._router_losses(records, losses)
        self.last_records = records
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
        if self.training and moe.bias_update_rate > 0:
            for r in records:  # loads of this micro-batch; summed over micro-batches until the optimizer step
                r.router.record_load((r.out.selected & r.mask.unsqueeze(-1)).sum(0).float().detach())
        # a coefficient of 0 leaves the term out of the graph, not just multiplied by zero
        active = [c * v for c, v in terms.values() if c > 0]
        return sum(active, torch.zeros((), device=records[0].out.logits.device))

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._pending_grads:
            params = dict(self.named_parameters())
            for name, grad in self._pending_grads.items():
                params[name].grad = grad.to(params[name].device)
            self._pending_grads = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self._forward(batch)
        self.flops_per_batch = self.flops.per_batch(batch["num_tokens"], batch["attn_sq"])
        n = batch["num_examples"]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, parts = self._forward(batch)
        # weight each batch's mean by its target tokens, so val/loss is the per-token mean over the set
        targets = int((batch["labels"] != -100).sum())
        self.log("val/loss", parts["lm_loss"], prog_bar=True, batch_size=targets, sync_dist=True)
        self.log("val/total_loss", loss, batch_size=targets, sync_dist=True)
        for k, v in parts.items():
            if k != "lm_loss":
                self.log(f"val/{k}", v, batch_size=batch["num_examples"], sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.sections.optim
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [  # no decay on biases and other vectors
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        if o.name == "adamw_8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        else:
            fused = o.fused if o.fused is not None else self.device.type == "cuda"
            opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        if o.scheduler != "constant" and o.warmup_steps >= total:
            log.warning(
                "optim.warmup_steps=%d >= the run's %d optimizer steps: the learning rate never reaches optim.lr=%g "
                "(more data or epochs, or a shorter warm-up)", o.warmup_steps, total, o.lr,
            )
        factor = WarmupDecay(o.warmup_steps, total, o.scheduler, o.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for optimizers that unscale inside their step
        (fused AdamW), a guard for fp16's GradScaler. bf16 and fp32 have no scaler and nothing to unscale, so
        clip here; with fp16 Lightning's check stands."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step, after all micro-batches' backward: the non-finite guard, then the
        aux-loss-free bias step."""
        if not self._gradients_finite(optimizer):
            return
        moe = self.sections.moe
        if moe.bias_update_rate <= 0:
            return
        for block in self.moe_blocks:
            if isinstance(block.router, DeepSeekRouter):
                load = self.trainer.strategy.reduce(block.router.pending_load.to(self.device), reduce_op="sum")
                block.router.update_bias(load, moe.bias_update_rate, moe.bias_update_center)

    def _gradients_finite(self, optimizer) -> bool:
        """A NaN/Inf gradient (from a NaN loss or an overflow) must never reach the weights. One host sync per
        optimizer step. On a bad step every gradient is set to None, so AdamW skips it entirely (no weight
        decay, no moment update); after optim.max_nonfinite_skips such steps (or at the first, with
        optim.nonfinite=stop) training stops with stop_reason non_finite."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        finite = bool(self.trainer.strategy.reduce(torch.tensor(float(finite), device=self.device), reduce_op="min"))
        if finite:
            return True
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.nonfinite_steps += 1
        o = self.sections.optim
        log.warning("non-finite gradient at step %d: step skipped (%d so far)", self.global_step, self.nonfinite_steps)
        if o.nonfinite == "stop" or self.nonfinite_steps > o.max_nonfinite_skips:
            self.nonfinite_stop = True
            self.trainer.should_stop = True
        return False

    # ---- checkpoints: trainable weights only --------------------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        """Parameters that train, plus router buffers (state such as balancing biases)."""
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        return keys | {n for n, _ in self.named_buffers() if ".router." in n}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # loads counted since the last bias step (a save between micro-batches must not lose them)
        checkpoint["moe_pending_load"] = {
            b.layer_idx: b.router.pending_load.cpu() for b in self.moe_blocks if isinstance(b.router, DeepSeekRouter)
        }
        checkpoint["base_model"] = base_model_record(self.sections.model, self.model_config)
        # gradients accumulated so far in an unfinished accumulation window (a save between micro-batches,
        # e.g. on SIGTERM): without them the resumed step would miss those micro-batches
        checkpoint["partial_grads"] = {n: p.grad for n, p in self.named_parameters() if p.grad is not None}
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # applied at the first resumed batch: Lightning zeroes gradients between restoring and training
        self._pending_grads = checkpoint.get("partial_grads") or None
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        pending = checkpoint.get("moe_pending_load", {})
        for block in self.moe_blocks:
            if block.layer_idx in pending:
                block.router.pending_load = pending[block.layer_idx].to(self.device)
        missing = sorted(self.trainable_state_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} trainable tensors of this model (first: {missing[0]}); "
                "was it written with other lora/moe settings?"
            )
