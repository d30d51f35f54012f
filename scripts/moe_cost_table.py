"""Parameters and model FLOPs of each expert form on the 12B recipe's shape (MOE_TRAINING_GUIDE.md, "Expert
forms on the 12B model"). Builds one MoE block per form on the meta device (no memory) from the real
classes, and counts with the same code the FLOP accounting uses (MoEBlock.flop_params).

    python scripts/moe_cost_table.py
"""

import json

import torch
from transformers import AutoConfig
from transformers.models.mistral.modeling_mistral import MistralMLP

from lightning_moe.config.expert_forms import UpcycledConfig
from lightning_moe.config.schema import MoEConfig
from lightning_moe.moe.layer import RoutingContext, build_block
from lightning_moe.moe.routers import build_router
from lightning_moe.paths import architecture_file

LAYERS, E, K = 4, 4, 2  # the recipe: 4 experts, top-2, in 4 of 40 layers
BASE_FLOPS = 47.84e9  # the recipe's model FLOPs per token at S=1024 (benchmarks/2026-11-22_h200_recipe_check)
FORMS = [
    ("adapter, expert_dim 256 (therapeutic_h100)", dict(expert="adapter", expert_dim=256)),
    ("lora, r 16 on gate/up/down (therapeutic_lora_experts)", dict(expert="lora", lora_r=16, lora_alpha=32)),
    ("upcycled, frozen copies + LoRA r 8 (moe=upcycled)", dict(expert="upcycled", lora_r=8)),
    ("upcycled, copies trained directly", dict(expert="upcycled", upcycled=UpcycledConfig(train="full"))),
]


def main() -> None:
    spec = json.loads(architecture_file("mistral-nemo-12b").read_text())
    cfg = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "architectures"})
    h, mlp_params = cfg.hidden_size, 3 * cfg.hidden_size * cfg.intermediate_size
    print("| expert form | trainable parameters | extra frozen parameters | extra model FLOPs per token | of the recipe's |")
    print("|---|---|---|---|---|")
    for name, kw in FORMS:
        with torch.device("meta"):
            mlp = MistralMLP(cfg).to(torch.bfloat16).requires_grad_(False)
            moe = MoEConfig(top_k=K, num_experts=E, **kw)
            block = build_block(mlp, build_router(h, moe), 0, RoutingContext(), moe, h)
        routed = [block.router, block.experts]  # LoRA experts wrap the layer's own (frozen) MLP: not extra
        trainable = sum(p.numel() for m in routed for p in m.parameters() if p.requires_grad) * LAYERS
        replaces = block.base_mlp() is None  # the experts replaced the MLP by copies of it (upcycled)
        copies = block.experts.parameters() if replaces else []
        frozen = sum(p.numel() for p in copies if not p.requires_grad) * LAYERS
        frozen_active, trainable_active = block.flop_params(K)
        replaced = mlp_params if replaces else 0  # upcycling removes the layer's own MLP
        extra = (4 * (frozen_active - replaced) + 6 * trainable_active) * LAYERS
        print(f"| {name} | {trainable / 1e6:,.1f}M | {frozen / 1e9:,.2f}B | {extra / 1e9:,.3f} GFLOP | "
              f"{100 * extra / BASE_FLOPS:.2f}% |")


if __name__ == "__main__":
    main()
