"""What a checkpoint holds beyond Lightning's own state, written and read by the LightningModule's hooks.

- `state_dict`: only what trains (LoRA, routers, experts) plus router buffers (balancing biases): a 12B base would
  otherwise add 24 GB to each checkpoint; the frozen base is rebuilt from its source (or its seed) on load.
- `base_model`: the base model's name, a fingerprint of its architecture, how it was made and a random base's seed
  (checkpointing/fingerprint.py).
- `trained_sections`: the LoRA and MoE settings that shape the trained tensors, the build seed and the device type
  a random base was generated on: what resuming and loading compare with the config before any weights load.
- `router_state`: each router's state outside its state_dict (e.g. loads counted since the last bias step).
- `partial_grads`: gradients of an unfinished accumulation window (a save between micro-batches, e.g. SIGTERM);
  under DDP with accumulation also `partial_grads_per_rank`, each rank's own (they are only averaged across ranks
  at the window's last micro-batch).
"""

from __future__ import annotations

from dataclasses import asdict

from lightning_moe.checkpointing.fingerprint import base_model_record
from lightning_moe.checkpointing.resume import for_this_rank, from_every_rank


def trainable_state_keys(module) -> set[str]:
    """Parameters that train, plus router buffers (state such as balancing biases)."""
    keys = {n for n, p in module.named_parameters() if p.requires_grad}
    return keys | {n for n, _ in module.named_buffers() if ".router." in n}


def trained_sections(module) -> dict:
    s = module.sections
    return {"lora": asdict(s.lora), "moe": asdict(s.moe), "moe_layers": [b.layer_idx for b in module.moe_blocks],
            "domains": list(s.domains), "seed": module.seed, "init_device": module.init_device}


def save(module, checkpoint: dict) -> None:
    keep = trainable_state_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["router_state"] = {b.layer_idx: state for b in module.moe_blocks
                                  if (state := b.router.extra_state()) is not None}
    checkpoint["base_model"] = base_model_record(module.sections.model, module.hf_config, module.seed)
    checkpoint["trained_sections"] = trained_sections(module)
    checkpoint["partial_grads"] = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    if module.trainer.accumulate_grad_batches > 1:  # at 1 a window never spans a save: the grads are zeroed anyway
        if (per_rank := from_every_rank(module.trainer, checkpoint["partial_grads"])) is not None:
            checkpoint["partial_grads_per_rank"] = per_rank
    checkpoint["nonfinite_steps"] = module.nonfinite_steps


def load(module, checkpoint: dict) -> None:
    module.pending_grads = for_this_rank(module.trainer, checkpoint.get("partial_grads_per_rank"),
                                         checkpoint.get("partial_grads")) or None
    module.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
    state = checkpoint.get("router_state", {})
    for block in module.moe_blocks:
        if block.layer_idx in state:
            block.router.load_extra_state(state[block.layer_idx])
    missing = sorted(trainable_state_keys(module) - set(checkpoint["state_dict"]))
    if missing:  # compatibility is checked before the weights (fingerprint.check_resumable); this is the backstop
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors of this model (first: {missing[0]})")


def restore_partial_grads(module, grads: dict) -> None:
    params = dict(module.named_parameters())
    for name, grad in grads.items():
        params[name].grad = grad.to(params[name].device)
