"""export.py's work: a trained run (any checkpoint) to a complete, self-describing folder that other tools serve.

merged      LoRA folded into the base weights (peft's merge_and_unload), saved by save_pretrained as safetensors
            shards: plain `AutoModelForCausalLM.from_pretrained(folder)`, no trust_remote_code.
peft        the LoRA as a standard PEFT adapter (`PeftModel.from_pretrained(base, folder)`).
per_domain  one PEFT adapter per domain (global LoRA + that domain's LoRA expert, one rank for all), `global/`
            (the global LoRA alone, what the router's input needs) and `router/` (weights, the pooling rule, route.py).
Every folder has the tokenizer, its chat template and a generation_config.json that stops at the end of a turn.
The format is checked against the run's form, and the output folder against what exists, before any weights load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from lightning_moe.checkpointing.load import LoadPlan, load_trained, plan_load
from lightning_moe.export import adapters
from lightning_moe.export.folder import ExportFolder, refuse_existing, write_manifest, write_tokenizer_and_stops
from lightning_moe.export.forms import check_format
from lightning_moe.models.build import torch_dtype

ROUTE = Path(__file__).with_name("route.py")
SERVER_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank values


def export(cfg: DictConfig, overrides: list[str]) -> Path:
    out = Path(cfg.out)
    refuse_existing(out)
    plan = plan_load(cfg.run, cfg.checkpoint, overrides, cfg.device)
    check_format(cfg.format, plan.sections)  # before any weights
    run = load_trained(plan, cfg.device)
    with ExportFolder(out) as folder:
        stops = write_tokenizer_and_stops(run.tokenizer, folder)
        manifest = {"format": cfg.format, "run": str(plan.run_dir), "checkpoint": str(plan.checkpoint),
                    "global_step": plan.global_step, "base_model": plan.sections.model.name_or_path,
                    "base_init": plan.sections.model.init, "stop_token_ids": stops}
        manifest |= {"merged": _merged, "peft": _peft, "per_domain": _per_domain}[cfg.format](run, plan, folder, cfg)
        write_manifest(folder, manifest)
    print(f"{cfg.format} export of {plan.run_dir} (step {plan.global_step}) -> {out}")
    if cfg.format == "per_domain":
        print(serve_command(out, manifest))
    return out


def _merged(run, plan: LoadPlan, folder: Path, cfg: DictConfig) -> dict:
    model = run.model.merge_and_unload() if hasattr(run.model, "merge_and_unload") else run.model
    dtype = torch_dtype(cfg.dtype or plan.sections.model.dtype)
    model.to(dtype).save_pretrained(folder, max_shard_size="5GB")  # safetensors shards + index
    return {"dtype": str(dtype).removeprefix("torch."), "load": "AutoModelForCausalLM.from_pretrained(folder)"}


def _base_name(plan: LoadPlan) -> str | None:
    m = plan.sections.model
    return m.name_or_path if m.init == "pretrained" else None  # a random base has no name to download


def _peft(run, plan: LoadPlan, folder: Path, cfg: DictConfig) -> dict:
    run.model.save_pretrained(folder)
    return {"load": "PeftModel.from_pretrained(base, folder)", "base": _base_name(plan) or _random_base_note(plan)}


def _random_base_note(plan: LoadPlan) -> str:
    return (f"a random base (model.init=random, architecture {plan.sections.model.arch}, seed "
            f"{plan.record.get('seed')}): rebuild it with lightning_moe.models.build, or export format=merged")


def _per_domain(run, plan: LoadPlan, folder: Path, cfg: DictConfig) -> dict:
    s = plan.sections
    names = list(s.domains) if len(s.domains) == s.moe.num_experts else [f"expert{e}" for e in range(s.moe.num_experts)]
    global_pieces = adapters.global_lora(run.model)
    targets = {p.rsplit(".", 1)[-1] for p in global_pieces} | set(s.moe.lora_targets)
    shapes = adapters.module_shapes(run.model, targets)
    experts = [adapters.expert_lora(run.model, run.blocks, e) for e in range(s.moe.num_experts)]
    needed = max(sum(a.shape[0] for a, _ in pairs) for e in range(s.moe.num_experts)
                 for pairs in adapters.combine(global_pieces, experts[e]).values())
    rank = next(r for r in SERVER_RANKS if r >= needed)  # one rank for every adapter, one a server accepts
    base = _base_name(plan)
    for e, name in enumerate(names):
        adapters.write_adapter(adapters.combine(global_pieces, experts[e]), shapes, folder / name, base, rank)
    if global_pieces:
        adapters.write_adapter(global_pieces, adapters.module_shapes(run.model, {p.rsplit(".", 1)[-1]
                                                                                 for p in global_pieces}),
                               folder / "global", base)
    leader = run.blocks[0]
    router_dir = folder / "router"
    router_dir.mkdir()
    save_file({"weight": leader.router.weight.detach().float().cpu().contiguous()}, str(router_dir / "router.safetensors"))
    spec = {"layer": leader.layer_idx, "routing_level": s.moe.routing_level, "pooling": s.moe.pooling,
            "adapters": names, "input": f"the input of model.layers[{leader.layer_idx}].mlp (after its "
            "post-attention norm), computed by the base + the global adapter", "dtype": "float32",
            "rule": "argmax(weight @ mean of that input over the pooled prompt tokens"
            + (", RMS-normalised)" if s.moe.router_input_norm else ")"), "moe": asdict(s.moe)}
    (router_dir / "router.json").write_text(json.dumps(spec, indent=2) + "\n")
    shutil.copy(ROUTE, router_dir / "route.py")
    return {"adapters": names, "rank": rank, "router": "router/ (route.py: Router(export, base).pick(messages))",
            "base": base or _random_base_note(plan)}


def serve_command(out: Path, manifest: dict) -> str:
    base = manifest["base"] if manifest["base_init"] == "pretrained" else "BASE_MODEL"
    modules = " ".join(f"{n}={out / n}" for n in manifest["adapters"])
    rank = manifest["rank"]
    return ("serve every domain over one copy of the base with vLLM (not run here: no GPU vLLM install):\n"
            f"  vllm serve {base} --enable-lora --max-lora-rank {rank} --max-loras {len(manifest['adapters'])} "
            f"--lora-modules {modules}\n"
            f"  and pick the adapter per request: python {out / 'router' / 'route.py'} --base {base} --messages M.json")


def export_run(cfg: DictConfig, overrides: list[str]) -> Path:
    with torch.no_grad():
        return export(cfg, overrides)
