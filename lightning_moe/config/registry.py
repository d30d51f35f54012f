"""The routers and expert forms by name: what `moe.router` and `moe.expert` accept, and what each builds.

Strings, not classes, for everything that imports torch, so that validating a config imports none. Adding a router is
a file in lightning_moe/moe/routers/, one line in ROUTERS and, if it has knobs, its torch-free config class in
ROUTER_CONFIGS (config/routers.py); adding an expert form is its own file and one ExpertForm in EXPERTS (with,
if it has knobs, its torch-free config class: config/expert_forms.py).
CONTRIBUTING.md walks through both.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lightning_moe.config.expert_forms import ExpertFormConfig, UpcycledConfig
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


@dataclass(frozen=True)
class ExpertForm:
    """What the rest of the code knows of an expert form, without torch. The module its builder makes implements
    lightning_moe/moe/experts.py's `Experts` (the call signature, the FLOP count, the MLP it wraps, if any)."""

    builder: str  # "module:function": (the layer's MLP, hidden size, the moe section) -> an Experts module
    replaces_mlp: bool  # the block does not call the layer's MLP beside the experts (they wrap it or copy it)
    dispatch: str = "dense"  # what moe.dispatch=auto means for it
    exports: tuple[str, ...] = ()  # export formats a run of it can produce (rules of each: config/export_forms.py)
    # its own knobs and checks, moe.<form>.<knob> (config/expert_forms.py); the base class: none
    config: type[ExpertFormConfig] = ExpertFormConfig


EXPERTS = {
    "adapter": ExpertForm("lightning_moe.moe.experts:adapter_experts", replaces_mlp=False),
    # a per_domain export turns expert e's LoRA into a standard adapter (Experts.expert_adapter)
    "lora": ExpertForm("lightning_moe.moe.experts:lora_experts", replaces_mlp=True, exports=("per_domain",)),
    "upcycled": ExpertForm("lightning_moe.moe.experts:upcycled_experts", replaces_mlp=True, dispatch="grouped",
                           config=UpcycledConfig),
}


# every plug-in's own section of `moe`, by name: (what chooses it, its config class). The schema gives each class with
# knobs a section (config/schema.py); validation checks the chosen ones and refuses a knob set on one not chosen
SECTIONS: dict[str, tuple[str, type]] = {**{name: ("router", cls) for name, cls in ROUTER_CONFIGS.items()},
                                         **{name: ("expert", form.config) for name, form in EXPERTS.items()}}


def router_config(moe) -> RouterConfig:
    """The chosen router's own config: its section of `moe`, or its class's defaults where it has no knobs."""
    return getattr(moe, moe.router, None) or ROUTER_CONFIGS.get(moe.router, RouterConfig)()


def expert_config(moe) -> ExpertFormConfig:
    """The chosen expert form's own config: its section of `moe`, or its class's defaults where it has no knobs."""
    return getattr(moe, moe.expert, None) or EXPERTS[moe.expert].config()


def resolve(spec: str):
    """'package.module:Name' -> the object."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)
