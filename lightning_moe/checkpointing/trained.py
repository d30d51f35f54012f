"""What a finished run leaves for later use: its trained tensors as safetensors.

<run_dir>/export/
  trainable.safetensors   every trained tensor (LoRA, routers, experts, router biases), named as in the model
  export_config.json      the model / lora / moe sections, the domains, the base model's fingerprint, the trained
                          sections' record (seed, the device type a random base was drawn on) and the step
  adapter/                with MoE off: a standard peft adapter (adapter_model.safetensors + adapter_config.json)
Load it with lightning_moe.checkpointing.load (python evaluate.py / generate.py / chat.py run=<run_dir>/export);
export.py turns a run into formats other tools serve.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from lightning_moe.checkpointing.contents import trainable_state_keys, trained_sections
from lightning_moe.checkpointing.fingerprint import fingerprint


def export_trainable(module, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = trainable_state_keys(module)
    state = {k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k in keep}
    save_file(state, str(out_dir / "trainable.safetensors"))
    s = module.sections
    config = {"model": asdict(s.model), "lora": asdict(s.lora), "moe": asdict(s.moe), "domains": s.domains,
              "moe_layers": [b.layer_idx for b in module.moe_blocks], "base_fingerprint": fingerprint(module.hf_config),
              "trained_sections": trained_sections(module), "global_step": module.global_step}
    (out_dir / "export_config.json").write_text(json.dumps(config, indent=2))
    if not module.moe_blocks and hasattr(module.model, "save_pretrained"):
        module.model.save_pretrained(out_dir / "adapter")  # peft writes safetensors
    return out_dir
