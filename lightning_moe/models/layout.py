"""What the project knows of a decoder's module layout: its decoder layers, their feed-forward, the MLP's
projections (what LoRA experts adapt), and which layers get MoE blocks or activation checkpointing.

Plain torch.nn over any HuggingFace decoder; the MoE injection, the build and the prechecks read it.
"""

from __future__ import annotations

from torch import nn

from lightning_moe.config.schema import MoEConfig
from lightning_moe.config.validate import check

# Attribute that holds the feed-forward of a decoder layer, by family: Llama/Mistral/Qwen2/Gemma/Phi-3 use
# `mlp`; some older families name it differently.
_FFN_NAMES = ("mlp", "feed_forward", "ffn")


def decoder_layers(model: nn.Module, num_hidden_layers: int) -> nn.ModuleList:
    """The ModuleList of decoder layers: the first one as long as the config's layer count with an FFN."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_hidden_layers:
            if any(hasattr(module[0], n) for n in _FFN_NAMES):
                return module
    raise ValueError(
        f"could not find {num_hidden_layers} decoder layers with an MLP ({'/'.join(_FFN_NAMES)}) "
        f"in {type(model).__name__}"
    )


def ffn_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's feed-forward module."""
    return getattr(layer, next(n for n in _FFN_NAMES if hasattr(layer, n)))


def mlp_projection_names(mlp: nn.Module) -> list[str]:
    """The projections of a gated MLP that LoRA experts can adapt (Phi-3 fuses gate and up)."""
    return ["gate_up_proj", "down_proj"] if hasattr(mlp, "gate_up_proj") else ["gate_proj", "up_proj", "down_proj"]


def spread_layers(num_hidden_layers: int, count: int) -> list[int]:
    """`count` layer indices evenly spread over the depth, centred in equal bands (40, 4 -> 5, 15, 25, 35)."""
    count = min(count, num_hidden_layers)
    return [int((i + 0.5) * num_hidden_layers / count) for i in range(count)]


def resolve_moe_layers(moe: MoEConfig, num_hidden_layers: int) -> list[int]:
    """The decoder-layer indices that get MoE blocks; raises ConfigError naming moe.layers when out of range."""
    if moe.layers is None:
        return spread_layers(num_hidden_layers, moe.num_layers)
    out = []
    for i in moe.layers:
        check(
            -num_hidden_layers <= i < num_hidden_layers,
            "moe.layers",
            f"index {i} is out of range for a model with {num_hidden_layers} decoder layers "
            f"(allowed: {-num_hidden_layers}..{num_hidden_layers - 1})",
        )
        out.append(i % num_hidden_layers)
    check(len(set(out)) == len(out), "moe.layers", f"{moe.layers} names a layer twice")
    return sorted(out)
