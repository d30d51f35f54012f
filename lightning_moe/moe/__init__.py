"""Mixture-of-experts blocks inserted into the MLP slots of a HuggingFace decoder."""

from lightning_moe.moe.experts import LoRAExpertMLP, SharedExpert, SwiGLUExperts
from lightning_moe.moe.inject import decoder_layers, inject_moe
from lightning_moe.moe.layer import MoEBlock, RouterRecord, RoutingContext
from lightning_moe.moe.losses import (
    domain_routing_loss,
    entropy_loss,
    load_balancing_loss,
    loramoe_loss,
    router_z_loss,
    routing_counts,
    routing_metrics,
)
from lightning_moe.moe.routing import (
    DeepSeekRouter,
    DynamicRouter,
    ExpertChoiceRouter,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    build_router,
)

__all__ = [
    "DeepSeekRouter",
    "DynamicRouter",
    "ExpertChoiceRouter",
    "LoRAExpertMLP",
    "MoEBlock",
    "RouterOutput",
    "RouterRecord",
    "RoutingContext",
    "SharedExpert",
    "SwiGLUExperts",
    "SwitchRouter",
    "TopKRouter",
    "build_router",
    "decoder_layers",
    "domain_routing_loss",
    "entropy_loss",
    "inject_moe",
    "load_balancing_loss",
    "loramoe_loss",
    "router_z_loss",
    "routing_counts",
    "routing_metrics",
]
