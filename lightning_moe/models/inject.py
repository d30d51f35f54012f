"""Insert MoE blocks into chosen decoder layers of any HF decoder-only model."""

from __future__ import annotations

from torch import nn

from lightning_moe.models.layout import decoder_layers, ffn_of
from lightning_moe.moe.layer import MoEBlock, RoutingContext, build_block
from lightning_moe.moe.routers import build_router

def inject_moe(model: nn.Module, layer_indices: list[int], context: RoutingContext, moe, hidden_size: int,
               num_hidden_layers: int) -> list[MoEBlock]:
    """Put an MoEBlock in the MLP slot of each chosen layer (wrapping or, for upcycled experts, replacing the
    MLP); returns the blocks. Done after peft wraps the model, so that LoRA's `all-linear` never adapts a
    router and the new parameters stay trainable."""
    layers = decoder_layers(model, num_hidden_layers)
    blocks = []
    for i in layer_indices:
        layer = layers[i]
        mlp = ffn_of(layer)
        name = next(n for n, m in layer.named_children() if m is mlp)
        router = build_router(hidden_size, moe)
        # moe.tied_router: one decision per conversation for every MoE layer, taken by the first block
        tied = ("follows" if blocks else "leads") if moe.tied_router else "none"
        block = build_block(mlp, router, i, context, moe, hidden_size, tied)
        setattr(layer, name, block)
        blocks.append(block)
    return blocks
