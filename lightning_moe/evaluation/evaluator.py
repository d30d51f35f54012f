"""Evaluating a trained run through Lightning (`Trainer.validate`: the run's accelerator and precision): the loss
of every conversation for the trained model and for its base in the same pass, the routing over the whole set,
and the bias probes' sentence likelihoods.

The base is the same model with peft's adapters disabled and every MoE block running its layer's own MLP
(RoutingContext.experts_enabled); upcycled experts replaced that MLP, so for them the base is built on its own
(the same seed, so the same base for a random-weight run).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_moe.checkpointing.load import TrainedRun
from lightning_moe.config.schema import LoRAConfig, MoEConfig
from lightning_moe.data.chat import IGNORE_INDEX
from lightning_moe.models.build import build_model
from lightning_moe.models.varlen import varlen_inputs
from lightning_moe.moe.layer import RoutingContext
from lightning_moe.moe.metrics import RoutingTally


def example_nll(model, routing: RoutingContext, batch: dict, record: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood, trained-token count) per conversation of a collated batch."""
    routing.start_batch(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False, **varlen_inputs(model, batch)).logits
    if not record:
        routing.stop()
    labels, seg = batch["labels"][:, 1:], batch["segment_ids"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none",
                          ignore_index=IGNORE_INDEX)
    trained = (labels.flatten() != IGNORE_INDEX).float()
    idx = seg.flatten().clamp(min=0)
    n = batch["num_examples"]
    sums = torch.zeros(n, device=nll.device).index_add(0, idx, nll * trained)
    counts = torch.zeros(n, device=nll.device).index_add(0, idx, trained)
    return sums, counts


class EvalModule(pl.LightningModule):
    """validation_step on dataloader 0 (the evaluation set) records every conversation's loss, trained and base,
    and the routing; on further dataloaders (bias probes) the losses only."""

    def __init__(self, run: TrainedRun, base: bool = True, top_k: int = 2):
        super().__init__()
        self.run, self.model = run, run.model
        s = run.plan.sections
        self.with_base = base
        self.separate_base = None
        if base and any(b.base_mlp() is None for b in run.blocks):  # upcycled: no MLP left to switch back to
            self.separate_base, _ = build_model(s.model, LoRAConfig(enabled=False), MoEConfig(enabled=False),
                                                run.plan.hf_config, RoutingContext(), len(run.tokenizer), run.device,
                                                seed=run.plan.record.get("seed", 0), training=False)
        self.tally = RoutingTally(s.moe.num_experts, s.domains, top_k) if run.blocks else None
        self.rows: dict[int, list[dict]] = defaultdict(list)  # dataloader -> one row per conversation

    @contextlib.contextmanager
    def _base(self):
        if self.separate_base is not None:
            yield self.separate_base
            return
        ctx = self.run.routing
        ctx.experts_enabled = False
        try:
            with self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext():
                yield self.model
        finally:
            ctx.experts_enabled = True

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        main = dataloader_idx == 0
        trained, counts = example_nll(self.model, self.run.routing, batch, record=main and self.tally is not None)
        if main and self.tally is not None:
            self.tally.add(self.run.routing.stop())
        base = None
        if self.with_base:
            with self._base() as model:
                base, _ = example_nll(model, self.run.routing, batch)
        for i in range(batch["num_examples"]):
            row = {"domain": int(batch["example_domain"][i]), "tokens": float(counts[i]), "trained": float(trained[i])}
            if base is not None:
                row["base"] = float(base[i])
            self.rows[dataloader_idx].append(row)
