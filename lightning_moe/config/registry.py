"""The routers and expert forms by name: what `moe.router` and `moe.expert` accept, and the class each builds.

Strings, not classes, so that validating a config imports no torch. Adding a router is a file in
lightning_moe/moe/routers/, one line here, and its knobs in config/schema.py (CONTRIBUTING.md walks through it).
"""

from __future__ import annotations

import importlib

ROUTERS = {
    "topk": "lightning_moe.moe.routers.topk:TopKRouter",
    "switch": "lightning_moe.moe.routers.switch:SwitchRouter",
    "expert_choice": "lightning_moe.moe.routers.expert_choice:ExpertChoiceRouter",
    "dynamic": "lightning_moe.moe.routers.dynamic:DynamicRouter",
    "deepseek": "lightning_moe.moe.routers.deepseek:DeepSeekRouter",
}
EXPERTS = {  # builders: (the layer's MLP, hidden size, the moe section) -> the experts module
    "adapter": "lightning_moe.moe.experts:adapter_experts",
    "lora": "lightning_moe.moe.experts:lora_experts",
    "upcycled": "lightning_moe.moe.experts:upcycled_experts",
}


def resolve(spec: str):
    """'package.module:Name' -> the object."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)
