"""Each router's own knobs, as `moe.<router>.<knob>` (torchtitan's per-component configs), and its own checks.

A router with knobs has a dataclass here (or in a torch-free module of its own) registered in config/registry.py's
ROUTER_CONFIGS; `MoEConfig` (config/schema.py) keeps what every router shares and gets one section per registered
config, so `moe.deepseek.n_group=2` needs no `+`. `check(moe, sec)` raises ConfigError naming the full key; it runs
only for the chosen router, and a section of another router set away from its defaults is refused (validate.py):
a knob that does nothing is a mistake. The keys that moved here from the flat `moe` section are in MOVED: an old command line
is refused naming the new key, and a run saved before the move is read through `migrate_saved`.
No torch here: validation runs before the training stack loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lightning_moe.config.errors import ConfigError


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class RouterConfig:
    """No knobs, no rules: what a registered router without a config class gets."""

    def check(self, moe: Any, sec: Any) -> None:
        """Rules of this router's own (moe: the shared MoEConfig, sec: every section); raise ConfigError."""

    def picks_one_by_argmax(self, moe: Any) -> bool:
        """Whether, so configured, it sends each row to the one expert of highest logit: the rule the per_domain
        export's route.py applies (lightning_moe/config/export_forms.py)."""
        return False


@dataclass
class TopKConfig(RouterConfig):
    def picks_one_by_argmax(self, moe: Any) -> bool:
        return moe.top_k == 1  # softmax keeps the logits' order


@dataclass
class SwitchConfig(RouterConfig):
    capacity_factor: float = 1.25  # tokens per expert = factor * real tokens / E; the rest skip the experts

    def check(self, moe: Any, sec: Any) -> None:
        check(self.capacity_factor > 0, "moe.switch.capacity_factor", "must be > 0")


@dataclass
class ExpertChoiceConfig(RouterConfig):
    capacity_factor: float = 1.25  # experts per token on average: each expert takes factor * S / E of a sequence

    def check(self, moe: Any, sec: Any) -> None:
        check(self.capacity_factor > 0, "moe.expert_choice.capacity_factor", "must be > 0")
        check(moe.routing_level == "token", "moe.routing_level", "expert choice routes tokens within a sequence")
        check(not sec.data.packing, "data.packing",
              "expert choice routes within a sequence: it needs padded batches (data.packing=false)")


@dataclass
class DynamicConfig(RouterConfig):
    mode: str = "top_p"  # top_p | threshold
    p: float = 0.5  # top_p: keep experts until their probability mass reaches p
    threshold: float = 0.25  # threshold: keep experts with probability >= threshold
    min_experts: int = 1
    max_experts: Optional[int] = None  # null: moe.num_experts

    def check(self, moe: Any, sec: Any) -> None:
        check(self.mode in ("top_p", "threshold"), "moe.dynamic.mode", f"'{self.mode}' is not one of top_p, threshold")
        check(0 < self.p <= 1, "moe.dynamic.p", "must be in (0, 1]")
        check(0 < self.threshold <= 1, "moe.dynamic.threshold", "must be in (0, 1]")
        top = self.max_experts or moe.num_experts
        check(1 <= self.min_experts <= top <= moe.num_experts, "moe.dynamic.min_experts",
              f"need 1 <= min_experts ({self.min_experts}) <= max_experts ({top}) <= moe.num_experts")


@dataclass
class DeepSeekConfig(RouterConfig):
    n_group: int = 1  # grouped selection: experts in n_group groups...
    topk_group: int = 1  # ...of which the best topk_group are eligible
    norm_topk_prob: bool = True  # renormalise the chosen weights
    routed_scaling_factor: float = 1.0  # scale of the routed output
    bias_update_rate: float = 0.0  # aux-loss-free balancing: bias step per optimizer step (0: off)
    bias_update_center: bool = True  # subtract the mean of each bias update (torchtitan)

    def check(self, moe: Any, sec: Any) -> None:
        check(self.n_group >= 1 and moe.num_experts % self.n_group == 0, "moe.deepseek.n_group",
              f"{self.n_group} groups must divide moe.num_experts={moe.num_experts}")
        check(1 <= self.topk_group <= self.n_group, "moe.deepseek.topk_group",
              f"must be in 1..moe.deepseek.n_group={self.n_group}")
        per_group = moe.num_experts // self.n_group
        check(self.n_group == 1 or per_group >= 2, "moe.deepseek.n_group", "grouped selection needs >= 2 experts per group")
        check(moe.top_k <= self.topk_group * per_group, "moe.top_k",
              f"{moe.top_k} > experts in the {self.topk_group} eligible groups ({self.topk_group * per_group})")
        check(self.bias_update_rate >= 0, "moe.deepseek.bias_update_rate", "must be >= 0 (0 turns the term off)")


# the flat `moe` keys before the per-router sections -> where each went
MOVED = {
    "capacity_factor": ("switch.capacity_factor", "expert_choice.capacity_factor"),
    "dynamic_mode": ("dynamic.mode",), "dynamic_p": ("dynamic.p",), "dynamic_threshold": ("dynamic.threshold",),
    "min_experts": ("dynamic.min_experts",), "max_experts": ("dynamic.max_experts",),
    **{k: (f"deepseek.{k}",) for k in ("n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                                       "bias_update_rate", "bias_update_center")},
    # and the expert forms' (config/expert_forms.py)
    "upcycle_train": ("upcycled.train",), "upcycle_noise": ("upcycled.noise",),
}


def refuse_moved(moe: dict) -> None:
    """A flat key set in a command line, a recipe or a sweep: say where it went (Hydra composes it to null)."""
    for old, new in MOVED.items():
        if moe.get(old) is not None:
            where = " or ".join(f"moe.{n}" for n in new)
            mine = " (each router has its own)" if len(new) > 1 else ""
            raise ConfigError(f"moe.{old} moved to {where}{mine}: write moe.{new[0]}={moe[old]}")


def migrate_saved(cfg) -> None:
    """A run's config.yaml written before the per-router sections: the flat keys of its router moved into that
    router's section, in place (it is the run's record, not a command line: nothing for anyone to correct). The
    other routers' flat keys did nothing in that run and go; so with the expert forms' keys."""
    moe = cfg.get("moe")
    for old, new in MOVED.items():
        value = moe.pop(old) if moe is not None and old in moe else None
        for path in new:
            section, key = path.split(".")
            if value is not None and section in (moe.get("router", "topk"), moe.get("expert", "adapter")):
                if moe.get(section) is None:
                    moe[section] = {}
                moe[section][key] = value
