"""Which export formats a trained run's form can produce, checked from its config before any weights load.

| form of the run                                   | merged | peft | per_domain |
|---------------------------------------------------|--------|------|------------|
| LoRA only (moe.enabled=false)                     | yes    | yes  | no (no domains to choose between) |
| LoRA experts, sequence/turn level, top-1, tied    | no     | no   | yes: one adapter per domain + the router |
| adapter experts (SwiGLU bottlenecks)              | no     | no   | no |
| any experts routed per token                      | no     | no   | no |
| upcycled experts                                  | no     | no   | no |
Forms that are not standard models export in this project's own format (the run's export/ folder), loaded by
lightning_moe.checkpointing.load (evaluate.py, generate.py, chat.py). Here in config/ (no torch) because both
export.py and the end-of-run report (which offers only the formats a run can produce) ask it.
"""

from __future__ import annotations

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
    if fmt in ("merged", "peft"):
        if moe.enabled:
            raise ConfigError(
                f"format: {fmt} needs a LoRA-only run (moe.enabled=false): this run's {moe.expert} experts are routed "
                "by the input, so no single standard model holds them. Use format=per_domain for " + SERVABLE +
                "; other forms stay in the project's own format (<run>/export/, loaded by generate.py and chat.py)")
        if fmt == "peft" and not s.lora.enabled:
            raise ConfigError("format: peft needs LoRA (lora.enabled=true); this run trained none")
        return
    problems = []
    if not moe.enabled:
        problems.append("the run has no experts (moe.enabled=false): use format=merged or format=peft")
    else:
        if moe.expert != "lora":
            problems.append(f"moe.expert={moe.expert} (needs lora)")
        if moe.routing_level == "token":
            problems.append("moe.routing_level=token (needs sequence or turn: one decision per conversation or turn)")
        if moe.top_k != 1 or moe.router != "topk":
            problems.append(f"moe.router={moe.router} with moe.top_k={moe.top_k} (needs topk, top_k=1)")
        if moe.num_shared_experts:
            problems.append("moe.num_shared_experts > 0 (shared experts are not LoRAs)")
        if not moe.tied_router and (moe.layers is None and moe.num_layers > 1 or moe.layers and len(moe.layers) > 1):
            problems.append("moe.tied_router=false (each MoE layer would choose on its own)")
    if problems:
        raise ConfigError("format: per_domain exports one standard adapter per domain, exactly, only for " + SERVABLE +
                          "; this run has " + "; ".join(problems))
