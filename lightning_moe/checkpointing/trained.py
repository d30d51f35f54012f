"""Export what was trained as safetensors, and load it back onto the base model.

<run_dir>/export/
  trainable.safetensors   every trained tensor (LoRA, routers, experts, router biases), named as in the model
  export_config.json      the model / lora / moe sections, the domains and the base model's fingerprint
  adapter/                with MoE off: a standard peft adapter (adapter_model.safetensors + adapter_config.json)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_moe.checkpointing.contents import trainable_state_keys
from lightning_moe.checkpointing.fingerprint import fingerprint
from lightning_moe.config.schema import LoRAConfig, ModelConfig, MoEConfig


def export_trainable(module, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = trainable_state_keys(module)
    state = {k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k in keep}
    save_file(state, str(out_dir / "trainable.safetensors"))
    s = module.sections
    config = {"model": asdict(s.model), "lora": asdict(s.lora), "moe": asdict(s.moe), "domains": s.domains,
              "moe_layers": [b.layer_idx for b in module.moe_blocks], "base_fingerprint": fingerprint(module.hf_config)}
    (out_dir / "export_config.json").write_text(json.dumps(config, indent=2))
    if not module.moe_blocks and hasattr(module.model, "save_pretrained"):
        module.model.save_pretrained(out_dir / "adapter")  # peft writes safetensors
    return out_dir


def load_exported(out_dir: Path, model_config, vocab_size: int, **model_overrides):
    """The trained model from an export: base weights (from model.name_or_path or random for init=random,
    with `model_overrides` applied, e.g. name_or_path=/local/copy) + LoRA + MoE + the exported tensors."""
    from lightning_moe.models.build import build_model
    from lightning_moe.moe.layer import RoutingContext

    config = json.loads((out_dir / "export_config.json").read_text())
    if config["base_fingerprint"] != fingerprint(model_config):
        raise ValueError(f"{out_dir} was trained on another base model (fingerprint {config['base_fingerprint']})")
    m = ModelConfig(**{**config["model"], **model_overrides})
    model, blocks = build_model(m, LoRAConfig(**config["lora"]), MoEConfig(**config["moe"]), model_config,
                                RoutingContext(), vocab_size)
    state = load_file(str(out_dir / "trainable.safetensors"))
    missing = [k for k in state if k not in dict(model.named_parameters()) and k not in dict(model.named_buffers())]
    if missing:
        raise ValueError(f"{len(missing)} exported tensors have no place in the rebuilt model (first: {missing[0]})")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model, blocks
