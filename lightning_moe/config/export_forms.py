"""Which export formats a trained run's form can produce, checked from its config before any weights load.

| form of the run                                   | merged | peft | per_domain |
|---------------------------------------------------|--------|------|------------|
| LoRA only (moe.enabled=false)                     | yes    | yes  | no (no domains to choose between) |
| LoRA experts, sequence/turn level, top-1, tied    | no     | no   | yes: one adapter per domain + the router |
| adapter experts (SwiGLU bottlenecks)              | no     | no   | no |
| any experts routed per token                      | no     | no   | no |
| upcycled experts                                  | no     | no   | no |
Forms that are not standard models export in this project's own format (the run's export/ folder), loaded by
lightning_moe.checkpointing.load (evaluate.py, generate.py, chat.py). Each expert form declares the formats it can
produce (`exports` of its ExpertForm in config/registry.py) and each router whether it picks one expert by argmax
(`picks_one_by_argmax` of its config in config/routers.py): the rules below read those, never a name. Here in
config/ (no torch) because both export.py and the end-of-run report (which offers only the formats a run can
produce) ask it.
"""

from __future__ import annotations

from lightning_moe.config.registry import EXPERTS, router_config
from lightning_moe.config.schema import ConfigError, Sections

FORMATS = ("merged", "peft", "per_domain")
SERVABLE = "LoRA experts (moe.expert=lora) routed once per conversation or turn (moe.routing_level=sequence|turn), " \
           "top-1 (moe.top_k=1, router topk), with one decision for every MoE layer (moe.tied_router=true): " \
           "+recipe=servable_tiny, +recipe=smollm2_servable or +recipe=therapeutic_servable"


def export_formats(s: Sections) -> list[str]:
    """The formats this run's form can be exported to (possibly none)."""
    out = []
    for fmt in FORMATS:
        try:
            check_format(fmt, s)
            out.append(fmt)
        except ConfigError:
            pass
    return out


def check_format(fmt: str, s: Sections) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format: '{fmt}' is not one of {', '.join(FORMATS)}")
    moe = s.moe
    form = EXPERTS.get(moe.expert) if moe.enabled else None
    if fmt in ("merged", "peft"):
        if form is not None and fmt not in form.exports:
            raise ConfigError(
                f"format: {fmt} needs a LoRA-only run (moe.enabled=false): this run's {moe.expert} experts are routed "
                "by the input, so no single standard model holds them. Use format=per_domain for " + SERVABLE +
                "; other forms stay in the project's own format (<run>/export/, loaded by generate.py and chat.py)")
        if fmt == "peft" and not s.lora.enabled:
            raise ConfigError("format: peft needs LoRA (lora.enabled=true); this run trained none")
        return
    problems = []
    if form is None:
        problems.append("the run has no experts (moe.enabled=false): use format=merged or format=peft")
    else:
        if fmt not in form.exports:  # the form declares what it exports (config/registry.py's ExpertForm)
            able = ", ".join(n for n, f in EXPERTS.items() if fmt in f.exports)
            problems.append(f"moe.expert={moe.expert} (needs {able})")
        if moe.routing_level == "token":
            problems.append("moe.routing_level=token (needs sequence or turn: one decision per conversation or turn)")
        if not router_config(moe).picks_one_by_argmax(moe):  # route.py applies argmax: the router must be that rule
            problems.append(f"moe.router={moe.router} with moe.top_k={moe.top_k} (needs one expert by argmax: "
                            "topk, top_k=1)")
        if moe.num_shared_experts:
            problems.append("moe.num_shared_experts > 0 (shared experts are not LoRAs)")
        if not moe.tied_router and (moe.layers is None and moe.num_layers > 1 or moe.layers and len(moe.layers) > 1):
            problems.append("moe.tied_router=false (each MoE layer would choose on its own)")
    if problems:
        raise ConfigError("format: per_domain exports one standard adapter per domain, exactly, only for " + SERVABLE +
                          "; this run has " + "; ".join(problems))
