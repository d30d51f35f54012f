"""Insert MoE blocks into chosen decoder layers of any HF decoder-only model."""

from __future__ import annotations

from torch import nn

from lightning_moe.moe.layer import MoEBlock, RoutingContext, build_block
from lightning_moe.moe.routing import build_router

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


def inject_moe(model: nn.Module, layer_indices: list[int], context: RoutingContext, moe, hidden_size: int,
               num_hidden_layers: int) -> list[MoEBlock]:
    """Put an MoEBlock in the MLP slot of each chosen layer (wrapping or, for upcycled experts, replacing the
    MLP); returns the blocks. Done after peft wraps the model, so that LoRA's `all-linear` never adapts a
    router and the new parameters stay trainable."""
    layers = decoder_layers(model, num_hidden_layers)
    blocks = []
    for i in layer_indices:
        layer = layers[i]
        name = next(n for n in _FFN_NAMES if hasattr(layer, n))
        mlp = getattr(layer, name)
        router = build_router(moe.router, hidden_size, moe.num_experts, moe.top_k, moe)
        block = build_block(mlp, router, moe.expert, i, context, moe, hidden_size, moe.num_experts)
        setattr(layer, name, block)
        blocks.append(block)
    return blocks
