"""Mixture-of-experts blocks inserted beside the MLPs of a HuggingFace decoder."""

from lightning_moe.moe.experts import AdapterExperts
from lightning_moe.moe.inject import decoder_layers, inject_moe
from lightning_moe.moe.layer import MoEBlock, RouterRecord, RoutingContext
from lightning_moe.moe.losses import domain_routing_loss, load_balancing_loss, router_z_loss, routing_stats
from lightning_moe.moe.routing import TopKRouter

__all__ = [
    "AdapterExperts",
    "MoEBlock",
    "RouterRecord",
    "RoutingContext",
    "TopKRouter",
    "decoder_layers",
    "domain_routing_loss",
    "inject_moe",
    "load_balancing_loss",
    "router_z_loss",
    "routing_stats",
]
