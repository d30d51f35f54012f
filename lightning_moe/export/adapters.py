"""Standard PEFT LoRA adapters from a trained run: the global LoRA alone, or the global LoRA plus one domain's
LoRA expert as one adapter.

Two LoRA updates on one linear layer, s1 B1 A1 + s2 B2 A2 (s = alpha / r), are one LoRA of rank r1 + r2 with
A = [A1; A2] and B = [s1 B1, s2 B2] at scale 1. Every module of the adapter gets the same rank R (the largest
sum), zero-padded where it needs less, so multi-LoRA servers (vLLM's --max-lora-rank) accept it; lora_alpha = R
keeps the scale at 1. Files in PEFT's format (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module>.lora_A.weight`), loaded by `PeftModel.from_pretrained(base, folder)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from lightning_moe.moe.layer import MoEBlock

Pieces = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # base module path -> [(A (r, in), s*B (out, r))]


def _base_path(name: str) -> str:
    """A module's path in the plain HF model: peft's prefix off, and a LoRA-expert MoE block's wrapped MLP back in
    the layer's mlp slot (`layers.1.mlp.experts.mlp.gate_proj` -> `layers.1.mlp.gate_proj`)."""
    return name.removeprefix("base_model.model.").replace(".mlp.experts.mlp.", ".mlp.")


def global_lora(model: torch.nn.Module) -> Pieces:
    """The global (peft) LoRA of every adapted module, its scaling folded into B."""
    pieces: Pieces = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().float().cpu()
            b = module.lora_B["default"].weight.detach().float().cpu() * module.scaling["default"]
            pieces[_base_path(name)] = [(a, b)]
    return pieces


def expert_lora(model: torch.nn.Module, blocks: list[MoEBlock], expert: int) -> Pieces:
    """Expert `expert`'s LoRA on each MoE layer's MLP projections, its scale folded into B, as its form gives it
    (Experts.expert_adapter: the forms that declare the per_domain export)."""
    paths = {id(m): n for n, m in model.named_modules()}
    pieces: Pieces = {}
    for block in blocks:
        for proj, (a, b) in block.experts.expert_adapter(expert).items():
            pieces[_base_path(f"{paths[id(block)]}.{proj}")] = [(a, b)]
    return pieces


def combine(*parts: Pieces) -> Pieces:
    out: Pieces = {}
    for part in parts:
        for path, pairs in part.items():
            out.setdefault(path, []).extend(pairs)
    return out


def module_shapes(model: torch.nn.Module, targets: set[str]) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer of the plain model named in `targets`, by base path."""
    shapes = {}
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)
        if name.rsplit(".", 1)[-1] in targets and hasattr(layer, "in_features") and "lora_" not in name:
            shapes[_base_path(name)] = (layer.in_features, layer.out_features)
    return shapes


def write_adapter(pieces: Pieces, shapes: dict[str, tuple[int, int]], folder: Path, base_name: str | None,
                  rank: int | None = None) -> int:
    """One PEFT adapter folder over every module in `shapes` (those without pieces get zero A and B, so each layer
    has the same modules, as servers expect); returns its rank (`rank`: at least this, to share one rank)."""
    full = {path: (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1))
            for path, pairs in pieces.items()}
    r = max([rank or 1, *(a.shape[0] for a, _ in full.values())])
    tensors = {}
    for path, (n_in, n_out) in sorted(shapes.items()):
        a, b = full.get(path, (torch.zeros(0, n_in), torch.zeros(n_out, 0)))
        pad = r - a.shape[0]
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, n_in)]).contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.cat([b, b.new_zeros(n_out, pad)], 1).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({path.rsplit(".", 1)[-1] for path in shapes})
    LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=targets,
               base_model_name_or_path=base_name).save_pretrained(folder)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return r
