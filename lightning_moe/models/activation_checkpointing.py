"""Which decoder layers recompute their activations in the backward pass (`model.gradient_checkpointing_layers`)."""

from __future__ import annotations

import torch

from lightning_moe.models.layout import spread_layers


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """transformers' decoder layers in depth order: each checkpoints itself when its own flag is set."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [mod for mod in model.modules() if isinstance(mod, GradientCheckpointingLayer)]


def checkpoint_only(model: torch.nn.Module, count: int) -> None:
    """Selective activation checkpointing: keep checkpointing on `count` decoder layers spread over the depth
    and turn it off on the rest, whose activations then stay in memory instead of being recomputed in the
    backward pass. transformers checkpoints per decoder layer (GradientCheckpointingLayer, a flag each)."""
    layers = decoder_layers(model)
    keep = set(spread_layers(len(layers), count))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep


def checkpointed_layers(model: torch.nn.Module) -> list[int]:
    """Indices of the decoder layers that run under activation checkpointing."""
    return [i for i, layer in enumerate(decoder_layers(model)) if layer.gradient_checkpointing]
