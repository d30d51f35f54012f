"""The routers and expert forms by name: what `moe.router` and `moe.expert` accept, and what each builds.

Strings, not classes, for everything that imports torch, so that validating a config imports none. Adding a router is
a file in lightning_moe/moe/routers/, one line in ROUTERS and, if it has knobs, its torch-free config class in
ROUTER_CONFIGS (config/routers.py); CONTRIBUTING.md walks through it.
"""

from __future__ import annotations

import importlib

from lightning_moe.config.routers import (
    DeepSeekConfig,
    DynamicConfig,
    ExpertChoiceConfig,
    RouterConfig,
    SwitchConfig,
    TopKConfig,
)

ROUTERS = {
    "topk": "lightning_moe.moe.routers.topk:TopKRouter",
    "switch": "lightning_moe.moe.routers.switch:SwitchRouter",
    "expert_choice": "lightning_moe.moe.routers.expert_choice:ExpertChoiceRouter",
    "dynamic": "lightning_moe.moe.routers.dynamic:DynamicRouter",
    "deepseek": "lightning_moe.moe.routers.deepseek:DeepSeekRouter",
}
# a router's own knobs and checks (moe.<name>.<knob>); a router not here has none (RouterConfig)
ROUTER_CONFIGS: dict[str, type[RouterConfig]] = {
    "topk": TopKConfig,
    "switch": SwitchConfig,
    "expert_choice": ExpertChoiceConfig,
    "dynamic": DynamicConfig,
    "deepseek": DeepSeekConfig,
}
EXPERTS = {  # builders: (the layer's MLP, hidden size, the moe section) -> the experts module
    "adapter": "lightning_moe.moe.experts:adapter_experts",
    "lora": "lightning_moe.moe.experts:lora_experts",
    "upcycled": "lightning_moe.moe.experts:upcycled_experts",
}


def router_config(moe) -> RouterConfig:
    """The chosen router's own config: its section of `moe`, or its class's defaults where it has no knobs."""
    return getattr(moe, moe.router, None) or ROUTER_CONFIGS.get(moe.router, RouterConfig)()


def resolve(spec: str):
    """'package.module:Name' -> the object."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)
